"""Sweeps beat runs, a restarted node's reconcile, and the other ways a job ends without its own
stages (a record gone, a stage that keeps killing its worker). They find work by labels, not memory.

- orphans: a sandbox never outlives its job's record. Destroyed at once when the record is gone or
  terminal (unless one of the job's own stages still works on it in a live process, or its own
  collect and cleanup are still queued on its live node), or when the job outlived its expiry
  counted from the start of `execute` (a backlog before execute is no age).
- node (the orphans' half that runs on each node): one listing of the node's sandboxes serves both
  the admission reconcile (capacity no sandbox holds comes back) and the orphan sweep.
- stuck: a job whose node stopped beating for SANDBOX_NODE_DEAD_AFTER ends `error` ("worker lost");
  a job that is only queued is never stuck.
- Each check and its transition are one atomic step (sandbox.nodes.end_if).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from sandbox import nodes
from sandbox.lifecycle import Services
from sandbox.services import pinned
from sandbox.runtimes.base import SandboxHandle, SandboxInfo
from sandbox.state import JobRecord, JobStatus

log = logging.getLogger("sandbox.sweeps")
GRACE_S = 300.0  # a half-made sandbox (no meta.json yet) may be a create under way
YOUNG_S = 30.0  # a sandbox this young without a record may be a create still under way (a Fly machine)
# A job cgroup without its sandbox directory is removed only this long after it was made: a leftover
# costs the kernel a few KiB, and the wait keeps away from an empty group another work dir's live
# sandbox on this host still has (between create and execute, or after it).
CGROUP_GRACE_S = 3600.0


def sweep_lock_key(name: str) -> str:
    """The sweep `name`'s once-per-period lock: deleting it lets the next run sweep at once."""
    return f"sandbox:sweep:{name}:lock"


def sweep_lock(client: Any, name: str, period_s: float) -> bool:
    """True if this run may sweep `name`: one run per period, however many beats send it."""
    return bool(client.set(sweep_lock_key(name), uuid.uuid4().hex, nx=True, px=max(1000, int(period_s * 900))))


def sweep_done(client: Any, name: str, count: int, node: str) -> None:
    """Record when the sweep last ran, how much it did and where."""
    client.set(nodes.sweep_last_key(name), json.dumps({"at": time.time(), "count": count, "node": node}))


def reconcile(svc: Services, booted_at: float,
              ended: list[JobRecord] | None = None) -> tuple[list[JobRecord], list[str]]:
    """At start-up: end the jobs a dead process of this node was running, then sweep the node (its
    admitted capacity, then its host's orphans: `sweep_node`). Each job ended is appended to `ended`
    at once, so a caller that retries after Redis dropped mid-way still announces it (the retry
    finds it terminal and ends it no more)."""
    ended = [] if ended is None else ended
    reason = "the worker was lost while a stage ran (the node restarted); the job is not run again"
    for job_id in svc.store.active_ids():
        record = svc.store.find(job_id)
        if record is None or not nodes.lost_on(record, svc.host, booted_at):
            continue
        done = nodes.end_if(svc.store, job_id, lambda r, _read: nodes.lost_on(r, svc.host, booted_at), reason)
        if done is not None:
            ended.append(done)
            log.warning("reconcile: job %s ended %s: %s", job_id, done["status"], reason)
    return ended, sweep_node(svc, booted_at=booted_at, ended=ended)


def sweep_node(svc: Services, booted_at: float = 0.0, now: float | None = None,
               ended: list[JobRecord] | None = None) -> list[str]:
    """One sweep of this node from one listing of its sandboxes: give back the admitted capacity no
    sandbox holds (a killed worker's), then destroy the sandboxes their jobs no longer need (a job
    that outlived its expiry ends `error`, appended to `ended` for the caller to announce).

    Capacity first, straight after the listing: a sandbox created after the listing is missing
    from it, and its entry is kept only because it is young (admitted within ADMIT_GRACE_S) and its
    job has not ended. Both are read right after the listing, as a second listing made just before
    would see them: the window is the same few milliseconds as with two listings, not the length of
    the orphan sweep's destroys. The orphans that follow give their capacity back as they go
    (`_destroy`), and a sandbox created after the listing is not in it, so it is never destroyed."""
    listed = svc.runtime.list_sandboxes()
    reconcile_admission(svc, listed)
    return sweep_orphans(svc, now, booted_at, listed=listed, ended=ended)


