"""A second copy of a stage message against a real Redis: a stage whose job has moved past it (or a
copy of an execute whose command still runs) writes nothing, touches no sandbox and ends with
StaleDelivery, which run_stage turns into Celery's Ignore (no copy of the later stages is sent).
A delivery at the stage's own status (a retry, a redelivery) still runs as before."""
from __future__ import annotations

import json
import os
import subprocess
import time
from types import SimpleNamespace
from typing import Any

import pytest

from config import load_settings
from sandbox import collecting, lifecycle, nodes
from sandbox.errors import StaleDelivery
from sandbox.runtimes.base import SandboxHandle
from sandbox.services import Services
from sandbox.spec import JobSpec, ResourceLimits
from sandbox.state import JobStatus, JobStore, claim_key, new_record, record_key
from tests.conftest import new_job_id

HOST = "stale@host"


class SpyRuntime:
    """Records every call that would touch a sandbox: a stale copy must make none."""

    name, pinned = "local", True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def create(self, spec: JobSpec, host: str) -> SandboxHandle:
        self.calls.append("create")
        return SandboxHandle(f"sbx-{spec.id}", spec.id, "local", host, time.time(), time.time() + 600)

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *a, **k: self.calls.append(op)


@pytest.fixture
def svc(redis_client) -> Services:
    return Services(settings=load_settings({}), store=JobStore(redis_client), runtime=SpyRuntime(),
                    artifacts=None, events=SimpleNamespace(publish=lambda *a: None), host=HOST)


def _job(svc: Services, status: JobStatus, **fields: Any) -> str:
    job_id = new_job_id("stale")
    record = {**new_record(job_id, status), **fields}
    record["sandbox"] = record.get("sandbox") or {
        "sandbox_id": f"sbx-{job_id}", "job_id": job_id, "runtime": "local", "host": HOST,
        "created_at": time.time(), "expires_at": time.time() + 600}
    spec = JobSpec(id=job_id, command="ls", argv=("/usr/bin/ls",), environment={}, timeout_s=5,
                   resources=ResourceLimits(cpu=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20, pids=32))
    svc.store.create_job(record, spec.to_dict())
    return job_id


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


