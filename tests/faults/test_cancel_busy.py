"""Cancels while every pool slot is busy: each takes effect at once (the consumer runs it on a side
thread, never behind the slots), and its answer is the truth about how the command ended."""
from __future__ import annotations

import json
import threading
import time

from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean
from tests.support.jobs import lines_of, normal_job_succeeds, record_of, wait_terminal

SLOTS = 20
SLEEPER = "python3 -c \"import time; print('started', flush=True); time.sleep(60)\""


def test_cancels_take_effect_while_every_slot_is_busy(start_worker, fault_client, fault_redis_client,
                                                      fault_work_dir):
    client = fault_redis_client
    start_worker("fw-cancel@host-c", concurrency=SLOTS, queue="faults-cancel")
    ids = [new_job_id("f-cancel") for _ in range(SLOTS)]
    pending = [fault_client.send_task("sandbox.submit", args=[json.dumps({"id": j, "command": SLEEPER, "timeout": 120})],
                                      queue="faults-cancel") for j in ids]
    wait_for(lambda: all(lines_of(client, j, b"started") for j in ids), timeout_s=90)  # every slot runs a job

    latencies: dict[str, float] = {}

    def cancel(job_id: str) -> None:
        sent = time.monotonic()
        answer = fault_client.send_task("sandbox.cancel", args=[job_id], queue="sandbox.control").get(timeout=60)
        assert answer["cancelled"] is True and answer["status"] == "cancelled", answer
        latencies[job_id] = time.monotonic() - sent

    threads = [threading.Thread(target=cancel, args=(j,)) for j in ids]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    all_done_s = time.monotonic() - started
    print(f"cancel answered (status cancelled) after p50 {sorted(latencies.values())[len(latencies) // 2]:.3f} s, "
          f"max {max(latencies.values()):.3f} s; all {SLOTS} in {all_done_s:.3f} s")

    assert len(latencies) == SLOTS
    for job_id in ids:
        assert record_of(client, job_id)["status"] == "cancelled"  # at the moment the answer came
    # every answer came while the slots were still held by 60 s commands: nothing waited for a slot
    assert all_done_s < 30
    for job_id, result in zip(ids, pending):
        record = result.get(timeout=60)
        assert record["status"] == "cancelled" and record["outcome"]["outcome"] == "cancelled", record
        assert sum(t["status"] == "cancelled" for t in record["timeline"]) == 1
    assert_host_clean(fault_work_dir)


def test_a_command_that_ended_before_the_cancel_is_recorded_as_it_ended(start_worker, fault_client,
                                                                        fault_redis_client):
    client = fault_redis_client
    start_worker("fw-late@host-l", queue="faults-late")
    job_id = new_job_id("f-late")
    record = normal_job_succeeds(fault_client, job_id, "faults-late", timeout_s=60)
    answer = fault_client.send_task("sandbox.cancel", args=[job_id], queue="sandbox.control").get(timeout=30)
    assert answer["cancelled"] is False and "succeeded" in answer["message"]
    assert wait_terminal(client, job_id)["status"] == record["status"] == "succeeded"
