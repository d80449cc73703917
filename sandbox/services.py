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


def begin(svc: Services, job_id: str, stage: str, status: JobStatus,
          token: str | None = None) -> JobRecord | None:
    """Mark a stage started; None when the job already ended (cancelled) and the stage should skip.

    Raises StaleDelivery, having written nothing, when this delivery is a copy (a publish retried
    after a lost reply, a restore after a lost ack; see `Fresh`): running the stage again would
    touch the live sandbox and send a second copy of the later stages. A delivery at the stage's own
    status by the same task (a retry, a redelivery) runs again, as every stage is idempotent."""
    fresh = Fresh(svc, stage, status, token)
    record = svc.store.transition(job_id, status, also=stage_start(svc, stage, token), only_if=fresh)
    if JobStatus(record["status"]).terminal:
        return None
    fresh.check(record)
    return record


class Fresh:
    """The `only_if` of a stage's first transition: False for a copy of the stage message, which
    then writes nothing (and takes no claim); `check` raises StaleDelivery for it afterwards.

    A copy: the job (not ended) has moved past the stage's own `status`, or another task (its
    `token` recorded in the stage entry) finished the stage or still runs it in a live process (on
    this host) or on a live node (its heartbeat). The same task again, a holder that is dead (its
    stage is re-run, or for execute recorded lost: never run twice), or an entry without a token
    (a task without one: the inline create, a record older than tokens) is no copy."""

    def __init__(self, svc: Services, stage: str, status: JobStatus, token: str | None) -> None:
        self.svc, self.stage, self.status, self.token = svc, stage, status, token
        self.why: str | None = None

    def __call__(self, record: JobRecord) -> bool:
        self.why = self._copy(record)
        return self.why is None

    def check(self, record: JobRecord) -> None:
        """After the transition: raise StaleDelivery if it was refused as a copy (record not ended)."""
        if self.why is not None and not JobStatus(record["status"]).terminal:
            raise StaleDelivery(f"{self.stage} of job {record['id']}: {self.why}")

    def _copy(self, record: JobRecord) -> str | None:
        if moved_past(record, self.status):
            return f"delivered again once the job was {record['status']}"
        entry = record.get("stages", {}).get(self.stage) or {}
        holder = entry.get("token")
        if self.token is None or holder in (None, self.token) or entry.get("started_at") is None:
            return None
        if entry.get("finished_at") is not None:
            return f"a copy: task {holder} already finished it"
        if entry.get("host") == self.svc.host:
            alive = nodes.process_alive(entry.get("pid"), entry["started_at"])
        else:
            beat = nodes.heartbeat(self.svc.store.redis, entry.get("host"))
            alive = not nodes.is_dead(beat, self.svc.settings.node_dead_after_s, time.time())
        return f"a copy: task {holder} still runs it" if alive else None


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
