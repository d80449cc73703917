"""The per-job audit trail: every audit line about a job, kept in Redis, uploaded beside its logs."""
from __future__ import annotations

import atexit
import io
import logging
import os
import threading
import time
import weakref
from typing import Any

import redis

from sandbox.layout import log_key
from sandbox.observability.logging import AUDIT_LOGGER, ContextFilter, SandboxJsonFormatter, _json_object

log = logging.getLogger("sandbox.observability")
AUDIT_FILE = "audit.jsonl"
MAX_LINES_PER_JOB = 10000  # a job cannot make the trail grow without bound


def audit_list_key(job_id: str) -> str:
    return f"sandbox:job:{job_id}:audit"


FLUSH_DELAY_S = 0.05  # a line waits at most about this long in memory before it is in Redis
MAX_PENDING_LINES = 100_000  # lines kept in memory while Redis is unreachable; later ones only in the log
MAX_RETRY_S = 5.0  # the longest wait between writes while Redis stays unreachable


class AuditTrail(logging.Handler):
    """A handler on the sandbox.audit logger: each line about a job goes to that job's Redis list.

    Lines are kept in memory and written in batches (one pipelined round trip for all the lines
    waiting, where each line took one): by a background thread after FLUSH_DELAY_S, and at once
    by `flush(job_id)`, which a stage calls before it records its end and `upload` calls before
    it reads the trail, so a later stage in any process, and the upload, see every line."""

    def __init__(self, client: redis.Redis, ttl_s: int, flush_delay_s: float = FLUSH_DELAY_S) -> None:
        super().__init__()
        self.redis = client
        self.ttl_s = ttl_s
        self.flush_delay_s = flush_delay_s
        self.setFormatter(SandboxJsonFormatter())
        self.addFilter(ContextFilter())
        self._closed = False
        self._start()
        _trails.add(self)
        atexit.register(self.flush)

    def _start(self) -> None:
        self._pending: dict[str, list[str]] = {}  # job id -> lines not yet written, in order
        self._count = 0
        self._writing: set[str] = set()  # job ids of the batch being written (under _write_lock)
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one batch at a time: a job's lines land in order
        self._wake = threading.Event()
        self._failing = False  # a write failed and none succeeded since: warn once per outage
        self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
        self._thread.start()

    def _restart_after_fork(self) -> None:
        """In a forked child (a prefork pool's): a new flush thread, as only the forking thread lives
        on, and new locks, as a thread that is gone here may have held one. The lines that waited
        at the fork are dropped here: the parent writes them (twice would duplicate the trail)."""
        if not self._closed:
            self._start()

    def emit(self, record: logging.LogRecord) -> None:
        event = _json_object(record.getMessage()) or {}
        job_id = event.get("job_id") or getattr(record, "job_id", None)
        if not isinstance(job_id, str) or not job_id:
            return
        try:
            line = self.format(record)
            with self._pending_lock:
                if self._count >= MAX_PENDING_LINES:
                    return  # Redis has been away for long: the line is in the process log
                self._pending.setdefault(job_id, []).append(line)
                self._count += 1
            self._wake.set()
        except Exception:  # noqa: BLE001 - the line is in the process log anyway; never break the caller
            self.handleError(record)

    def flush(self, job_id: str | None = None) -> None:
        """Write the waiting lines (of `job_id` only, when given) in one round trip."""
        if job_id is not None:
            with self._pending_lock:
                if job_id not in self._pending and job_id not in self._writing:
                    return  # the common case: nothing of this job waits, and no batch is on its way
        with self._write_lock:
            with self._pending_lock:
                if job_id is None:
                    batch, self._pending = self._pending, {}
                else:
                    lines = self._pending.pop(job_id, None)
                    batch = {job_id: lines} if lines else {}
                self._count -= sum(len(lines) for lines in batch.values())
                self._writing = set(batch)
            if not batch:
                return
            try:
                pipe = self.redis.pipeline(transaction=False)
                for jid, lines in batch.items():
                    key = audit_list_key(jid)
                    pipe.rpush(key, *lines)
                    pipe.ltrim(key, 0, MAX_LINES_PER_JOB - 1)
                    pipe.expire(key, self.ttl_s)
                pipe.execute()
                if self._failing:
                    self._failing = False
                    log.warning("audit lines reach Redis again")
            except Exception as e:  # noqa: BLE001 - kept for the next batch; never break the caller
                with self._pending_lock:
                    for jid, lines in batch.items():
                        self._pending[jid] = lines + self._pending.get(jid, [])
                    self._count += sum(len(lines) for lines in batch.values())
                if not self._failing:
                    self._failing = True
                    log.warning("could not write %d audit lines to Redis (kept, retried with backoff up to "
                                "%g s): %s: %s", sum(len(v) for v in batch.values()), MAX_RETRY_S,
                                type(e).__name__, e)
            finally:
                with self._pending_lock:
                    self._writing = set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        try:
            self.flush()
        finally:
            super().close()

    def _run(self) -> None:
        retry_s = self.flush_delay_s
        while not self._closed:
            self._wake.wait()
            time.sleep(self.flush_delay_s)  # more lines come in bursts (a stage's uploads): one batch
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("audit trail flush failed")
            if self._pending and self._failing:
                time.sleep(retry_s)  # Redis away: do not spin (nor fill the log)
                retry_s = min(retry_s * 2, MAX_RETRY_S)
                self._wake.set()
            else:
                retry_s = self.flush_delay_s


_installed: AuditTrail | None = None
_trails: "weakref.WeakSet[AuditTrail]" = weakref.WeakSet()  # every live trail of this process


def _after_fork_in_child() -> None:
    for trail in list(_trails):
        trail._restart_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def install(client: redis.Redis, ttl_s: int) -> AuditTrail:
    """Attach the trail to the audit logger (once per process)."""
    global _installed
    logger = logging.getLogger(AUDIT_LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, AuditTrail)]:
        logger.removeHandler(old)
        old.close()
    trail = AuditTrail(client, ttl_s)
    logger.addHandler(trail)
    _installed = trail
    return trail


def flush(job_id: str) -> None:
    """Write this process's waiting audit lines of the job to Redis now (no round trip if none)."""
    trail = _installed
    if trail is not None:
        trail.flush(job_id)


def upload(client: redis.Redis, artifacts: Any, job_id: str, lines: list[bytes] | None = None) -> int | None:
    """Write the job's whole trail to jobs/{id}/logs/audit.jsonl (S3 has no append: the object is
    rewritten each time the trail grows); None when there is nothing or the upload failed.

    `lines`: the trail as the caller just read it (after `flush(job_id)`, nothing logged since), to
    save the read's round trip."""
    if lines is None:
        flush(job_id)
        lines = client.lrange(audit_list_key(job_id), 0, -1)
    if not lines:
        return None
    body = b"".join(line + b"\n" for line in lines)
    try:
        return artifacts.upload(log_key(job_id, AUDIT_FILE), io.BytesIO(body), job_id, size=len(body))
    except Exception as e:  # noqa: BLE001 - the lines stay in Redis and in the process log
        log.warning("could not upload the audit trail of job %s: %s: %s", job_id, type(e).__name__, e)
        return None
