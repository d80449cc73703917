"""A worker node SIGKILLed by PID mid-job: restarted, its reconcile ends the job at start-up; not
restarted, the stuck sweep ends it once the node's heartbeat is older than SANDBOX_NODE_DEAD_AFTER.
Either way the job ends exactly once, its command never runs twice, and nothing stays on the host."""
from __future__ import annotations

import json

from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean, sandbox_dirs
from tests.support.jobs import lines_of, normal_job_succeeds, record_of, wait_terminal

SLOW = "python3 -c \"import time; print('started', flush=True); time.sleep(20); print('finished', flush=True)\""


def submit_slow(fault_client, queue: str) -> tuple[str, object]:
    job_id = new_job_id("f-lost")
    pending = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": SLOW,
                                                                          "timeout": 60})], queue=queue)
    return job_id, pending


def test_a_killed_worker_restarted_under_its_name_ends_the_job_at_start_up(start_worker, fault_client,
                                                                           fault_redis_client, fault_work_dir):
    client = fault_redis_client
    node, queue = "fw-restart@host-r", "faults-restart"
    first = start_worker(node, queue=queue)
    job_id, pending = submit_slow(fault_client, queue)
    wait_for(lambda: lines_of(client, job_id, b"started") == 1, timeout_s=60)

    first.kill_by_pid()
    start_worker(node, queue=queue)  # the same node name: it reconciles before it consumes

    record = wait_terminal(client, job_id)
    assert record["status"] == "error" and record["error"]["code"] == "worker_lost", record
    assert pending.get(timeout=30)["status"] == "error"  # the submitter is told, not left waiting
    assert [t["status"] for t in record["timeline"]].count("error") == 1
    assert lines_of(client, job_id, b"started") == 1 and lines_of(client, job_id, b"finished") == 0
    assert_host_clean(fault_work_dir)
    normal_job_succeeds(fault_client, queue=queue)


def test_a_killed_worker_that_never_returns_has_its_job_ended_by_the_stuck_sweep(start_worker, fault_client,
                                                                                 fault_redis_client, fault_work_dir):
    client = fault_redis_client
    doomed = start_worker("fw-doomed@host-d", queue="faults-doomed")
    survivor = start_worker("fw-survivor@host-s", queue="faults-survivor")
    job_id, pending = submit_slow(fault_client, "faults-doomed")
    wait_for(lambda: lines_of(client, job_id, b"started") == 1, timeout_s=60)

    doomed.kill_by_pid()

    def swept() -> dict | None:
        # what beat does every SANDBOX_STUCK_SWEEP_INTERVAL, sent here to the surviving node
        fault_client.send_task("sandbox.sweep_stuck", queue="faults-survivor").get(timeout=30)
        record = record_of(client, job_id)
        return record if record.get("finished_at") else None

    record = wait_for(swept, timeout_s=60, interval_s=0.5)
    assert record["status"] == "error" and record["error"]["code"] == "worker_lost", record
    assert "fw-doomed@host-d" in record["error"]["message"]
    assert pending.get(timeout=30)["status"] == "error"
    assert lines_of(client, job_id, b"started") == 1 and lines_of(client, job_id, b"finished") == 0
    last = json.loads(client.get("sandbox:sweep:stuck:last"))
    assert last["node"] == survivor.node
    # the sandbox of the dead node is on this host's work dir: the survivor's orphan sweep takes it
    fault_client.send_task("sandbox.sweep_node", queue="faults-survivor")  # (its result is not stored)
    wait_for(lambda: not sandbox_dirs(fault_work_dir), timeout_s=30)
    assert_host_clean(fault_work_dir)
    normal_job_succeeds(fault_client, queue="faults-survivor")

