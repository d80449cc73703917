"""sandbox.submit, the five stage tasks, the errback, and cancel."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from celery import Task, chain, states
from celery.exceptions import Ignore, Reject
from celery.worker.control import control_command

from config.settings import EXECUTE_HARD_MARGIN_S
from sandbox import collecting, lifecycle, sweeps
from sandbox.errors import JobNotFound, StaleDelivery, TransientError
from sandbox.observability import logging as obs_logging
from sandbox.observability import metrics
from sandbox.spec import JobSpec
from sandbox.state import JobStatus
from tasks import monitoring
from tasks.app import CREATE_SUFFIX, app, create_queue, node_queue, services

log = logging.getLogger("sandbox.tasks")

# Backend hiccups (S3 or Fly unreachable, throttled, 5xx) are worth retrying: every stage is
# idempotent. Celery's own retry (not tenacity) so the worker slot is free while it waits and the
# retry survives a worker restart; tenacity retries single calls inside storage and webhooks.
# The retry is explicit rather than autoretry_for so that the last failure becomes the job's
# outcome: the stage records it and returns, the chain goes on to cleanup (which destroys the
# sandbox and returns the terminal record to the submit task's waiters). Were the stage to raise,
# Celery would mark the rest of the chain failed and the waiters would get an exception instead.
MAX_RETRIES = 5
BACKOFF_S = (2, 4, 8, 16, 32)
# A create this node cannot admit waits this long in its thread for capacity to come back (in FIFO
# order, released capacity wakes it at once), then goes back to the queue for any node to take.
ADMIT_WAIT_S = 5.0
# The success lines of submit and cleanup never show their record (tasks.monitoring): Celery need
# not repr 1024 characters of a record for each (a duplicate submit's Flower result shows this many).
RECORD_REPR_CHARS = 64


def run_stage(task: Task, stage: Callable[..., Any], job_id: str, notify: bool = False, **kwargs: Any) -> Any:
    """Run one lifecycle stage; transient errors retry, anything else ends the job as `error`.
    Returns what the stage returned (None if it failed). `notify`: the job asked for every transition."""
    name = stage.__name__
    result = None
    try:
        result = stage(services(), job_id, **kwargs)
    except StaleDelivery as stale:
        # a copy of a stage the job has moved past (or of its running execute): it changed nothing,
        # and Ignore keeps Celery from sending a second copy of the later stages after it
        log.warning("stage %s: %s; dropped the copy", name, stale)
        raise Ignore() from stale
    except JobNotFound:
        # The record is gone (a Redis that lost data): nothing may outlive it on this host.
        log.error("stage %s: job %s has no record; tearing its sandbox down", name, job_id)
        sweeps.abandon(services(), job_id)
        raise
    except TransientError as exc:
        if task.request.retries < MAX_RETRIES:
            raise task.retry(exc=exc, countdown=BACKOFF_S[task.request.retries], max_retries=MAX_RETRIES)
        lifecycle.fail(services(), job_id, name, exc)
    except Exception as exc:  # noqa: BLE001 - any other failure is the job's end, with its reason
        log.exception("stage %s of job %s failed", name, job_id)
        lifecycle.fail(services(), job_id, name, exc)
    if notify:
        _notify_transitions(job_id)
    return result


@app.task(name="sandbox.submit", bind=True, ignore_result=True, resultrepr_maxsize=RECORD_REPR_CHARS)
def submit(self, job: Any) -> dict | None:
    """Validate and record a job, build its sandbox here when this node admits it at once, then send
    the rest of its stages; the result is the final record."""
    svc = services()
    record, run = lifecycle.submit(svc, job, self.request.id)
    if not run:
        first = lifecycle.unsent_from(record, self.request.id)
        if first is not None:
            # this very submit died before (or while) it sent the stages: send them now (a cancelled
            # job's too: its collect keeps the logs, its cleanup destroys the sandbox and answers)
            spec = svc.store.spec(record["id"])
            queue = node_queue(record["sandbox"]["host"]) if first == "prepare" else create_queue(_intake(self))
            _send(self, pipeline(record["id"], float(spec["timeout_s"]), _wants_all(record), first=first, queue=queue))
            return None
        if record.get("submit_task_id") == self.request.id and not JobStatus(record["status"]).terminal:
            # this very submit, redelivered: its stages began (they carry its result), or it died
            # while building the sandbox, and the node's reconcile or the stuck sweep ends the job
            raise Ignore()
        self.backend.store_result(self.request.id, record, states.SUCCESS, request=self.request)
        return record
    job_id = record["id"]
    notify = _wants_all(record)
    if notify:
        _notify_transitions(job_id)
    spec = svc.store.spec(job_id)
    created = _create_here(job_id, spec, notify)
    lifecycle.dispatched(svc, job_id)  # a redelivered submit builds nothing; it re-sends only unbegun stages
    if created:  # the rest goes where create would have sent it: this node's own queue
        _send(self, pipeline(job_id, float(spec["timeout_s"]), notify, first="prepare", queue=node_queue(svc.host)))
    else:  # the job waits in `<intake>.create` for any node that admits it, as every job used to
        _send(self, pipeline(job_id, float(spec["timeout_s"]), notify, queue=create_queue(_intake(self))))
    return None


def _wants_all(record: dict) -> bool:
    """The job asked to be told of every transition."""
    return record.get("callback_events") == "all" and bool(record.get("callback_url"))


def _create_here(job_id: str, spec: dict, notify: bool) -> bool:
    """Run the create stage inside sandbox.submit when this node admits the job at once: one task
    and one queue hop fewer per job. False (nothing held, the job still `queued`) when the job
    should wait for admission in `<intake>.create` as before, or the create task should retry it.

    Only a pinned runtime's (local) jobs: its later stages run on this node anyway, and admission
    bounds the sandboxes a burst of submits builds. A Fly machine is no node's (no admission): a
    burst of submits would start every machine before any job's prepare, so its create stays a
    task of its own, taken after the intake's in-flight stages and submits.
    """
    svc = services()
    if svc.admission is None or not svc.settings.create_in_submit:
        return False
    if svc.admission.waiting:
        return False  # creates of this process wait for capacity: never overtake them
    started = time.monotonic()
    token = obs_logging.bind(stage="create")
    try:
        done = lifecycle.create(svc, job_id, admit_wait_s=0.0, spec=JobSpec.from_dict(spec))
    except StaleDelivery as stale:
        # the job's stages already run elsewhere: this submit sends nothing (never a second chain)
        log.warning("create of job %s in its submit: %s; dropped", job_id, stale)
        raise Ignore() from stale
    except JobNotFound:
        log.error("stage create: job %s has no record; tearing its sandbox down", job_id)
        sweeps.abandon(svc, job_id)
        raise
    except TransientError as exc:
        # create released what it took: the create task retries with its backoff, as it always did
        log.warning("create of job %s in its submit failed (%s); the create task retries it", job_id, exc)
        return False
    except Exception as exc:  # noqa: BLE001 - any other failure is the job's end, as in run_stage
        log.exception("stage create of job %s failed", job_id)
        lifecycle.fail(svc, job_id, "create", exc)
        done = True
    finally:
        obs_logging.unbind(token)
    if done:
        # what the create task's task_postrun recorded (tasks.monitoring): its stage duration
        metrics.stage_finished("create", time.monotonic() - started)
        if notify:
            _notify_transitions(job_id)
    return done


def _send(task: Task, stages: chain) -> None:
    """Send the job's stages; the last (cleanup) takes the submit task's id."""
    # The chain's last task (cleanup) takes this task's id, so its final record is what the
    # submitter's waiters get: what self.replace() does, without its signature copies. No success
    # event for this id may precede cleanup's (Flower's row is the job's): replace raises Ignore for
    # that, whose ExceptionInfo copied trace_task's code positions (~2 ms of worker CPU per job);
    # returning and dropping that one event (tasks.monitoring) costs nothing.
    stages.apply_async(task_id=task.request.id, root_id=task.request.root_id, parent_id=task.request.id)
    monitoring.handed_on(task.request.id)


STAGE_ORDER = ("create", "prepare", "execute", "collect", "cleanup")


def pipeline(job_id: str, timeout_s: float, notify: bool = False, first: str = "create",
             queue: str | None = None) -> chain:
    """The job's stages from `first` to cleanup, with the errback on each, all sent to `queue`.
    From create: `queue` is the one every node admits from, and create routes the later stages to
    its own node when the runtime is pinned (to the intake otherwise)."""
    # Celery's time limits do not apply under the threads pool: the runtime enforces the job's own
    # timeout, and these are the backstop only where a worker runs the prefork pool.
    execute_limits = dict(soft_time_limit=timeout_s + EXECUTE_HARD_MARGIN_S / 2, time_limit=timeout_s + EXECUTE_HARD_MARGIN_S)
    # Only a job that asked for every transition pays a record read per stage to find new ones.
    extra = {"notify": True} if notify else {}
    routed = {"queue": queue} if queue else {}
    steps = {"create": create.si(job_id, **extra).set(**routed),
             "prepare": prepare.si(job_id, **extra),
             "execute": execute.si(job_id, **extra).set(**execute_limits),
             "collect": collect.si(job_id, **extra),
             "cleanup": cleanup.si(job_id, **extra)}
    chosen = [steps[name] for name in STAGE_ORDER[STAGE_ORDER.index(first):]]
    if first != "create" and queue:
        chosen = [step.set(queue=queue) for step in chosen]
    return chain(*chosen).on_error(on_stage_error.s())


def _intake(task: Task) -> str:
    """The intake queue a job came in on (its create waited on `<intake>.create`)."""
    queue = (task.request.delivery_info or {}).get("routing_key") or app.conf.task_default_queue
    return queue[: -len(CREATE_SUFFIX)] if queue.endswith(CREATE_SUFFIX) else queue


def _route_rest_of_chain(task: Task, queue: str) -> None:
    """Send the chain's remaining stages to `queue` (request.chain is what Celery sends on from)."""
    for step in task.request.chain or []:
        options = step.setdefault("options", {})
        options.pop("exchange", None)
        options.pop("routing_key", None)
        options["queue"] = queue


