"""sandbox.submit builds the sandbox itself when its node admits the job at once, and sends the
rest of the chain from prepare; otherwise the whole chain, whose create waits for admission.

A submit redelivered after its worker died must neither lose the job nor build or run it twice.
No job can kill its worker at a chosen point, so these tests leave in Redis and on the host what a
worker SIGKILLed at that point leaves (as test_max_deliveries does), then hand the same submit
message, flagged redelivered as kombu's restore flags it, to a real worker of that node:
- died after the create finished, before the stages were sent: the redelivery sends them; the
  sandbox is built once and the job succeeds;
- died during the create: the restarted node's reconcile ends the job `worker_lost`, destroys the
  half-made sandbox and gives its admitted capacity back; the redelivery builds nothing.
"""
from __future__ import annotations

import json
import subprocess
import time
import uuid

from config import load_settings
from config.wiring import build_services
from sandbox import lifecycle
from sandbox.admission import Request, admitted_key
from sandbox.state import JobStatus
from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean, sandbox_dirs
from tests.support.jobs import lines_of, normal_job_succeeds, record_of, wait_terminal


def _recorded(fault_env: dict, node: str, task_id: str) -> tuple[object, str, str]:
    svc = build_services(load_settings(fault_env), host=node)
    job_id = new_job_id("f-inline")
    job = json.dumps({"id": job_id, "command": "python3 -c \"print('built-once')\""})
    record, run = lifecycle.submit(svc, job, task_id)
    assert run and record["status"] == "queued"
    return svc, job_id, job


def _redeliver(fault_client, job: str, task_id: str, queue: str):
    return fault_client.send_task("sandbox.submit", args=[job], task_id=task_id, queue=queue,
                                  headers={"redelivered": True})


def test_a_submit_that_died_after_its_create_sends_the_stages_on_redelivery(start_worker, fault_client, fault_env,
                                                                            fault_redis_client, fault_work_dir):
    node, queue = "fw-inline-sent@host-i", "faults-inline-sent"
    task_id = str(uuid.uuid4())
    svc, job_id, job = _recorded(fault_env, node, task_id)
    assert lifecycle.create(svc, job_id) is True  # what the first delivery did before it died
    built = record_of(fault_redis_client, job_id)
    assert built["status"] == "creating" and built["sandbox"] and not built.get("dispatched_at")
    assert lifecycle.created_not_dispatched(built, task_id)

    start_worker(node, queue=queue)  # its reconcile leaves the job alone: no stage was lost
    record = _redeliver(fault_client, job, task_id, queue).get(timeout=60)

    assert record["status"] == "succeeded", record
    assert record["stages"]["create"]["attempts"] == 1  # built once, by the first delivery
    assert record["sandbox"]["sandbox_id"] == built["sandbox"]["sandbox_id"]
    assert lines_of(fault_redis_client, job_id, b"built-once") == 1  # and run once
    assert fault_redis_client.hlen(admitted_key(node)) == 0
    assert_host_clean(fault_work_dir)


def test_a_submit_that_died_during_its_create_ends_the_job_once_and_builds_nothing_again(
        start_worker, fault_client, fault_env, fault_redis_client, fault_work_dir):
    node, queue = "fw-inline-mid@host-i", "faults-inline-mid"
    task_id = str(uuid.uuid4())
    svc, job_id, job = _recorded(fault_env, node, task_id)
    # What the first delivery left: admitted, the create begun by a process that is gone, the
    # sandbox made on the host, its handle never recorded.
    gone = subprocess.Popen(["true"])
    gone.wait()
    spec = lifecycle.job_spec(svc, job_id)
    assert svc.admission.try_admit(job_id, Request.of(spec.resources)) == "ok"
    svc.store.transition(job_id, JobStatus.CREATING, also=lambda r: r["stages"].setdefault("create", {}).update(
        host=node, pid=gone.pid, started_at=time.time() - 1, attempts=1))
    svc.runtime.create(spec, node)
    assert f"sbx-{job_id}" in sandbox_dirs(fault_work_dir)

    start_worker(node, queue=queue)  # the restarted node reconciles before it consumes
    record = wait_terminal(fault_redis_client, job_id, timeout_s=60)
    assert record["status"] == "error" and record["error"]["code"] == "worker_lost", record
    answer = _redeliver(fault_client, job, task_id, queue).get(timeout=60)

    assert answer["status"] == "error"  # the submitter is told, not left waiting
    final = record_of(fault_redis_client, job_id)
    assert [t["status"] for t in final["timeline"]].count("error") == 1
    assert final["stages"]["create"]["attempts"] == 1 and not final.get("sandbox")  # never built again
    assert "execute" not in final["stages"]
    wait_for(lambda: fault_redis_client.hlen(admitted_key(node)) == 0, timeout_s=30)
    assert_host_clean(fault_work_dir)


def test_a_job_its_node_cannot_admit_at_once_waits_in_the_create_queue(start_worker, fault_client,
                                                                       fault_redis_client, fault_work_dir):
    node, queue = "fw-inline-full@host-i", "faults-inline-full"
    start_worker(node, queue=queue, SANDBOX_NODE_MAX_SANDBOXES="1")
    # 6 s: the later job's submit must find the node full, so it must run while the holder does
    holder = {"id": new_job_id("f-hold"), "command": "sleep 6", "timeout": 30}
    later = {"id": new_job_id("f-later"), "command": "ls"}
    held = fault_client.send_task("sandbox.submit", args=[json.dumps(holder)], queue=queue)
    wait_for(lambda: record_of(fault_redis_client, holder["id"]).get("status") == "running", timeout_s=60)
    pending = fault_client.send_task("sandbox.submit", args=[json.dumps(later)], queue=queue)
    first, second = held.get(timeout=60), pending.get(timeout=60)

    assert first["status"] == "succeeded" and second["status"] == "succeeded", (first, second)
    # the holder was built inside its submit, before its stages were sent ...
    assert first["stages"]["create"]["finished_at"] <= first["dispatched_at"]
    # ... the later job's stages were sent whole, and its create waited for the holder's capacity
    assert second["dispatched_at"] <= second["stages"]["create"]["started_at"]
    assert second["stages"]["create"]["started_at"] >= first["stages"]["cleanup"]["started_at"]
    assert fault_redis_client.hlen(admitted_key(node)) == 0
    assert_host_clean(fault_work_dir)


def test_with_create_in_submit_off_every_create_is_a_task_of_its_own(start_worker, fault_client, fault_redis_client,
                                                                     fault_work_dir):
    node, queue = "fw-inline-off@host-i", "faults-inline-off"
    start_worker(node, queue=queue, SANDBOX_CREATE_IN_SUBMIT="false")
    job_id = new_job_id("f-off")
    record = normal_job_succeeds(fault_client, job_id, queue, timeout_s=60)
    assert record["dispatched_at"] <= record["stages"]["create"]["started_at"]  # sent whole, created after
    assert_host_clean(fault_work_dir)
