"""The per-job audit trail: every audit line about a job, kept in Redis, uploaded beside its logs."""
from __future__ import annotations

import io
import logging
from typing import Any

import redis

from sandbox.layout import log_key
from sandbox.observability.logging import AUDIT_LOGGER, ContextFilter, SandboxJsonFormatter, _json_object

log = logging.getLogger("sandbox.observability")
AUDIT_FILE = "audit.jsonl"
MAX_LINES_PER_JOB = 10000  # a job cannot make the trail grow without bound


def audit_list_key(job_id: str) -> str:
    return f"sandbox:job:{job_id}:audit"


class AuditTrail(logging.Handler):
    """A handler on the sandbox.audit logger: each line about a job goes to that job's Redis list."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        super().__init__()
        self.redis = client
        self.ttl_s = ttl_s
        self.setFormatter(SandboxJsonFormatter())
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        event = _json_object(record.getMessage()) or {}
        job_id = event.get("job_id") or getattr(record, "job_id", None)
        if not isinstance(job_id, str) or not job_id:
            return
        try:
            key = audit_list_key(job_id)
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(key, self.format(record))
            pipe.ltrim(key, 0, MAX_LINES_PER_JOB - 1)
            pipe.expire(key, self.ttl_s)
            pipe.execute()
        except Exception:  # noqa: BLE001 - the line is in the process log anyway; never break the caller
            self.handleError(record)


def install(client: redis.Redis, ttl_s: int) -> AuditTrail:
    """Attach the trail to the audit logger (once per process)."""
    logger = logging.getLogger(AUDIT_LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, AuditTrail)]:
        logger.removeHandler(old)
    trail = AuditTrail(client, ttl_s)
    logger.addHandler(trail)
    return trail


def upload(client: redis.Redis, artifacts: Any, job_id: str) -> int | None:
    """Write the job's whole trail to jobs/{id}/logs/audit.jsonl (S3 has no append: the object is
    rewritten each time the trail grows); None when there is nothing or the upload failed."""
    lines = client.lrange(audit_list_key(job_id), 0, -1)
    if not lines:
        return None
    body = b"".join(line + b"\n" for line in lines)
    try:
        return artifacts.upload(log_key(job_id, AUDIT_FILE), io.BytesIO(body), job_id, size=len(body))
    except Exception as e:  # noqa: BLE001 - the lines stay in Redis and in the process log
        log.warning("could not upload the audit trail of job %s: %s: %s", job_id, type(e).__name__, e)
        return None