# Results are stored only where someone reads them: cleanup carries the submit task's id (its
# record is what sandbox.submit's waiters get), cancel answers its caller. Every other stage's
# result would be one more Redis write per stage that nobody reads.
@app.task(name="sandbox.create", bind=True, ignore_result=True)
def create(self, job_id: str, notify: bool = False) -> str:
    """Admit and build the sandbox on this node; not admissible yet: back to the queue, untouched."""
    svc = services()
    if getattr(svc.runtime, "pinned", True):
        _route_rest_of_chain(self, node_queue(svc.host))
    else:  # any worker of the job's intake may drive its machine: the stages stay there
        _route_rest_of_chain(self, _intake(self))
    if run_stage(self, lifecycle.create, job_id, notify, admit_wait_s=ADMIT_WAIT_S, token=self.request.id) is False:
        raise Reject(f"job {job_id} not admitted on {svc.host} yet", requeue=True)
    return job_id


@app.task(name="sandbox.prepare", bind=True, ignore_result=True)
def prepare(self, job_id: str, notify: bool = False) -> str:
    run_stage(self, lifecycle.prepare, job_id, notify, token=self.request.id)
    return job_id


@app.task(name="sandbox.execute", bind=True, ignore_result=True)
def execute(self, job_id: str, notify: bool = False) -> str:
    run_stage(self, lifecycle.execute, job_id, notify, token=self.request.id)
    return job_id


