"""sandbox.submit, the five stage tasks, the errback, and cancel."""
from __future__ import annotations

from typing import Any

from celery import chain, states

from sandbox import lifecycle
from sandbox.errors import TransientError
from tasks.app import app, node_queue, services

# Backend hiccups (S3 or Fly unreachable, throttled, 5xx) are worth retrying: every stage is
# idempotent. Celery's own retry (not tenacity) so the worker slot is free while it waits and the
# retry survives a worker restart; tenacity retries single calls inside storage and webhooks.
RETRY = dict(autoretry_for=(TransientError,), retry_backoff=2, retry_backoff_max=60, retry_jitter=True,
             max_retries=5)
EXECUTE_GRACE_S = 60


@app.task(name="sandbox.submit", bind=True)
def submit(self, job: Any) -> dict:
    """Validate and record a job, then become its five-stage canvas; the result is the final record."""
    record, run = lifecycle.submit(services(), job, self.request.id)
    if not run:
        return record
    timeout_s = float(services().store.spec(record["id"])["timeout_s"])
    raise self.replace(pipeline(record["id"], services().host, timeout_s))


def pipeline(job_id: str, node: str, timeout_s: float) -> chain:
    """create → prepare → execute → collect → cleanup, all on `node`, with the errback on each."""
    queue = node_queue(node)
    execute_limits = dict(soft_time_limit=timeout_s + EXECUTE_GRACE_S, time_limit=timeout_s + 2 * EXECUTE_GRACE_S)
    return chain(
        create.si(job_id).set(queue=queue),
        prepare.si(job_id).set(queue=queue),
        execute.si(job_id).set(queue=queue, **execute_limits),
        collect.si(job_id).set(queue=queue),
        cleanup.si(job_id).set(queue=queue),
    ).on_error(on_stage_error.s())


@app.task(name="sandbox.create", **RETRY)
def create(job_id: str) -> str:
    lifecycle.create(services(), job_id)
    return job_id


@app.task(name="sandbox.prepare", **RETRY)
def prepare(job_id: str) -> str:
    lifecycle.prepare(services(), job_id)
    return job_id


@app.task(name="sandbox.execute", bind=True, **RETRY)
def execute(self, job_id: str) -> str:
    lifecycle.execute(services(), job_id, token=self.request.id)
    return job_id


@app.task(name="sandbox.collect", **RETRY)
def collect(job_id: str) -> str:
    lifecycle.collect(services(), job_id)
    return job_id


@app.task(name="sandbox.cleanup", **RETRY)
def cleanup(job_id: str) -> dict:
    record = lifecycle.cleanup(services(), job_id)
    _notify(record)
    return record


@app.task(name="sandbox.on_stage_error")
def on_stage_error(request, exc, traceback) -> None:
    """Runs in the failing stage's worker (so on the sandbox's host); later stages never run."""
    job_id, stage = request.args[0], request.task.rsplit(".", 1)[-1]
    record = lifecycle.fail(services(), job_id, stage, exc)
    if record is None:
        return
    if record.get("submit_task_id"):
        # The chain's last task carries the submit task's id: give its waiters the final record.
        app.backend.store_result(record["submit_task_id"], record, states.SUCCESS)
    _notify(record)


@app.task(name="sandbox.cancel")
def cancel(job_id: str) -> dict:
    """Cancel a job at any stage; its sandbox is killed on its own host, cleanup still runs."""
    answer = lifecycle.cancel(services(), job_id)
    if answer.pop("kill_on", None):
        kill.apply_async((job_id,), queue=node_queue(services().store.get(job_id)["sandbox"]["host"]))
    return answer


@app.task(name="sandbox.kill")
def kill(job_id: str) -> None:
    lifecycle.kill(services(), job_id)


@app.task(name="sandbox.notify", autoretry_for=(TransientError,), retry_backoff=5, max_retries=8)
def notify(job_id: str) -> None:
    """Deliver the terminal record to the job's callback_url, if it named one."""
    lifecycle.notify(services(), job_id)


def _notify(record: dict) -> None:
    if record.get("callback_url"):
        notify.delay(record["id"])
