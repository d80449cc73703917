"""Services, and the bookkeeping every stage shares: its start and end, its sandbox, its spec.

Split out of sandbox.lifecycle so that the stages living in their own modules (sandbox.collecting)
share it without importing lifecycle's private names.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from config.settings import Settings
from sandbox.admission import Admission
from sandbox import nodes
from sandbox.errors import PlacementError, StaleDelivery
from sandbox.observability import audit as audit_trail
from sandbox.runtimes.base import Runtime, SandboxHandle
from sandbox.spec import JobSpec
from sandbox.state import JobRecord, JobStatus, JobStore, moved_past


@dataclass
class Services:
    """What the stages work with; built once per worker process by config.wiring."""

    settings: Settings
    store: JobStore
    runtime: Runtime
    artifacts: Any  # sandbox.storage.ArtifactStore
    events: Any  # sandbox.events.EventBus
    host: str
    admission: Admission | None = None  # None where sandboxes do not use this node (unpinned runtimes)


def begin(svc: Services, job_id: str, stage: str, status: JobStatus) -> JobRecord | None:
    """Mark a stage started; None when the job already ended (cancelled) and the stage should skip.

    Raises StaleDelivery, having written nothing, when the job already moved past `status`: this
    delivery is a copy (a publish retried after a lost reply, a restore after a lost ack), and
    running the stage again would touch the live sandbox and send a second copy of the later stages.
    A delivery at the stage's own status (a retry, a redelivery) runs again, as every stage is idempotent."""
    record = svc.store.transition(job_id, status, also=stage_start(svc, stage),
                                  only_if=lambda r: not moved_past(r, status))
    if JobStatus(record["status"]).terminal:
        return None
    stale_unless(record, stage, status)
    return record


def stale_unless(record: JobRecord, stage: str, status: JobStatus) -> None:
    """Raise StaleDelivery when the job (not ended) has moved past the stage's own `status`."""
    if moved_past(record, status):
        raise StaleDelivery(f"{stage} of job {record['id']} delivered again once the job was {record['status']}")


def live_holder(svc: Services, record: JobRecord, stage: str, token: str) -> bool:
    """True when another task (not `token`) began `stage`, has not finished it, and may still run
    it: its process lives on this host, or its node still beats. Such a delivery is a live copy."""
    entry = record.get("stages", {}).get(stage) or {}
    if entry.get("started_at") is None or entry.get("finished_at") is not None:
        return False
    if entry.get("token") in (None, token):  # this very task again (a retry, a redelivery)
        return False
    if entry.get("host") == svc.host:
        return nodes.process_alive(entry.get("pid"), entry["started_at"])
    beat = nodes.heartbeat(svc.store.redis, entry.get("host"))
    return not nodes.is_dead(beat, svc.settings.node_dead_after_s, time.time())


def stage_start(svc: Services, stage: str, token: str | None = None) -> Callable[[JobRecord], None]:
    """The record change that marks `stage` started on this host, by this process (and task `token`)."""
    now = time.time()

    def start(r: JobRecord) -> None:
        entry = r["stages"].setdefault(stage, {"attempts": 0})
        # pid: a restarted node tells a stage of its dead process from one of a live one (sandbox.nodes)
        entry.update(host=svc.host, pid=os.getpid(), started_at=now, attempts=entry["attempts"] + 1)
        if token is not None:  # which task holds the stage: its copy is told from its redelivery
            entry["token"] = token

    return start


def finish_stage(svc: Services, job_id: str, stage: str,
                 also: Callable[[JobRecord], None] | None = None) -> JobRecord:
    """Record the stage's end (and the stage's own result, `also`) in one atomic write."""
    end = stage_end(svc, stage)
    # the stage's audit lines (its uploads) are in Redis before any later stage, in any process, runs
    audit_trail.flush(job_id)

    def change(r: JobRecord) -> None:
        if also:
            also(r)
        end(r)

    return svc.store.update(job_id, change)


def stage_end(svc: Services, stage: str) -> Callable[[JobRecord], None]:
    """The record change that marks `stage` finished, with its duration."""
    now = time.time()

    def end(r: JobRecord) -> None:
        entry = r["stages"].setdefault(stage, {"attempts": 1, "host": svc.host, "started_at": now})
        entry.update(finished_at=now, duration_s=round(now - entry["started_at"], 6))

    return end


def owned_handle(svc: Services, record: JobRecord) -> SandboxHandle:
    """The job's sandbox, which must live on this node when the runtime is pinned."""
    if not record.get("sandbox"):
        raise PlacementError(f"job {record['id']} has no sandbox")
    handle = SandboxHandle.from_dict(record["sandbox"])
    if pinned(svc) and handle.host != svc.host:
        raise PlacementError(f"sandbox {handle.sandbox_id} lives on {handle.host}, not on {svc.host}")
    return handle


def pinned(svc: Services) -> bool:
    """A pinned runtime's sandbox lives on one node (local); a Fly machine is every worker's."""
    return getattr(svc.runtime, "pinned", True)


def job_spec(svc: Services, job_id: str) -> JobSpec:
    """The job's stored spec."""
    return JobSpec.from_dict(svc.store.spec(job_id))
