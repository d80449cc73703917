"""Sweeps that beat runs: orphaned sandboxes, stuck jobs. They find work by labels, not memory."""
from __future__ import annotations

import logging
import time

from sandbox.lifecycle import Services
from sandbox.runtimes.base import SandboxHandle, SandboxInfo
from sandbox.state import JobStatus

log = logging.getLogger("sandbox.sweeps")
GRACE_S = 300.0  # leave a just-finished job's own cleanup time to run first


def sweep_orphans(svc: Services, now: float | None = None) -> list[str]:
    """Destroy this host's sandboxes whose job ended, vanished, or outlived its expiry."""
    now = time.time() if now is None else now
    destroyed = []
    for info in svc.runtime.list_sandboxes():
        pinned = getattr(svc.runtime, "pinned", True)  # a Fly machine is any worker's to sweep
        if (pinned and info.host != svc.host) or not _orphaned(svc, info, now):
            continue
        svc.runtime.destroy(_handle(svc, info))
        destroyed.append(info.sandbox_id)
        log.warning("destroyed orphaned sandbox %s of job %s", info.sandbox_id, info.job_id)
    for sandbox_id in svc.runtime.reap_incomplete(older_than=now - GRACE_S):
        destroyed.append(sandbox_id)
        log.warning("tore down half-created sandbox %s", sandbox_id)
    return destroyed


def _orphaned(svc: Services, info: SandboxInfo, now: float) -> bool:
    if info.expires_at + GRACE_S < now:
        return True
    record = svc.store.find(info.job_id)
    if record is None:
        return info.created_at + GRACE_S < now
    ended = JobStatus(record["status"]).terminal
    return ended and (record.get("finished_at") or now) + GRACE_S < now


def _handle(svc: Services, info: SandboxInfo) -> SandboxHandle:
    return SandboxHandle(sandbox_id=info.sandbox_id, job_id=info.job_id, runtime=svc.runtime.name,
                         host=info.host, created_at=info.created_at, expires_at=info.expires_at)


def sweep_stuck(svc: Services, max_idle_s: float, now: float | None = None) -> list[str]:
    """End as `error` every job that made no progress for `max_idle_s` (its worker was lost)."""
    now = time.time() if now is None else now
    ended = []
    for job_id in svc.store.active_ids():
        record = svc.store.find(job_id)
        if record is None or JobStatus(record["status"]).terminal or record["updated_at"] + max_idle_s > now:
            continue
        message = f"no progress for {int(now - record['updated_at'])} s in {record['status']}: its worker was lost"
        svc.store.transition(job_id, JobStatus.ERROR, error={"code": "stuck", "message": message, "field": None})
        ended.append(job_id)
        log.warning("ended stuck job %s: %s", job_id, message)
    return ended
