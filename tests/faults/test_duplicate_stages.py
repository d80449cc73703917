"""A second copy of a job's stage messages (what kombu leaves after a publish retried on a lost
reply, or a restore after a lost ack) arriving while the job's command runs, handed to a real
worker with real sandboxes: the copy must change nothing. Before the fix, the copied create or
prepare ran its stage again on the live job and sent its own copy of the later stages, whose
execute recorded the job as lost and whose collect and cleanup destroyed the running sandbox.
(The reviewer's repro of session 7, tests/faults/test_review_s7_faults.py.)"""
from __future__ import annotations

import json

import pytest
from celery import chain

from tests.conftest import new_job_id
from tests.faults.conftest import assert_host_clean, sandbox_dirs
from tests.support.jobs import lines_of, record_of, wait_for

WORK = "python3 -c \"import time; print('started', flush=True); time.sleep(6); print('done', flush=True)\""


@pytest.mark.parametrize("first", ["create", "prepare"])
def test_a_duplicated_stage_message_does_not_touch_a_running_job(first, start_worker, fault_client, fault_redis_client,
                                                                 fault_work_dir):
    client = fault_redis_client
    node, queue = f"fw-dup-{first}@host-d", f"faults-dup-{first}"
    start_worker(node, concurrency=4, queue=queue)
    job_id = new_job_id("f-dup")
    pending = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": WORK,
                                                                         "timeout": 60})], queue=queue)
    wait_for(lambda: lines_of(client, job_id, b"started") == 1, timeout_s=60)
    # the copy of the job's stages from `first` on, sent where the original went
    sig = lambda name: fault_client.signature(name, args=[job_id], immutable=True)  # noqa: E731
    steps = [sig("sandbox.create").set(queue=f"{queue}.create"), sig("sandbox.prepare"), sig("sandbox.execute"),
             sig("sandbox.collect"), sig("sandbox.cleanup")]
    if first == "prepare":  # its copy as create sent it: to the node queue
        steps = [s.set(queue=f"sandbox.node.{node}") for s in steps[1:]]
    chain(*steps).apply_async()
    final = pending.get(timeout=90)
    rec = record_of(client, job_id)
    assert final["status"] == "succeeded", final.get("error")
    assert lines_of(client, job_id, b"started") == 1 and lines_of(client, job_id, b"done") == 1  # run once
    assert [rec["stages"][s]["attempts"] for s in ("create", "prepare", "execute")] == [1, 1, 1]
    wait_for(lambda: not sandbox_dirs(fault_work_dir), timeout_s=30)
    assert_host_clean(fault_work_dir)
