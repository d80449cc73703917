"""Celery's side of operations: JSON logs, the metrics endpoint, each task's log context, counting
each job once, and what Flower shows per stage (the job id; at the end its status and reason).

Everything here hangs off Celery signals, so the stage tasks themselves stay one line each.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any

import redis
from celery import Task, signals, states
from celery.worker.request import Request

from config import load_settings
from sandbox.observability import audit, metrics
from sandbox.observability import logging as obs_logging
from sandbox.observability.cluster import SENT_AT_HEADER, Cluster
from sandbox.observability.gauges import ClusterCollector, NodeCollector
from sandbox.observability.server import Liveness, serve
from sandbox.spec import job_id_of

log = logging.getLogger("sandbox.observability")
audit_log = logging.getLogger(obs_logging.AUDIT_LOGGER)
STAGES = ("sandbox.create", "sandbox.prepare", "sandbox.execute", "sandbox.collect", "sandbox.cleanup")
_JOB_ID_FIRST = set(STAGES) | {"sandbox.notify", "sandbox.cancel"}
_RECORD_RESULTS = ("sandbox.submit", "sandbox.cleanup")  # their results are whole job records
RECORD_REPR_CHARS = 64  # of a job record's repr, in what Celery shows only where no summary replaced it
_MAX_ID_PARSE_BYTES = 256 * 1024  # a submit bigger than this shows as job=? in Flower (its stages don't)
_UNSAFE = re.compile(r"[^\w .,:;=/()+@%-]")
_settings = load_settings()
_running: dict[str, tuple[Any, float]] = {}
_summaries: dict[str, str] = {}
_handed_on: set[str] = set()
_endpoint: dict[str, Any] = {}
_lock = threading.Lock()


def _services() -> Any:
    from tasks.app import services  # late: tasks.app names this module as its task class's home

    return services()


# -- logs ------------------------------------------------------------------------------------------

if not logging.getLogger().handlers:
    # Lines before Celery sets logging up (its superuser warning, import-time warnings) in the same format.
    obs_logging.set_node(_settings.node_name)
    obs_logging.configure(_settings.log_format, logging.WARNING, stream=sys.__stderr__)
    logging.captureWarnings(True)

@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Celery configures nothing once a receiver exists: the handler writes to the real stderr, and
    # stray prints and warnings become log lines too, so every line of a worker or beat is one format.
    obs_logging.set_node(_settings.node_name)
    obs_logging.configure(_settings.log_format, loglevel or logging.INFO, stream=sys.__stderr__)
    logging.captureWarnings(True)
    logging.getLogger("celery.app.trace").addFilter(_no_records_in_success_lines)
    # "Task … received" (Celery's strategy, once per task: six per job) costs a JSON line per task and
    # says what Flower's task-received event says; "succeeded in <runtime>" (or the failure) stays the
    # line per task. At DEBUG both come back.
    if _level(loglevel) > logging.DEBUG:
        logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    from tasks.app import app

    app.log.redirect_stdouts_to_logger(logging.getLogger("celery.redirected"), loglevel=logging.WARNING)


def _level(loglevel: Any) -> int:
    if isinstance(loglevel, str):
        named = logging.getLevelName(loglevel.upper())
        return named if isinstance(named, int) else logging.INFO
    return loglevel or logging.INFO


def _no_records_in_success_lines(record: logging.LogRecord) -> bool:
    # "Task sandbox.cleanup[..] succeeded: {record}" would log presigned URLs: say where it is instead.
    args = record.args
    if isinstance(args, dict) and args.get("name") in _RECORD_RESULTS and "return_value" in args:
        record.args = {**args, "return_value": "(the job record)"}
    return True


@signals.before_task_publish.connect
def _stamp_sent_at(headers: dict | None = None, **_: Any) -> None:
    # kombu keeps no enqueue time: the oldest-message-age gauge and health read this header.
    if isinstance(headers, dict):
        headers.setdefault(SENT_AT_HEADER, time.time())


# -- the node's endpoint ------------------------------------------------------------------------------

def start_endpoint(node: str) -> None:
    """Name the node in log lines, send audit lines to Redis, serve the metrics endpoint (at start-up,
    before the reconcile logs anything: tasks.nodes runs it)."""
    obs_logging.set_node(node)
    client = redis.Redis.from_url(_settings.redis_url, health_check_interval=30)
    audit.install(client, _settings.record_ttl_s)
    if not _settings.metrics_port or _endpoint:
        return
    from prometheus_client import REGISTRY

    fresh_s = 3 * float(getattr(_settings, "heartbeat_interval_s", 10.0))
    REGISTRY.register(ClusterCollector(Cluster(client), fresh_s))
    REGISTRY.register(NodeCollector(node, lambda: _services().runtime.list_sandboxes(), _waiting_creates))
    _endpoint["liveness"] = liveness = Liveness(node)
    try:
        _endpoint["server"] = serve(_settings.metrics_host, _settings.metrics_port, liveness)
    except OSError as e:  # the worker still works; the scrape target's `up` == 0 pages someone
        log.error("no metrics endpoint on %s:%d: %s", _settings.metrics_host, _settings.metrics_port, e)


def _waiting_creates() -> int | None:
    admission = _services().admission
    return None if admission is None else admission.waiting


@signals.worker_ready.connect
def _consuming(**_: Any) -> None:
    # Not part of start-up (tasks.nodes): this is the later moment the consumer really consumes.
    if "liveness" in _endpoint:
        _endpoint["liveness"].consuming = True


@signals.worker_shutting_down.connect
def _stopping(**_: Any) -> None:
    if "liveness" in _endpoint:
        _endpoint["liveness"].stopping = True


# -- each task: log context, durations, counting each job once ------------------------------------------

def _job_id(name: str, args: Any) -> str | None:
    if not args:
        return None
    first = args[0]
    if name in _JOB_ID_FIRST:
        return first if isinstance(first, str) else None
    if name == "sandbox.submit":
        size = len(first) if isinstance(first, (str, bytes)) else 0
        return job_id_of(first) if size <= _MAX_ID_PARSE_BYTES else None
    return None


@signals.task_prerun.connect
def _task_started(task_id: str, task: Task, args: Any = (), **_: Any) -> None:
    stage = task.name.rsplit(".", 1)[-1] if task.name in STAGES else None
    token = obs_logging.bind(job_id=_job_id(task.name, args), stage=stage, task_id=task_id)
    _running[task_id] = (token, time.monotonic())


@signals.task_postrun.connect
def _task_ended(task_id: str, task: Task, args: Any = (), retval: Any = None, state: str | None = None,
                **_: Any) -> None:
    token, started = _running.pop(task_id, (None, time.monotonic()))
    try:
        if state == states.SUCCESS:
            _after(task.name, task_id, args, retval, time.monotonic() - started)
    except Exception:  # noqa: BLE001 - counting must never fail a job
        log.exception("operations hook after %s failed", task.name)
    finally:
        if token is not None:
            obs_logging.unbind(token)


def _after(name: str, task_id: str, args: Any, retval: Any, duration_s: float) -> None:
    if name in STAGES:
        metrics.stage_finished(name.rsplit(".", 1)[-1], duration_s)
        _remember_summary(task_id, summary(args[0], retval if name == "sandbox.cleanup" else None))
    if name == "sandbox.cleanup" and isinstance(retval, dict):
        job_finished(retval)
    elif name == "sandbox.submit" and isinstance(retval, dict) and retval.get("status") == "rejected":
        # once per submit message: a rejection may carry the id of another, running job
        job_finished(retval, once_key=f"sandbox:submit:{task_id}:metered")
        _remember_summary(task_id, summary(retval.get("id"), retval))
    elif name == "sandbox.submit" and isinstance(retval, dict) and retval.get("status") == "cancelled":
        # cancelled before its submit ran: no cleanup will count it (once per job, as cleanup's is)
        job_finished(retval)
    elif name == "sandbox.notify":
        metrics.webhooks_delivered(retval or [])
    elif name == "sandbox.cancel" and isinstance(retval, dict):
        audit_log.info(json.dumps({"op": "cancel", "job_id": retval.get("job_id"), "outcome":
                                   "cancelled" if retval.get("cancelled") else "unchanged",
                                   "status": retval.get("status")}, sort_keys=True))
    elif name in ("sandbox.sweep_stuck", "sandbox.sweep_node"):
        _swept(name, retval or [])


TERMINAL = ("succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error")


def job_finished(record: dict[str, Any], once_key: str | None = None) -> None:
    """Count a terminal job once (a redelivered cleanup must not count it twice) and ship its audit trail."""
    if record.get("status") not in ("rejected", *TERMINAL):
        return
    svc = _services()
    job_id = record["id"]
    once_key = once_key or f"sandbox:job:{job_id}:metered"
    # the rejection itself was audited when it happened
    events = [e for e in record.get("security_events") or [] if e.get("type") != "rejected"]
    upload = record.get("status") != "rejected"  # a rejection has no sandbox and no logs; its line is in the log
    lines = None
    if upload and not events:
        # Most jobs log nothing more here: the trail is whole now, so the count's claim and the
        # trail's read are one round trip (the read is wasted only on a redelivered cleanup).
        audit.flush(job_id)
        pipe = svc.store.redis.pipeline(transaction=False)
        pipe.set(once_key, 1, nx=True, ex=svc.settings.record_ttl_s)
        pipe.lrange(audit.audit_list_key(job_id), 0, -1)
        first, lines = pipe.execute()
    else:
        first = svc.store.redis.set(once_key, 1, nx=True, ex=svc.settings.record_ttl_s)
    if not first:
        return
    runtime = (record.get("sandbox") or {}).get("runtime") or svc.settings.runtime
    metrics.job_finished(record, runtime)
    for event in events:
        audit_log.warning(json.dumps({"op": "security_event", "job_id": job_id, **event}, sort_keys=True, default=str))
    if upload:
        audit.upload(svc.store.redis, svc.artifacts, job_id, lines)


def _swept(name: str, ended: list[str]) -> None:
    sweep = "stuck" if name == "sandbox.sweep_stuck" else "orphans"
    metrics.swept(sweep, len(ended))
    svc = _services()
    for item in ended:
        job_id = item if sweep == "stuck" else item.removeprefix("sbx-")
        audit_log.warning(json.dumps({"op": "sweep_destroy" if sweep == "orphans" else "sweep_end",
                                      "sweep": sweep, "job_id": job_id, "sandbox_id": item if sweep == "orphans" else None},
                                     sort_keys=True))
        record = svc.store.find(job_id)
        if record is None:
            continue
        if sweep == "stuck":
            job_finished(record)
        else:
            audit.upload(svc.store.redis, svc.artifacts, job_id)


# -- Flower: which job a row belongs to, and how the job ended ------------------------------------------

def summary(job_id: Any, record: dict[str, Any] | None) -> str:
    """`job=<id>`, and for a terminal record its status, exit code and reason (never env or files)."""
    text = f"job={job_id}"
    if not record:
        return text
    text += f" status={record.get('status')}"
    if record.get("exit_code") is not None:
        text += f" exit={record['exit_code']}"
    error = record.get("error") or {}
    reason = error.get("message") or (record.get("outcome") or {}).get("reason")
    if error.get("field"):
        reason = f"{error['field']} ({error.get('rule')}): {reason}"
    # Flower renders this as HTML and the reason may quote job-chosen text (a key, a path): plain words only
    return text + (f" reason={_UNSAFE.sub('?', str(reason))[:200]!r}" if reason else "")


def _remember_summary(task_id: str, text: str) -> None:
    with _lock:
        if len(_summaries) > 1000:  # a prefork child never hands them to its parent: do not grow
            _summaries.clear()
        _summaries[task_id] = text


def handed_on(task_id: str) -> None:
    """sandbox.submit handed its id on to the job's cleanup: its own success is no event (Flower's row
    for the id is the job's, and cleanup's success ends it)."""
    with _lock:
        if len(_handed_on) > 1000:
            _handed_on.clear()
        _handed_on.add(task_id)


class JobRequest(Request):
    """Flower's args column says which job a task is for, its result column how the job ended."""

    @property
    def argsrepr(self) -> str:
        job_id = _job_id(self.name, self.args)
        if self.name in _JOB_ID_FIRST or self.name == "sandbox.submit":
            return f"job={job_id or '?'}"
        return super().argsrepr

    def send_event(self, type: str, **fields: Any) -> None:  # noqa: A002 - Celery's name
        if type == "task-succeeded":
            with _lock:
                if self.name == "sandbox.submit" and self.id in _handed_on:
                    _handed_on.discard(self.id)
                    return
                text = _summaries.pop(self.id, None)
            if text is not None:
                fields["result"] = text
        super().send_event(type, **fields)


class SandboxTask(Task):
    """The app's task class: Flower's args column says `job=<id>`, from the sender's task-sent event
    (chain links are sent by the worker running the previous stage) and from the worker's own."""

    Request = "tasks.monitoring:JobRequest"

    @property
    def resultrepr_maxsize(self) -> int:  # type: ignore[override]
        # Celery reprs every return value (its success line and task-succeeded event); a job record
        # took ~0.2 ms to repr, and both places say "(the job record)" or the job's summary instead.
        return RECORD_REPR_CHARS if self.name in _RECORD_RESULTS else Task.resultrepr_maxsize

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if self.name in _JOB_ID_FIRST and args and isinstance(args[0], str):
            options.setdefault("argsrepr", f"job={args[0]}")
        return super().apply_async(args, kwargs, **options)
