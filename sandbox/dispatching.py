"""What a submit has sent of its job's stages: the mark it writes just before the send, and what a
redelivery of that submit (its first delivery SIGKILLed) must send again.

Split out of sandbox.lifecycle (which re-exports these for sandbox.submit and its callers)."""
from __future__ import annotations

import time

from sandbox.services import Services
from sandbox.state import JobRecord


def dispatched(svc: Services, job_id: str) -> None:
    """Mark, just before the send, that the job's stages are being sent: a redelivered submit then
    builds nothing itself and sends them again only while none has begun (`unsent_from`)."""
    svc.store.update(job_id, lambda r: r.update(dispatched_at=time.time()))


def created_not_dispatched(record: JobRecord, task_id: str) -> bool:
    """True when this submit (`task_id`) built the job's sandbox itself and died before it sent the
    later stages: its redelivery sends them (a submit that sends the whole chain marks it dispatched
    before any create can run, so only the submit's own create leaves this state)."""
    create = (record.get("stages") or {}).get("create") or {}
    return (record.get("submit_task_id") == task_id and not record.get("dispatched_at")
            and bool(record.get("sandbox")) and create.get("finished_at") is not None)


def unsent_from(record: JobRecord, task_id: str) -> str | None:
    """The first stage a redelivery of this submit (`task_id`) must send, or None: its first delivery
    died before it sent them. Built the sandbox itself and never marked dispatched: from prepare.
    Marked dispatched (written just before the send) and no stage it sends has begun: the send may
    not have happened, so they are sent again (from prepare when it built the sandbox itself); if
    they were sent, the copies change nothing (services.Fresh: the first task to begin a stage
    holds it, a copy of a stage another task ran or runs, or that the job moved past, ends)."""
    if record.get("submit_task_id") != task_id:
        return None
    if created_not_dispatched(record, task_id):
        return "prepare"
    if not record.get("dispatched_at"):
        return None
    stages = record.get("stages") or {}
    if not stages and not record.get("sandbox"):
        return "create"
    create = stages.get("create") or {}
    # built by the submit itself (the create task's entry carries its token: that create was sent)
    if set(stages) == {"create"} and record.get("sandbox") and create.get("finished_at") is not None \
            and create.get("token") is None:
        return "prepare"
    return None