STAGES = {"create": (lambda svc, j: lifecycle.create(svc, j), JobStatus.CREATING),
          "prepare": (lambda svc, j: lifecycle.prepare(svc, j), JobStatus.PREPARING),
          "execute": (lambda svc, j: lifecycle.execute(svc, j, token="copy"), JobStatus.RUNNING),
          "collect": (lambda svc, j: collecting.collect(svc, j), JobStatus.COLLECTING)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_the_job_has_moved_past_writes_nothing_and_touches_no_sandbox(stage, svc, redis_client):
    run, own = STAGES[stage]
    later = [s for s in (JobStatus.PREPARING, JobStatus.RUNNING, JobStatus.COLLECTING, JobStatus.CLEANING)
             if list(JobStatus).index(s) > list(JobStatus).index(own)]
    for status in later:
        job_id = _job(svc, status, outcome={"outcome": "succeeded"} if status != JobStatus.PREPARING else None)
        before = redis_client.get(record_key(job_id))
        with pytest.raises(StaleDelivery):
            run(svc, job_id)
        assert redis_client.get(record_key(job_id)) == before, f"{stage} wrote to a {status.value} job"
        assert svc.runtime.calls == [] and redis_client.get(claim_key(job_id)) is None


def test_a_stage_at_its_own_status_runs_again_as_before(svc, redis_client):
    job_id = _job(svc, JobStatus.PREPARING)
    lifecycle.prepare(svc, job_id)  # a redelivered prepare: runs (idempotent), no exception
    assert svc.store.get(job_id)["stages"]["prepare"].get("finished_at") is not None
    done = _job(svc, JobStatus.RUNNING, outcome={"outcome": "succeeded"})
    lifecycle.execute(svc, done, token="again")  # execute ended, the send did not happen: goes on
    assert svc.store.get(done)["outcome"] == {"outcome": "succeeded"}


def _running(svc: Services, redis_client, holder: dict) -> str:
    job_id = _job(svc, JobStatus.RUNNING, stages={"execute": {"attempts": 1, "token": "real", **holder}})
    redis_client.set(claim_key(job_id), "real")
    return job_id


def test_a_copy_of_execute_while_its_holder_runs_writes_nothing_and_takes_no_claim(svc, redis_client):
    alive_here = {"host": HOST, "pid": os.getpid(), "started_at": time.time() - 1}
    other = "other@host"
    redis_client.set(nodes.heartbeat_key(other), json.dumps({"at": time.time()}))
    alive_there = {"host": other, "pid": 1, "started_at": time.time() - 1}
    for holder in (alive_here, alive_there):
        job_id = _running(svc, redis_client, holder)
        before = redis_client.get(record_key(job_id))
        with pytest.raises(StaleDelivery):
            lifecycle.execute(svc, job_id, token="copy")
        assert redis_client.get(record_key(job_id)) == before
        assert redis_client.get(claim_key(job_id)) == b"real" and svc.runtime.calls == []


@pytest.mark.parametrize("case", ["dead-here", "dead-node", "same-token"])
def test_an_execute_whose_holder_is_dead_or_itself_is_recorded_lost_never_run_twice(case, svc, redis_client):
    holder = {"dead-here": {"host": HOST, "pid": _dead_pid(), "started_at": time.time() - 1},
              "dead-node": {"host": "gone@host", "pid": 1, "started_at": time.time() - 1},
              "same-token": {"host": HOST, "pid": os.getpid(), "started_at": time.time() - 1}}[case]
    job_id = _running(svc, redis_client, holder)
    lifecycle.execute(svc, job_id, token="real" if case == "same-token" else "copy")
    record = svc.store.get(job_id)
    assert "worker was lost while the command ran" in record["error"]["message"]
    assert svc.runtime.calls == []  # the command never ran a second time


def test_a_transition_refused_by_only_if_never_attempts_the_claim(svc, redis_client):
    job_id = _job(svc, JobStatus.RUNNING)  # no claim held (one that expired, say)
    record, claimed = svc.store.transition_and_claim(job_id, JobStatus.RUNNING, "copy", only_if=lambda r: False)
    assert not claimed and redis_client.get(claim_key(job_id)) is None
    assert svc.store.transition_and_claim(job_id, JobStatus.RUNNING, "real")[1]  # written: claimed


@pytest.mark.parametrize("stage", ["create", "prepare"])
def test_a_copy_of_create_or_prepare_another_task_ran_or_runs_writes_nothing(stage, svc, redis_client):
    status = {"create": JobStatus.CREATING, "prepare": JobStatus.PREPARING}[stage]
    run = {"create": lifecycle.create, "prepare": lifecycle.prepare}[stage]
    now = time.time()
    holders = {"finished": {"host": HOST, "pid": _dead_pid(), "started_at": now - 2, "finished_at": now - 1},
               "alive-here": {"host": HOST, "pid": os.getpid(), "started_at": now - 1},
               "dead-here": {"host": HOST, "pid": _dead_pid(), "started_at": now - 1}}
    for name, holder in holders.items():
        job_id = _job(svc, status, stages={stage: {"attempts": 1, "token": "real", **holder}})
        before = redis_client.get(record_key(job_id))
        if name == "dead-here":  # its holder died: the stage runs again, as a redelivery would
            run(svc, job_id, token="copy")
            assert svc.store.get(job_id)["stages"][stage]["token"] == "copy"
            continue
        with pytest.raises(StaleDelivery):
            run(svc, job_id, token="copy")
        assert redis_client.get(record_key(job_id)) == before, name
        assert svc.runtime.calls == []
    job_id = _job(svc, status, stages={stage: {"attempts": 1, "token": "real", **holders["alive-here"]}})
    run(svc, job_id, token="real")  # the same task again (a retry): runs
    assert svc.store.get(job_id)["stages"][stage]["attempts"] == 2
