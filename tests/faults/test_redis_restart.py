"""Redis stopped (SIGTERM) and started again on its append-only file with jobs in flight: every job
ends exactly once, no command runs twice, nothing stays on the host, and every submitter gets an
answer. (20 jobs on a 20-slot node, as in the issue.)"""
from __future__ import annotations

import json
import time

import requests

from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean, sandbox_dirs
from tests.support.jobs import TERMINAL, client_app, lines_of, normal_job_succeeds, record_of

JOBS = 20
WORK = "python3 -c \"import time; print('started', flush=True); time.sleep(3); print('finished', flush=True)\""


def test_a_stage_that_finds_its_record_gone_tears_its_sandbox_down(start_worker, fault_client,
                                                                   fault_redis_client, fault_work_dir):
    """What a Redis without AOF does on restart, done while a command runs: every record is gone."""
    client = fault_redis_client
    start_worker("fw-flush@host-y", queue="faults-flush")
    job_id = new_job_id("f-flush")
    fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": WORK, "timeout": 60})],
                           queue="faults-flush")
    wait_for(lambda: lines_of(client, job_id, b"started") == 1, timeout_s=60)

    client.flushall()

    wait_for(lambda: not sandbox_dirs(fault_work_dir), timeout_s=30)
    assert_host_clean(fault_work_dir)


def test_a_redis_restart_loses_no_job_and_runs_none_twice(start_worker, fault_client, fault_redis,
                                                          fault_redis_client, fault_work_dir):
    client = fault_redis_client
    queue = "faults-redis"
    start_worker("fw-redis@host-x", concurrency=JOBS, queue=queue)
    ids = [new_job_id("f-redis") for _ in range(JOBS)]
    pending = {job_id: fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": WORK,
                                                                                   "timeout": 60})], queue=queue)
               for job_id in ids}
    wait_for(lambda: sum(lines_of(client, j, b"started") for j in ids) >= JOBS // 2, timeout_s=60)

    fault_redis.stop()  # SIGTERM: Redis writes its AOF and exits
    time.sleep(2)
    fault_redis.start()

    # A result subscription open across the restart may have given up reconnecting (a client-side
    # Celery limit, see the CLI's submit --wait for how a real waiter copes): read with a fresh one.
    fresh = client_app("after-restart", fault_redis.url)
    finals = {}
    for job_id, result in pending.items():
        finals[job_id] = fresh.AsyncResult(result.id).get(timeout=120)  # every submitter gets its answer
    for job_id in ids:
        record = record_of(client, job_id)
        assert record["status"] in TERMINAL, record
        assert finals[job_id]["status"] == record["status"]
        assert sum(t["status"] in TERMINAL for t in record["timeline"]) == 1, record["timeline"]
        assert lines_of(client, job_id, b"started") <= 1, f"{job_id} ran twice"
        stdout = [e["url"] for e in record["logs"] if e["key"].endswith("/stdout.log") and e["url"]]
        if stdout:  # the captured stdout of the one run, as uploaded
            assert requests.get(stdout[0], timeout=10).text.count("started") == 1
    statuses = sorted(record_of(client, j)["status"] for j in ids)
    print("statuses after the restart:", statuses)
    wait_for(lambda: not sandbox_dirs(fault_work_dir), timeout_s=30)
    assert_host_clean(fault_work_dir)
    normal_job_succeeds(fault_client, queue=queue)
