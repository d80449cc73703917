"""A submit SIGKILLed after it marked the job dispatched (`lifecycle.dispatched`, written just before
the stages are sent) cannot know, when it is redelivered, whether the send happened: it sends the
stages again when none of them has begun, and a second copy changes nothing (services.Fresh).

No job can kill its worker at a chosen point, so these tests leave in Redis (and in the queues)
what the first delivery left, then hand the same submit message, flagged redelivered as kombu's
restore flags it, to a real worker (as test_inline_create does). Before the fix the redelivery
raised Ignore: the job stayed unsent forever and its waiter never got an answer (the session-7
reviewer's repro, test_review_s7_faults.py)."""
from __future__ import annotations

import json
import uuid

import pytest
from celery import chain

from config import load_settings
from config.wiring import build_services
from sandbox import lifecycle
from tests.conftest import new_job_id
from tests.faults.conftest import assert_host_clean, sandbox_dirs
from tests.support.jobs import lines_of, record_of, wait_for


def _died_after_dispatched(fault_env: dict, node: str, create_too: bool) -> tuple[str, str, str]:
    svc = build_services(load_settings(fault_env), host=node)
    task_id, job_id = str(uuid.uuid4()), new_job_id("f-disp")
    job = json.dumps({"id": job_id, "command": "python3 -c \"print('ran')\""})
    _record, run = lifecycle.submit(svc, job, task_id)
    assert run
    if create_too:
        assert lifecycle.create(svc, job_id) is True  # built inside the submit (admitted at once)
    lifecycle.dispatched(svc, job_id)  # ... SIGKILL here, before (or just after) the send
    return task_id, job_id, job


@pytest.mark.parametrize("sent", [False, True], ids=["never-sent", "sent-then-killed"])
@pytest.mark.parametrize("create_too", [False, True], ids=["queued", "created-inline"])
def test_a_submit_killed_after_dispatched_is_answered_and_runs_its_job_once(
        create_too, sent, start_worker, fault_client, fault_env, fault_redis_client, fault_work_dir):
    client = fault_redis_client
    node, queue = f"fw-disp-{int(create_too)}{int(sent)}@host-r", f"faults-disp-{int(create_too)}{int(sent)}"
    task_id, job_id, job = _died_after_dispatched(fault_env, node, create_too)
    if sent:  # the first delivery's send happened: its stages wait in the queues
        sig = lambda name: fault_client.signature(name, args=[job_id], immutable=True)  # noqa: E731
        steps = [sig(f"sandbox.{s}") for s in ("create", "prepare", "execute", "collect", "cleanup")]
        steps = ([steps[0].set(queue=f"{queue}.create"), *steps[1:]] if not create_too
                 else [s.set(queue=f"sandbox.node.{node}") for s in steps[1:]])
        chain(*steps).apply_async(task_id=task_id)
    start_worker(node, queue=queue)
    pending = fault_client.send_task("sandbox.submit", args=[job], task_id=task_id, queue=queue,
                                     headers={"redelivered": True})
    answer = pending.get(timeout=60)
    assert answer["status"] == "succeeded", answer.get("error")
    rec = record_of(client, job_id)
    assert lines_of(client, job_id, b"ran") == 1  # the command ran once
    assert [rec["stages"][s]["attempts"] for s in ("create", "prepare", "execute")] == [1, 1, 1]
    wait_for(lambda: not sandbox_dirs(fault_work_dir), timeout_s=30)
    assert_host_clean(fault_work_dir)