@app.task(name="sandbox.collect", bind=True, ignore_result=True)
def collect(self, job_id: str, notify: bool = False) -> str:
    run_stage(self, collecting.collect, job_id, notify)
    return job_id


@app.task(name="sandbox.cleanup", bind=True, resultrepr_maxsize=RECORD_REPR_CHARS)
def cleanup(self, job_id: str, notify: bool = False) -> dict:
    """Always destroys the sandbox; the terminal record it returns is what sandbox.submit yields."""
    record = run_stage(self, lifecycle.cleanup, job_id, notify) or services().store.get(job_id)
    _notify(record)
    return record


@app.task(name="sandbox.on_stage_error", ignore_result=True)
def on_stage_error(request, exc, traceback) -> None:
    """Safety net for what run_stage cannot catch (a hard time limit): runs in the failing stage's
    worker, so on the sandbox's host; the chain's later stages never run after it."""
    job_id, stage = request.args[0], request.task.rsplit(".", 1)[-1]
    record = lifecycle.fail(services(), job_id, stage, exc)
    if record is None:
        return
    announce_end(record)


def announce_end(record: dict) -> None:
    """Tell a job's ending to its sandbox.submit waiters, its webhook and the metrics, as cleanup does."""
    # Celery calls the errback directly and sweeps end jobs outside any stage: no task signal
    # fires for either, so the job is counted here.
    monitoring.job_finished(record)
    if record.get("submit_task_id"):
        # The chain's last task carries the submit task's id: give its waiters the final record.
        app.backend.store_result(record["submit_task_id"], record, states.SUCCESS)
    _notify(record)


@app.task(name="sandbox.cancel")
def cancel(job_id: str) -> dict:
    """Cancel a job at any stage (workers run this on a consumer side thread, tasks.consumer)."""
    return cancel_job(job_id)


def cancel_job(job_id: str) -> dict:
    """One atomic cancel, the kill on the sandbox's own host, and the truthful answer."""
    answer = lifecycle.cancel(services(), job_id)
    node = answer.pop("kill_on", None)
    if node:
        # A remote-control command runs in the node's main process, so the kill never waits
        # behind busy pool slots the way a task on the node's queue would.
        replies = app.control.broadcast("sandbox_kill", arguments={"job_id": job_id}, destination=[node],
                                        reply=True, timeout=10)
        answer["killed_on"] = [name for reply in replies or [] for name in reply]
    return lifecycle.settle_cancel(services(), job_id, answer)


def give_up(job_id: str, reason: str) -> dict | None:
    """End a job whose stage was delivered more than SANDBOX_MAX_DELIVERIES times."""
    record = sweeps.give_up(services(), job_id, reason)
    if record is not None:
        announce_end(record)
    return record


@control_command(args=[("job_id", str)], signature="<job_id>")
def sandbox_kill(state: Any, job_id: str) -> dict:
    """Kill a job's sandbox on this node (the remote half of sandbox.cancel)."""
    lifecycle.kill(services(), job_id)
    return {"ok": f"killed {job_id}"}


@app.task(name="sandbox.notify", autoretry_for=(TransientError,), retry_backoff=5, max_retries=8)
def notify(job_id: str, event_type: str = "job.terminal", transition: dict | None = None) -> list[dict]:
    """Deliver the terminal record (or one transition) to the job's callback_url; returns the attempts."""
    return lifecycle.notify(services(), job_id, event_type, transition)


def _notify_transitions(job_id: str) -> None:
    for transition in lifecycle.transitions_to_notify(services(), job_id):
        notify.delay(job_id, "job.status", transition)


def _notify(record: dict) -> None:
    if record.get("callback_url"):
        notify.delay(record["id"])