def reconcile_admission(svc: Services, listed: list[SandboxInfo]) -> list[str]:
    """Give back admitted capacity no sandbox of this node in `listed` holds (a killed worker's)."""
    if getattr(svc, "admission", None) is None:
        return []
    live = [info.job_id for info in listed if info.host == svc.host]
    return svc.admission.reconcile(live, lambda job_id: _job_ended(svc, job_id))


def sweep_orphans(svc: Services, now: float | None = None, booted_at: float = 0.0,
                  dead_after_s: float | None = None, listed: list[SandboxInfo] | None = None,
                  ended: list[JobRecord] | None = None) -> list[str]:
    """Destroy every sandbox in this host's work dir (whatever node it names) its job no longer needs
    (`listed`: the work dir's sandboxes as just listed). A job that outlived its expiry ends `error`
    and is appended to `ended`: the caller announces it (waiters, webhook), as sweep_stuck's are."""
    ended = [] if ended is None else ended
    now = time.time() if now is None else now
    dead_after_s = svc.settings.node_dead_after_s if dead_after_s is None else dead_after_s
    destroyed = []
    for info in svc.runtime.list_sandboxes() if listed is None else listed:
        why = _orphaned(svc, info, now, booted_at, dead_after_s, ended)
        if why is None:
            continue
        _destroy(svc, _handle(svc, info))
        destroyed.append(info.sandbox_id)
        log.warning("destroyed sandbox %s of job %s: %s", info.sandbox_id, info.job_id, why)
    for sandbox_id in svc.runtime.reap_incomplete(older_than=now - GRACE_S):
        destroyed.append(sandbox_id)
        log.warning("tore down half-created sandbox %s", sandbox_id)
    reap_cgroups = getattr(svc.runtime, "reap_cgroups", None)  # local runtime only
    if reap_cgroups is not None:
        # against the real clock: a caller's later `now` must not age other work dirs' live groups
        for sandbox_id in reap_cgroups(older_than=min(now, time.time()) - CGROUP_GRACE_S,
                                       keep=lambda sandbox_id: _job_live(svc, sandbox_id)):
            log.warning("removed cgroup %s: no process, no sandbox directory, no live job", sandbox_id)
    return destroyed


def _job_live(svc: Services, sandbox_id: str) -> bool:
    """True while the job a sandbox id names has a record that has not ended (it may be created now)."""
    return not _job_ended(svc, sandbox_id.removeprefix("sbx-"))


def _job_ended(svc: Services, job_id: str) -> bool:
    """True when the job's record is gone or terminal."""
    record = svc.store.find(job_id)
    return record is None or JobStatus(record["status"]).terminal


def _orphaned(svc: Services, info: SandboxInfo, now: float, booted_at: float, dead_after_s: float,
              ended: list[JobRecord]) -> str | None:
    record = svc.store.find(info.job_id)
    if record is None:
        return None if now - info.created_at < YOUNG_S else "its job record is gone"
    if JobStatus(record["status"]).terminal:
        if nodes.running_stage(record) is not None:
            if _stage_alive(svc, record, booted_at, dead_after_s, now):
                return None  # collect or cleanup of a cancelled job still works on it; cleanup destroys it
            return f"its job ended {record['status']} and the stage working on it was lost"
        if _cleanup_to_come(svc, info, record, now, dead_after_s):
            return None  # a cancelled job's collect (its logs) and cleanup are queued on a live node
        return f"its job ended {record['status']}"
    started = (record.get("stages", {}).get("execute") or {}).get("started_at")
    lifetime_s = info.expires_at - info.created_at  # the job's timeout + the runtime's margin
    if started is None or now < started + lifetime_s + GRACE_S:
        return None
    reason = f"still running {int(now - started)} s after execute started (timeout + margins passed)"
    done = nodes.end_if(svc.store, info.job_id,
                        lambda r, _read: (r.get("stages", {}).get("execute") or {}).get("started_at") == started,
                        reason)
    if done is None:
        return None
    ended.append(done)
    return reason


def _stage_alive(svc: Services, record: JobRecord, booted_at: float, dead_after_s: float, now: float) -> bool:
    stage = nodes.running_stage(record)
    if stage is None:
        return False
    host, started = stage[1].get("host"), stage[1]["started_at"]
    if host == svc.host:  # begun by this process, or by another live one under this node's name
        return started >= booted_at or nodes.process_alive(stage[1].get("pid"), started)
    return not nodes.is_dead(nodes.heartbeat(svc.store.redis, host), dead_after_s, now)


