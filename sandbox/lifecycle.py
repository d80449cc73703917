"""The stages (create, prepare, execute, cleanup) as plain functions over services.

The collect stage lives in sandbox.collecting, the bookkeeping the stages share in sandbox.services.
Every stage is idempotent: Celery may deliver it twice. A stage on a job that already ended does
nothing, except cleanup, which always destroys whatever sandbox the record names.
"""
from __future__ import annotations

import io
import json
import logging
import time
import uuid
from typing import Any

from config.settings import Settings
from sandbox import webhooks
from sandbox.admission import Request, check_possible, published_capacities
from sandbox.dispatching import created_not_dispatched, dispatched, unsent_from  # noqa: F401 - submit's API
from sandbox.events import check_job_id
from sandbox.errors import JobNotFound, JobRejected, SandboxError, SandboxFailure, StaleDelivery
from sandbox.runtimes.base import ExecResult, SandboxHandle
from sandbox.services import (
    Fresh, Services, begin, finish_stage, job_spec, owned_handle, pinned, stage_end, stage_start)
from sandbox.spec import JobSpec, job_id_of, parse_job
from sandbox.state import JobRecord, JobStatus, new_record

log = logging.getLogger("sandbox.lifecycle")
audit = logging.getLogger("sandbox.audit")

_OUTCOME_STATUS = {s.value: s for s in JobStatus}


def validate(raw: Any, settings: Settings) -> JobSpec:
    """Every check a submitted job passes (the CLI's `validate` runs exactly this)."""
    return parse_job(raw, settings)


def submit(svc: Services, raw: Any, task_id: str) -> tuple[JobRecord, bool]:
    """Validate and record a job; True when the caller should start its stages."""
    try:
        spec = validate(raw, svc.settings)
        if svc.admission is not None:
            check_possible(spec.resources, svc.settings, lambda: published_capacities(svc.store.redis))
    except JobRejected as rejection:
        return _reject(svc, raw, rejection), False
    record = new_record(spec.id, JobStatus.QUEUED)
    record["submit_task_id"] = task_id
    record["callback_url"] = spec.callback_url
    record["callback_events"] = spec.callback_events
    record["transitions_notified"] = 0
    try:
        created = svc.store.create_job(record, spec.to_dict())
        if created == "precancelled":  # cancelled while its submit waited in the queue
            return svc.store.transition(spec.id, JobStatus.CANCELLED, cancel_requested=True, error={
                "code": "cancelled", "message": "cancelled before it was accepted", "field": None}), False
        if created == "created":
            return record, True
    except JobRejected as rejection:  # the id of an earlier job (tombstone): never reuse its objects
        return _reject(svc, raw, rejection), False
    existing = svc.store.get(spec.id)
    # The same submit delivered again: run it only if the first delivery died before it sent the
    # stages (dispatched_at is written just before they are sent), so the job runs once.
    redelivered = (existing.get("submit_task_id") == task_id and existing["status"] == JobStatus.QUEUED.value
                   and not existing.get("dispatched_at"))
    return existing, redelivered


def _reject(svc: Services, raw: Any, rejection: JobRejected) -> JobRecord:
    job_id = job_id_of(raw) or f"rejected-{uuid.uuid4().hex}"
    record = new_record(job_id, JobStatus.REJECTED)
    record["error"] = rejection.as_dict()
    record["finished_at"] = record["created_at"]
    event = {"type": "rejected", "field": rejection.field, "rule": rejection.rule,
             "detail": rejection.message, "at": time.time()}
    record["security_events"].append(event)
    audit.warning(json.dumps({"op": "reject", "job_id": job_id, "outcome": "rejected", **event}, sort_keys=True))
    if not svc.store.create(record):
        # The id belongs to an earlier job: answer with the rejection, never overwrite that job.
        return record
    svc.events.publish(job_id, {**event, "kind": event.get("type"), "type": "security"})
    return record


