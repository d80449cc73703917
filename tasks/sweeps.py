"""Beat's sweeps, one run per period each (a Redis lock). Local sandboxes live on one host each, so
the orphan sweep fans out per node."""
from __future__ import annotations

import datetime
import logging
import socket
import time
from typing import Any

import redis
from celery.signals import beat_init

from config import load_settings
from sandbox import nodes, sweeps
from sandbox.observability import metrics
from tasks import transport
from tasks.app import app, node_queue, services

log = logging.getLogger("sandbox.sweeps")
STUCK_MARGIN_S = 600
_SWEEP_OF_TASK = {nodes.sweep_task(name): name for name in nodes.SWEEPS}


@beat_init.connect
def _announce_beat(sender: Any = None, **_: object) -> None:
    """Publish when this beat started and the periods it sends each sweep with (health reads both)."""
    settings = load_settings()
    periods = nodes.sweep_periods(settings)
    for entry in (app.conf.beat_schedule or {}).values():  # what this beat really runs
        every = entry.get("schedule")
        every = every.total_seconds() if isinstance(every, datetime.timedelta) else every
        if entry.get("task") in _SWEEP_OF_TASK and isinstance(every, (int, float)):
            periods[_SWEEP_OF_TASK[entry["task"]]] = float(every)
    try:
        nodes.beat_started(redis.Redis.from_url(settings.redis_url, socket_timeout=5), periods, socket.gethostname())
    except redis.RedisError as e:  # health then judges by the sweeps' own marks only
        log.warning("could not record beat's start in Redis: %s", e)


def _this_period(svc: Any, name: str) -> bool:
    """True if this run may do the sweep `name`: one run per period, however many beats send it."""
    return sweeps.sweep_lock(svc.store.redis, name, nodes.sweep_periods(svc.settings)[name])


@app.task(name="sandbox.sweep_orphans")
def sweep_orphans() -> list[str] | None:
    """Ask every live worker node to sweep its own sandboxes (None: this period's run was done)."""
    svc = services()
    if not _this_period(svc, "orphans"):
        return None
    live = sorted({name for reply in (app.control.ping(timeout=2.0) or []) for name in reply})
    for node in live:
        sweep_node.apply_async(queue=node_queue(node))
    sweeps.sweep_done(svc.store.redis, "orphans", len(live), svc.host)
    return live


@app.task(name="sandbox.sweep_node", ignore_result=True)
def sweep_node() -> list[str]:
    from tasks.nodes import booted_at
    from tasks.stages import announce_end

    # a stage of this node begun before this process started is judged by its own process's life
    ended: list[dict] = []
    destroyed = sweeps.sweep_node(services(), booted_at=booted_at(), ended=ended)
    for record in ended:  # a job past its expiry ended here: its waiters and webhook are told
        announce_end(record)
    return destroyed


@app.task(name="sandbox.sweep_stuck")
def sweep_stuck() -> list[str] | None:
    """End the jobs of dead nodes (and of silent workers) as `error`, telling waiters and webhooks."""
    from tasks.stages import announce_end

    svc = services()
    if not _this_period(svc, "stuck"):
        return None
    ended = sweeps.sweep_stuck(svc, max_idle_s=svc.settings.visibility_timeout_s + STUCK_MARGIN_S)
    for record in ended:
        announce_end(record)
    restored = restore_dead_nodes_messages(svc)
    metrics.restored("sweep", len(restored))
    if restored:
        log.warning("gave back %d message(s) that nodes with no heartbeat held", len(restored))
    sweeps.sweep_done(svc.store.redis, "stuck", len(ended), svc.host)
    return [r["id"] for r in ended]


def restore_dead_nodes_messages(svc: Any) -> list[str]:
    """Give back to their queues the messages held by nodes whose heartbeat stopped (a create
    waiting for admission, a prefetched submit): another node takes them now, not after the
    visibility timeout. Not those routed to the dead node's own queue: nobody else would take them,
    their jobs are ended above, and a node restarted under that name gives them back itself. The
    heartbeat is read again, WATCHed, in the step that gives each message back: a node that beats
    again meanwhile keeps its messages. Nothing while Redis is younger than the dead-after time."""
    client, dead_after_s = svc.store.redis, svc.settings.node_dead_after_s
    if not nodes.heartbeats_tell(client, dead_after_s):
        return []

    def gone(holder: dict[str, Any], read: Any) -> bool:
        beat = nodes.beat_of(read(nodes.heartbeat_key(str(holder.get("node")))))
        return nodes.is_dead(beat, dead_after_s, time.time())

    return transport.restore_held(app, gone, watch=lambda holder: (nodes.heartbeat_key(str(holder.get("node"))),),
                                  movable=lambda holder: holder.get("queue") != node_queue(str(holder.get("node"))))


@app.task(name="sandbox.sweep_artifacts")
def sweep_artifacts() -> int | None:
    """Re-assert the bucket's lifecycle rules, then delete what is past retention anyway."""
    svc = services()
    if not _this_period(svc, "artifacts"):
        return None
    svc.artifacts.apply_lifecycle(svc.settings.retention_days)
    count = svc.artifacts.sweep_expired(svc.settings.retention_days)
    sweeps.sweep_done(svc.store.redis, "artifacts", count, svc.host)
    return count