def _cleanup_to_come(svc: Services, info: SandboxInfo, record: JobRecord, now: float, dead_after_s: float) -> bool:
    """True while the job's own cleanup has not run but still can: queued on its live node, and not
    for longer than a message can wait before it is redelivered (then the sweep destroys)."""
    if (record.get("stages", {}).get("cleanup") or {}).get("finished_at") is not None:
        return False
    if record.get("finished_at") is None or now > record["finished_at"] + svc.settings.visibility_timeout_s + GRACE_S:
        return False
    alive = info.host == svc.host or not nodes.is_dead(nodes.heartbeat(svc.store.redis, info.host), dead_after_s, now)
    return alive and bool(record.get("stages"))


def _destroy(svc: Services, handle: SandboxHandle) -> None:
    svc.runtime.destroy(handle)
    if getattr(svc, "admission", None) is not None and handle.host == svc.host:
        svc.admission.release(handle.job_id)  # what the sandbox held of this node is free again


def _handle(svc: Services, info: SandboxInfo) -> SandboxHandle:
    return SandboxHandle(sandbox_id=info.sandbox_id, job_id=info.job_id, runtime=svc.runtime.name,
                         host=info.host, created_at=info.created_at, expires_at=info.expires_at)


def sweep_stuck(svc: Services, max_idle_s: float, now: float | None = None) -> list[JobRecord]:
    """End as `error` every started job whose node is dead, or that made no progress for `max_idle_s`.
    Nodes are judged only once Redis has been up `SANDBOX_NODE_DEAD_AFTER` (nodes.heartbeats_tell)."""
    now = time.time() if now is None else now
    dead_after_s = svc.settings.node_dead_after_s
    by_node = pinned(svc)
    beats: dict[str, dict | None] = {}  # one heartbeat read per node per sweep, not per job
    judge_nodes = nodes.heartbeats_tell(svc.store.redis, dead_after_s)
    ended = []
    for job_id in svc.store.active_ids():
        record = svc.store.find(job_id)
        if record is None or JobStatus(record["status"]).terminal or not _started(record):
            continue
        node = nodes.node_of(record) if by_node else (nodes.running_stage(record) or (None, {}))[1].get("host")
        if node and judge_nodes and node not in beats:
            beats[node] = nodes.heartbeat(svc.store.redis, node)
        if node and judge_nodes and nodes.is_dead(beats[node], dead_after_s, now):
            reason = f"worker node {node} was lost: no heartbeat for over {dead_after_s:g} s"

            def still(r: JobRecord, read: Any, node: str = node) -> bool:
                beat = nodes.beat_of(read(nodes.heartbeat_key(node)))
                return _started(r) and nodes.node_of(r) == node and nodes.is_dead(beat, dead_after_s, time.time())

            done = nodes.end_if(svc.store, job_id, still, reason, watch=(nodes.heartbeat_key(node),))
        elif record["updated_at"] + max_idle_s < now:
            reason = f"no progress for {int(now - record['updated_at'])} s in {record['status']}: its worker was lost"
            updated = record["updated_at"]
            done = nodes.end_if(svc.store, job_id, lambda r, _read: r["updated_at"] == updated, reason)
        else:
            continue
        if done is not None:
            ended.append(done)
            log.warning("ended stuck job %s: %s", job_id, reason)
    return ended


def _started(record: JobRecord) -> bool:
    """A job some stage has begun (a job only queued is never stuck)."""
    return bool(record.get("stages")) or record["status"] != JobStatus.QUEUED.value


def abandon(svc: Services, job_id: str) -> None:
    """A stage found its job's record gone: tear down the sandbox the job may have on this host."""
    for info in svc.runtime.list_sandboxes():
        if info.job_id == job_id:
            _destroy(svc, _handle(svc, info))
            log.warning("job %s has no record any more: destroyed its sandbox %s", job_id, info.sandbox_id)


def give_up(svc: Services, job_id: str, reason: str) -> JobRecord | None:
    """End a job whose stage keeps killing its worker as `error` with the reason; destroy its sandbox."""
    record = svc.store.find(job_id)
    if record is None:
        return None
    if not JobStatus(record["status"]).terminal:
        record = svc.store.transition(job_id, JobStatus.ERROR,
                                      error={"code": "max_deliveries", "message": reason, "field": None})
    sandbox = record.get("sandbox")
    if sandbox and (sandbox.get("host") == svc.host or not pinned(svc)):
        try:
            _destroy(svc, SandboxHandle.from_dict(sandbox))
        except Exception:  # noqa: BLE001 - the job has ended; the orphan sweep retries the destroy
            log.exception("could not destroy the sandbox of job %s", job_id)
    return record