def create(svc: Services, job_id: str, admit_wait_s: float = 0.0, spec: JobSpec | None = None,
           token: str | None = None) -> bool:
    """Admit the job on this node, then make its sandbox and remember its handle.

    False when the node could not admit it within `admit_wait_s` (0: one try, no wait): nothing was
    built, the job is still `queued`, and the caller puts it back in the queue. `spec`: the job's
    stored spec when the caller has read it already; `token`: the create task's id (a copy of it
    is told by another id, services.Fresh).
    """
    spec = spec or job_spec(svc, job_id)
    if svc.admission is not None:
        def still_wanted() -> bool:
            return not JobStatus(svc.store.get(job_id)["status"]).terminal

        if not svc.admission.admit(job_id, Request.of(spec.resources), admit_wait_s, still_wanted):
            return not still_wanted()
    try:
        record = begin(svc, job_id, "create", JobStatus.CREATING, token)
    except StaleDelivery:
        if svc.admission is not None:
            current = svc.store.get(job_id)
            owner = (current.get("sandbox") or {}).get("host") or (current["stages"].get("create") or {}).get("host")
            if owner != svc.host:
                svc.admission.release(job_id)  # admitted here for a copy: the job's sandbox is elsewhere
        raise
    if record is None:
        if svc.admission is not None and not svc.store.get(job_id).get("sandbox"):
            svc.admission.release(job_id)  # cancelled between admission and start: nothing to hold
        return True
    try:
        handle = svc.runtime.create(spec, svc.host)
    except BaseException:
        if svc.admission is not None:
            svc.admission.release(job_id)  # the runtime tore down what it began; a retry admits again
        raise
    finish_stage(svc, job_id, "create", also=lambda r: r.update(sandbox=handle.to_dict()))
    prestart = getattr(svc.runtime, "prestart", None)  # LocalRuntime: its execute's bwrap, set up now
    if prestart is not None:
        prestart(handle, spec)
    return True


def prepare(svc: Services, job_id: str, token: str | None = None) -> None:
    """Write every input file (inline or streamed from R2) into the sandbox's workspace."""
    record = begin(svc, job_id, "prepare", JobStatus.PREPARING, token)
    if record is None:
        return
    handle = owned_handle(svc, record)
    spec = job_spec(svc, job_id)
    for f in spec.files:
        if f.content is not None:
            svc.runtime.put_file(handle, f.path, io.BytesIO(f.content), f.mode)
        else:
            body = svc.artifacts.open_input(f.r2_key, job_id)
            try:
                svc.runtime.put_file(handle, f.path, body, f.mode)
            finally:
                body.close()
    if spec.setup is not None:
        _run_setup(svc, job_id, handle, spec)
    finish_stage(svc, job_id, "prepare")


def _run_setup(svc: Services, job_id: str, handle: SandboxHandle, spec: JobSpec) -> None:
    """The job's setup command, under its own network policy; a failed setup is the job's outcome."""
    run = getattr(svc.runtime, "setup", None)
    if run is None:
        raise SandboxFailure(f"the {svc.runtime.name} runtime cannot run a setup command")
    sink = svc.events.log_sink(job_id)
    try:
        result = run(handle, spec, sink)
    finally:
        sink.close()
    shown = {k: v for k, v in result.to_dict().items()
             if k in ("outcome", "exit_code", "signal", "duration_s", "reason", "network")}

    def change(r: JobRecord) -> None:
        r["setup"] = shown
        r["security_events"].extend(result.security_events)
        if result.outcome != "succeeded":  # execute sees an outcome and skips; collect and cleanup run
            r["outcome"] = {k: v for k, v in result.to_dict().items() if k != "network"}
            r["exit_code"], r["signal"] = result.exit_code, result.signal
            r["error"] = {"code": "setup", "message": f"the setup command ended {result.outcome}: {result.reason}",
                          "field": "/setup"}

    svc.store.update(job_id, change)
    for event in result.security_events:
        svc.events.publish(job_id, {**event, "kind": event.get("type"), "type": "security"})


def execute(svc: Services, job_id: str, token: str) -> None:
    """Run the command exactly once; its ending is recorded as the job's outcome."""
    # the stage's start and the never-twice claim (taken only while the job is still to run) in one
    # step; a copy of this stage (the job moved past it, another task ran it or runs it) writes
    # nothing and takes no claim: it must not record the command's task as lost (services.Fresh)
    fresh = Fresh(svc, "execute", JobStatus.RUNNING, token)
    record, claimed = svc.store.transition_and_claim(job_id, JobStatus.RUNNING, token,
                                                     also=stage_start(svc, "execute", token), only_if=fresh)
    if JobStatus(record["status"]).terminal:
        return
    fresh.check(record)
    if record.get("outcome"):
        return
    handle = owned_handle(svc, record)
    if not claimed:
        # A redelivered execute: the earlier attempt's worker died while the command ran.
        result = ExecResult(outcome="error", exit_code=None, signal=None, duration_s=0.0,
                            reason="the worker was lost while the command ran; it is never run twice")
    else:
        sink = svc.events.log_sink(job_id)
        try:
            result = svc.runtime.execute(handle, job_spec(svc, job_id), sink)
        finally:
            sink.close()
    finish_stage(svc, job_id, "execute", also=lambda r: _record_outcome(r, result))
    for event in result.security_events:
        svc.events.publish(job_id, {**event, "kind": event.get("type"), "type": "security"})


