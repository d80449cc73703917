"""A stage whose deliveries keep dying with their worker ends its job `error` with the reason after
SANDBOX_MAX_DELIVERIES instead of looping; deliveries that ran to an end (a create requeued while it
waits for capacity, a retry) never count. A message comes back after its worker died through kombu's
restore, which flags it `redelivered` (tests/unit/test_redelivery.py): only such deliveries are
counted, so a first delivery costs no Redis write."""
from __future__ import annotations

import json
import time
import uuid

import redis as redis_lib

from config import load_settings
from sandbox.spec import parse_job
from sandbox.state import JobStatus, JobStore, new_record
from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean
from tests.support.jobs import record_of, wait_terminal


def _recorded_job(fault_env: dict) -> tuple[str, object]:
    settings = load_settings(fault_env)
    job_id = new_job_id("f-loop")
    spec = parse_job(json.dumps({"id": job_id, "command": "ls"}), settings)
    JobStore(redis_lib.Redis.from_url(settings.redis_url)).create(new_record(job_id, JobStatus.QUEUED), spec.to_dict())
    return job_id, settings


def test_deliveries_that_ran_to_an_end_never_count(start_worker, fault_client, fault_env, fault_redis_client):
    node = "fw-requeue@host-m"
    start_worker(node, queue="faults-deliveries")
    job_id, settings = _recorded_job(fault_env)
    task_id = str(uuid.uuid4())
    for delivery in range(1, settings.max_deliveries + 3):  # the same message, again and again
        fault_client.send_task("sandbox.create", args=[job_id], task_id=task_id, queue=f"sandbox.node.{node}")
        wait_for(lambda d=delivery: (c := record_of(fault_redis_client, job_id).get("stages", {}).get("create", {}))
                 .get("attempts") == d and c.get("finished_at"), timeout_s=60)
        time.sleep(0.3)  # the worker lets go of the request just after the stage ends
    assert record_of(fault_redis_client, job_id)["status"] == "creating"  # never given up
    fault_client.send_task("sandbox.cleanup", args=[job_id], queue=f"sandbox.node.{node}").get(timeout=30)


def test_a_stage_whose_worker_died_on_every_delivery_ends_its_job(start_worker, fault_client, fault_env,
                                                                   fault_redis_client, fault_work_dir):
    node = "fw-deliveries@host-m"
    start_worker(node, queue="faults-deliveries")
    job_id, settings = _recorded_job(fault_env)
    task_id = str(uuid.uuid4())
    # What SANDBOX_MAX_DELIVERIES deliveries whose worker died mid-run leave behind (no job can kill
    # a worker on purpose to show it; a local node's own restart ends such a job by reconcile first),
    # and the message as kombu's restore hands it back: flagged redelivered.
    fault_redis_client.set(f"sandbox:deliveries:{task_id}:0", settings.max_deliveries)

    fault_client.send_task("sandbox.create", args=[job_id], task_id=task_id, queue=f"sandbox.node.{node}",
                           headers={"redelivered": True})

    record = wait_terminal(fault_redis_client, job_id, timeout_s=60)
    assert record["status"] == "error" and record["error"]["code"] == "max_deliveries", record
    assert f"delivered {settings.max_deliveries + 1} times" in record["error"]["message"]
    assert "create" not in record["stages"]  # the last delivery did not run
    assert_host_clean(fault_work_dir)


def test_a_redelivery_with_no_count_counts_the_delivery_that_died(start_worker, fault_client, fault_env,
                                                                  fault_redis_client, fault_work_dir):
    # The first delivery wrote nothing; its worker died, so its redelivery is the second delivery.
    node = "fw-first@host-m"
    start_worker(node, queue="faults-deliveries", SANDBOX_MAX_DELIVERIES="1")
    job_id, _ = _recorded_job(fault_env)
    fault_client.send_task("sandbox.create", args=[job_id], queue=f"sandbox.node.{node}",
                           headers={"redelivered": True})

    record = wait_terminal(fault_redis_client, job_id, timeout_s=60)
    assert record["status"] == "error" and record["error"]["code"] == "max_deliveries", record
    assert "delivered 2 times (SANDBOX_MAX_DELIVERIES=1)" in record["error"]["message"]
    assert_host_clean(fault_work_dir)


def test_a_counted_redelivery_that_ends_clears_its_count(start_worker, fault_client, fault_env, fault_redis_client):
    node = "fw-clear@host-m"
    start_worker(node, queue="faults-deliveries")
    job_id, settings = _recorded_job(fault_env)
    task_id = str(uuid.uuid4())
    key = f"sandbox:deliveries:{task_id}:0"
    fault_redis_client.set(key, settings.max_deliveries - 1)  # one short of giving up
    fault_client.send_task("sandbox.create", args=[job_id], task_id=task_id, queue=f"sandbox.node.{node}",
                           headers={"redelivered": True})
    wait_for(lambda: record_of(fault_redis_client, job_id).get("stages", {}).get("create", {}).get("finished_at"),
             timeout_s=60)
    wait_for(lambda: not fault_redis_client.exists(key), timeout_s=10)
    assert record_of(fault_redis_client, job_id)["status"] == "creating"
    fault_client.send_task("sandbox.cleanup", args=[job_id], queue=f"sandbox.node.{node}").get(timeout=30)
