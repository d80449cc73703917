"""The chain's errback (a stage that failed past run_stage) counts its job: Celery calls it directly,
so no task signal fires for it. Real Redis and S3; the errback runs in this process as a worker would."""
from __future__ import annotations

import json
from types import SimpleNamespace

from config.wiring import build_services
from tests.conftest import new_job_id


def test_errback_counts_the_job_once(stack_env, monkeypatch):
    for key, value in stack_env.items():
        monkeypatch.setenv(key, value)
    import importlib

    from sandbox import lifecycle
    from sandbox.observability import metrics
    from tasks.stages import on_stage_error

    monkeypatch.setattr(importlib.import_module("tasks.app"), "_services", {})  # this test's stack, not whatever was built before
    svc = build_services()
    job_id = new_job_id("errback")
    record, run = lifecycle.submit(svc, json.dumps({"id": job_id, "command": "ls"}), "t-errback")
    assert run
    # no waiter to hand the record to: this process's Celery app may point at another test's broker
    svc.store.update(job_id, lambda r: r.update(submit_task_id=None))
    counted = metrics.JOBS.labels(status="error", runtime="local")._value.get()
    failed = metrics.STAGE_FAILURES.labels(stage="create")._value.get()

    request = SimpleNamespace(args=[job_id], task="sandbox.create")
    on_stage_error(request, RuntimeError("hard time limit"), None)
    on_stage_error(request, RuntimeError("hard time limit"), None)  # a second call counts nothing

    assert svc.store.get(job_id)["status"] == "error"
    assert metrics.JOBS.labels(status="error", runtime="local")._value.get() == counted + 1
    assert metrics.STAGE_FAILURES.labels(stage="create")._value.get() == failed + 1