def _record_outcome(r: JobRecord, result: ExecResult) -> None:
    r["outcome"] = {k: v for k, v in result.to_dict().items() if k != "network"}
    if result.network is not None:  # the egress connection log, once, at the record's top level
        r["network"] = result.network
    r["exit_code"], r["signal"] = result.exit_code, result.signal
    r["resources_used"] = result.resources_used
    r["output_truncated"] = {"stdout": result.stdout_truncated, "stderr": result.stderr_truncated}
    r["security_events"].extend(result.security_events)
    if result.outcome == "error":
        r["error"] = {"code": "execute", "message": result.reason, "field": None}


def cleanup(svc: Services, job_id: str) -> JobRecord:
    """Destroy the sandbox (always) and write the job's one terminal status."""
    # One round trip: the stage's start (nothing is written to a job that already ended), and the
    # current record to decide from.
    record = svc.store.transition(job_id, JobStatus.CLEANING, also=stage_start(svc, "cleanup"))
    _destroy(svc, record)
    outcome = (record.get("outcome") or {}).get("outcome")
    # a command that ended before a cancel's kill landed is recorded as it ended
    cancelled = record.get("cancel_requested") and outcome in (None, "cancelled")
    status = JobStatus.CANCELLED if cancelled else _OUTCOME_STATUS[outcome or "error"]
    # the terminal status and the stage's end in one atomic write, whose result is the final record
    record = svc.store.transition(job_id, status, also=stage_end(svc, "cleanup"))
    if "finished_at" not in record["stages"].get("cleanup", {}):  # already terminal (cancelled): no transition
        record = finish_stage(svc, job_id, "cleanup")
    return record


def fail(svc: Services, job_id: str, stage: str, exc: BaseException) -> JobRecord | None:
    """The errback: a stage failed for good, so destroy the sandbox and end the job as `error`."""
    record = svc.store.find(job_id)
    if record is None:
        return None
    try:
        _destroy(svc, record)
    except Exception:  # noqa: BLE001 - the job must still end; the orphan sweep retries the destroy
        log.exception("could not destroy the sandbox of failed job %s; the orphan sweep will", job_id)
    code = exc.code if isinstance(exc, SandboxError) else "internal"
    error = {"code": code, "message": f"{stage} failed: {type(exc).__name__}: {str(exc)[:2000]}",
             "field": None, "stage": stage}
    status = JobStatus.CANCELLED if record.get("cancel_requested") else JobStatus.ERROR
    if not JobStatus(record["status"]).terminal:
        svc.store.transition(job_id, status, error=error)
    return svc.store.get(job_id)


def cancel(svc: Services, job_id: str) -> dict[str, Any]:
    """Stop a job at any stage in one atomic change; the answer says what really happened.

    Before execute the job ends `cancelled` at once. While it runs, the change only marks the
    request: the caller kills the sandbox and `settle_cancel` records how the command ended.
    """
    decided: dict[str, Any] = {}

    def change(r: JobRecord) -> None:
        decided.clear()
        status = JobStatus(r["status"])
        outcome = (r.get("outcome") or {}).get("outcome")
        if status.terminal:
            decided["message"] = f"job already ended as {r['status']}; nothing changed"
        elif outcome:
            decided["message"] = f"its command had already ended ({outcome}); recorded as it ended"
        else:
            r["cancel_requested"] = True
            decided["cancelled"] = True
            if status == JobStatus.RUNNING:
                decided["kill"] = True
            else:  # nothing of the job runs: it ends now, later stages skip, cleanup destroys
                _end(r, JobStatus.CANCELLED, {"code": "cancelled", "message": "cancelled on request", "field": None})

    try:
        check_job_id(job_id)
    except ValueError:
        return {"job_id": job_id, "cancelled": False, "status": None, "message": "no such job"}
    try:
        record = svc.store.update(job_id, change)
    except JobNotFound:
        # Its submit may still wait behind busy slots: remembered first, then looked for again, so
        # either this cancel finds the record or the submit finds the cancel.
        svc.store.precancel(job_id)
        try:
            record = svc.store.update(job_id, change)
        except JobNotFound:
            return {"job_id": job_id, "cancelled": False, "status": None,
                    "message": "no such job (yet): if it is submitted later, it ends cancelled"}
    answer = {"job_id": job_id, "cancelled": bool(decided.get("cancelled")), "status": record["status"],
              "message": decided.get("message", "cancelled"), "kill_on": None}
    if decided.get("kill") and record.get("sandbox"):
        handle = SandboxHandle.from_dict(record["sandbox"])
        if not pinned(svc) or handle.host == svc.host:
            _kill_quietly(svc, handle)
        else:
            answer["kill_on"] = handle.host  # the caller routes a kill to the sandbox's own host
    return answer


