"""Cancel: a running job's sandbox is killed at once, it ends `cancelled`, and cleanup still runs."""
from __future__ import annotations

import json

from tests.conftest import new_job_id, wait_for
from tests.e2e.test_pipeline import assert_cleaned_up
from tests.support.services import Worker


def status_of(redis_client, job_id: str) -> str | None:
    raw = redis_client.get(f"sandbox:job:{job_id}")
    return json.loads(raw)["status"] if raw else None


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
    assert answer == {"job_id": "no-such-job", "cancelled": False, "status": None, "message": "no such job"}


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
