"""Cancel: a running job's sandbox is killed at once, it ends `cancelled`, and cleanup still runs."""
from __future__ import annotations

import json

import pytest

from config.settings import load_settings
from config.wiring import build_services
from sandbox import collecting, lifecycle
from tests.conftest import new_job_id, wait_for
from tests.e2e.conftest import sandbox_left
from tests.e2e.test_pipeline import assert_cleaned_up
from tests.support.jobs import record_of
from tests.support.services import Worker


def status_of(redis_client, job_id: str) -> str | None:
    return record_of(redis_client, job_id).get("status")


def test_cancel_running_job_kills_it_and_cleans_up(celery_client, worker, stack_env, redis_client):
    job_id = new_job_id("cancel")
    pending = celery_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": "sleep 60",
                                                                          "timeout": 120})])
    wait_for(lambda: status_of(redis_client, job_id) == "running")

    answer = celery_client.send_task("sandbox.cancel", args=[job_id]).get(timeout=30)
    record = pending.get(timeout=60)

    assert answer["cancelled"] is True
    assert record["status"] == "cancelled"
    assert record["outcome"]["outcome"] == "cancelled"
    assert record["stages"]["execute"]["duration_s"] < 50  # killed, not waited out
    assert_cleaned_up(record, stack_env, redis_client)


def test_cancelling_a_finished_job_changes_nothing_and_says_so(submit, celery_client, redis_client):
    record = submit({"id": new_job_id("done"), "command": "ls"})
    answer = celery_client.send_task("sandbox.cancel", args=[record["id"]]).get(timeout=30)
    assert answer["cancelled"] is False
    assert "already ended as succeeded" in answer["message"]
    assert status_of(redis_client, record["id"]) == "succeeded"


def test_cancelling_an_unknown_job_says_so(celery_client, worker):
    answer = celery_client.send_task("sandbox.cancel", args=["no-such-job"]).get(timeout=30)
    assert answer["cancelled"] is False and answer["status"] is None
    assert answer["message"].startswith("no such job")


def test_cancel_handled_on_another_node_kills_the_sandbox_on_its_own_node(celery_client, worker, stack_env,
                                                                           session_dir, redis_client, runtime_name):
    other = Worker(stack_env, node="w-cancel@host-d", log_path=session_dir / "worker-cancel.log", queue="cancel-intake")
    other.start(celery_client)
    try:
        job_id = new_job_id("xcancel")
        pending = celery_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": "sleep 60",
                                                                              "timeout": 120})])
        wait_for(lambda: status_of(redis_client, job_id) == "running")
        answer = celery_client.send_task("sandbox.cancel", args=[job_id], queue="cancel-intake").get(timeout=30)
        record = pending.get(timeout=60)
    finally:
        other.stop()
    assert answer["cancelled"] is True
    if runtime_name == "local":  # the kill went to the sandbox's own node
        assert answer["killed_on"] == [worker.node] and record["sandbox"]["host"] == worker.node
    else:  # any worker reaches a Fly machine's agent: the cancelling node killed it itself
        assert "killed_on" not in answer
    assert record["status"] == "cancelled" and record["outcome"]["outcome"] == "cancelled"
    assert_cleaned_up(record, stack_env, redis_client)


class _CancelOnEntry:
    """The runtime, except that its first `method` call cancels the job first: a cancel that
    arrives while that stage runs, at a known point (no timing)."""

    def __init__(self, svc, job_id: str, method: str) -> None:  # noqa: ANN001
        self._svc, self._inner, self._job_id, self._method = svc, svc.runtime, job_id, method
        self.answer: dict | None = None

    def __getattr__(self, name: str):  # noqa: ANN204
        attr = getattr(self._inner, name)
        if name != self._method or self.answer is not None:
            return attr

        def cancel_then(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.answer = lifecycle.cancel(self._svc, self._job_id)
            return attr(*args, **kwargs)
        return cancel_then


@pytest.mark.parametrize("stage,method", [("create", "create"), ("prepare", "put_file"),
                                          ("execute", "execute"), ("collect", "logs")])
def test_cancel_during_each_stage_ends_cancelled_and_destroys_the_sandbox(stage, method, stack_env, redis_client,
                                                                         runtime_name, fake_fly):
    svc = build_services(load_settings(stack_env), host="cancel-test-node")
    job_id = new_job_id(f"cx{stage}")
    gate = _CancelOnEntry(svc, job_id, method)
    svc.runtime = gate
    command = "ls" if stage == "collect" else "sleep 20"
    record, run = lifecycle.submit(svc, {"id": job_id, "command": command,
                                         "files": [{"path": "in.txt", "content": "x"}]}, "task-1")
    assert run
    for step in (lifecycle.create, lifecycle.prepare):
        step(svc, job_id)
    lifecycle.execute(svc, job_id, token="task-2")
    collecting.collect(svc, job_id)
    final = lifecycle.cleanup(svc, job_id)

    if stage == "collect":  # the command had ended: recorded as it ended, and the answer says so (issue 9)
        assert gate.answer and gate.answer["cancelled"] is False, gate.answer
        assert "recorded as it ended" in gate.answer["message"]
        assert final["status"] == "succeeded" and final["outcome"]["outcome"] == "succeeded", final
        assert not sandbox_left(job_id, stack_env)
        return
    assert gate.answer and gate.answer["cancelled"] is True, gate.answer
    assert final["status"] == "cancelled", final
    if stage == "execute":
        assert final["outcome"]["outcome"] == "cancelled" and final["stages"]["execute"]["duration_s"] < 15
    else:  # a cancel before the command: it never starts
        assert "execute" not in final["stages"]
    assert not sandbox_left(job_id, stack_env)