def settle_cancel(svc: Services, job_id: str, answer: dict[str, Any], wait_s: float = 2.0) -> dict[str, Any]:
    """After the kill: the job ends `cancelled` unless its command had ended on its own first."""
    if not answer.get("cancelled") or answer["status"] != JobStatus.RUNNING.value:
        return answer
    deadline = time.monotonic() + wait_s
    record = svc.store.get(job_id)
    while record.get("outcome") is None and not JobStatus(record["status"]).terminal and time.monotonic() < deadline:
        time.sleep(0.02)  # the executor records the ending within milliseconds of the kill
        record = svc.store.get(job_id)
    outcome = (record.get("outcome") or {}).get("outcome")
    if outcome not in (None, "cancelled"):
        return {**answer, "cancelled": False, "status": record["status"],
                "message": f"its command had already ended ({outcome}); recorded as it ended"}
    record = svc.store.transition(job_id, JobStatus.CANCELLED,
                                  error={"code": "cancelled", "message": "cancelled on request", "field": None})
    return {**answer, "status": record["status"], "cancelled": record["status"] == JobStatus.CANCELLED.value}


def _end(r: JobRecord, status: JobStatus, error: dict[str, Any] | None) -> None:
    now = time.time()
    r.update(status=status.value, finished_at=now)
    r["timeline"].append({"status": status.value, "at": now})
    if error:
        r["error"] = error


def kill(svc: Services, job_id: str) -> None:
    """Kill the job's running sandbox on this host (the second half of a cancel)."""
    record = svc.store.get(job_id)
    if record.get("sandbox"):
        _kill_quietly(svc, owned_handle(svc, record))


def _kill_quietly(svc: Services, handle: SandboxHandle) -> None:
    # The job is already `cancelled`; a kill racing the sandbox's own teardown must not undo that.
    try:
        svc.runtime.kill(handle)
    except Exception:  # noqa: BLE001
        log.exception("kill of sandbox %s failed; cleanup or the orphan sweep destroys it", handle.sandbox_id)


def _destroy(svc: Services, record: JobRecord) -> None:
    if record.get("sandbox"):
        svc.runtime.destroy(SandboxHandle.from_dict(record["sandbox"]))
    if svc.admission is not None:
        svc.admission.release(record["id"])  # only once the sandbox is gone (destroy raised otherwise)


def transitions_to_notify(svc: Services, job_id: str) -> list[dict[str, Any]]:
    """Timeline entries not yet POSTed, for a job that asked for every transition (each once)."""
    record = svc.store.get(job_id)
    if record.get("callback_events") != "all" or not record.get("callback_url"):
        return []  # the common case: one read, no write
    taken: list[dict[str, Any]] = []

    def change(r: JobRecord) -> None:
        taken.clear()
        if r.get("callback_events") != "all" or not r.get("callback_url"):
            return
        start = r.get("transitions_notified", 0)
        taken.extend(e for e in r["timeline"][start:] if not JobStatus(e["status"]).terminal)
        r["transitions_notified"] = start + len(taken)

    svc.store.update(job_id, change)
    return list(taken)


def notify(svc: Services, job_id: str, event_type: str = "job.terminal",
           transition: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """POST the terminal record (or one transition), signed, to the job's callback_url; log the delivery."""
    record = svc.store.get(job_id)
    if not record.get("callback_url"):
        return []
    if event_type == "job.terminal" and not JobStatus(record["status"]).terminal:
        return []
    payload = record if event_type == "job.terminal" else {"id": job_id, **(transition or {})}
    # one id per event, whatever retries and redeliveries happen: a transition is known by its
    # status and time (its place in the timeline), the terminal record happens once
    sequence = "terminal" if event_type == "job.terminal" else f"{(transition or {}).get('status')}@{(transition or {}).get('at')}"
    deliveries = webhooks.deliver(record["callback_url"], event_type, payload,
                                  webhooks.secret_from(svc.settings),
                                  delivery_id=webhooks.delivery_id_for(job_id, event_type, sequence),
                                  **webhooks.options_from(svc.settings))
    svc.store.update(job_id, lambda r: r["webhook_deliveries"].extend(deliveries))
    return deliveries
