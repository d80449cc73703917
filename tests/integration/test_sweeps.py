"""Beat's sweeps against a real Redis and real sandboxes: they find work by labels, not memory."""
from __future__ import annotations

import time

import pytest

from sandbox import sweeps
from sandbox.lifecycle import Services
from sandbox.spec import JobSpec, ResourceLimits
from sandbox.state import JobStatus, JobStore, new_record
from tests.conftest import new_job_id


HOST = "sweeper@host"


@pytest.fixture
def services(runtime, settings, redis_client) -> Services:
    return Services(settings=settings, store=JobStore(redis_client), runtime=runtime, artifacts=None,
                    events=None, host=HOST)


def spec_for(job_id: str) -> JobSpec:
    return JobSpec(id=job_id, command="ls", argv=("/usr/bin/ls",), environment={}, timeout_s=5,
                   resources=ResourceLimits(cpu=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20, pids=32))


def test_orphan_sweep_destroys_only_sandboxes_of_ended_or_vanished_jobs(services):
    ended, running, vanished = new_job_id("ended"), new_job_id("running"), new_job_id("vanished")
    for job_id, status in ((ended, JobStatus.SUCCEEDED), (running, JobStatus.RUNNING)):
        services.store.create(new_record(job_id, status))
    handles = {job_id: services.runtime.create(spec_for(job_id), HOST) for job_id in (ended, running, vanished)}
    services.store.update(ended, lambda r: r.update(finished_at=time.time()))

    assert sweeps.sweep_orphans(services) == []  # everything is inside its grace period
    later = time.time() + sweeps.GRACE_S + 1
    destroyed = sweeps.sweep_orphans(services, now=later)

    assert sorted(destroyed) == sorted([handles[ended].sandbox_id, handles[vanished].sandbox_id])
    assert [info.job_id for info in services.runtime.list_sandboxes()] == [running]


def test_orphan_sweep_leaves_other_hosts_sandboxes_alone(services):
    job_id = new_job_id("elsewhere")
    services.runtime.create(spec_for(job_id), "another@host")
    assert sweeps.sweep_orphans(services, now=time.time() + 10**6) == []
    assert [info.job_id for info in services.runtime.list_sandboxes()] == [job_id]


def test_stuck_sweep_ends_jobs_without_progress_as_error(services):
    stuck, fresh = new_job_id("stuck"), new_job_id("fresh")
    services.store.create(new_record(stuck, JobStatus.RUNNING, now=time.time() - 1000))
    services.store.create(new_record(fresh, JobStatus.RUNNING))

    ended = sweeps.sweep_stuck(services, max_idle_s=500)

    assert stuck in ended and fresh not in ended
    record = services.store.get(stuck)
    assert record["status"] == "error" and record["error"]["code"] == "stuck"
    assert services.store.get(fresh)["status"] == "running"
    assert stuck not in sweeps.sweep_stuck(services, max_idle_s=500)  # a terminal job stays as it is


def test_a_failed_destroy_still_ends_the_job_and_the_sweep_destroys_later(services, monkeypatch):
    from sandbox import lifecycle
    from sandbox.errors import SandboxFailure

    job_id = new_job_id("stubborn")
    services.store.create(new_record(job_id, JobStatus.RUNNING))
    handle = services.runtime.create(spec_for(job_id), HOST)
    services.store.update(job_id, lambda r: r.update(sandbox=handle.to_dict()))

    def refuse(handle):  # noqa: ANN001 - a destroy that fails, as a busy mount would make it
        raise SandboxFailure("workspace is still mounted")

    real_destroy = services.runtime.destroy
    monkeypatch.setattr(services.runtime, "destroy", refuse)
    record = lifecycle.fail(services, job_id, "cleanup", SandboxFailure("workspace is still mounted"))
    assert record["status"] == "error" and record["error"]["stage"] == "cleanup"

    monkeypatch.setattr(services.runtime, "destroy", real_destroy)
    assert sweeps.sweep_orphans(services, now=time.time() + sweeps.GRACE_S + 1) == [handle.sandbox_id]
    assert services.runtime.list_sandboxes() == []


def test_a_create_that_died_half_way_is_torn_down_by_the_sweep(services):
    import os

    job_id = new_job_id("halfmade")
    handle = services.runtime.create(spec_for(job_id), HOST)
    d = os.path.join(services.runtime.work_dir, handle.sandbox_id)
    os.unlink(os.path.join(d, "meta.json"))  # as if the worker died before writing it
    assert services.runtime.list_sandboxes() == []  # invisible to the ordinary sweep

    assert sweeps.sweep_orphans(services) == []  # young: a create may still be under way
    assert sweeps.sweep_orphans(services, now=time.time() + sweeps.GRACE_S + 1) == [handle.sandbox_id]
    assert not os.path.exists(d)
    assert not os.listdir(os.path.join(services.runtime.work_dir, ".uids"))  # its host uid is free again
