"""Start-up of a worker node: consume Celery's default queue too, check the broker keeps what it is
given, reconcile what a dead process of this node left, then keep a heartbeat in Redis."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery.signals import celeryd_after_setup, worker_shutdown

from config import load_settings
from sandbox import nodes, sweeps
from sandbox.errors import ConfigError
from tasks.app import app, services
from tasks.consumer import CONTROL_QUEUE, ControlConsumer

app.steps["consumer"].add(ControlConsumer)

log = logging.getLogger("sandbox.nodes")
_stop = threading.Event()
_booted: dict[str, float] = {}


def booted_at() -> float:
    """When this worker process started (0 before its start-up ran)."""
    return _booted.get("at", 0.0)
QUEUE_CHECK_EVERY = 6  # heartbeats between two checks for queues nobody consumes


@celeryd_after_setup.connect
def _start_node(sender: str, instance: Any, **_: object) -> None:
    booted_at = _booted["at"] = time.time()
    settings = load_settings()
    # (tasks.app has chosen the queues by now, Celery's default `celery` among them: stock producers)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        nodes.check_durability(client, settings.require_durable_redis)
    except ConfigError as e:
        log.critical("refusing to start: %s", e)
        raise SystemExit(f"refusing to start: {e}") from e
    queues = sorted({*instance.app.amqp.queues.consume_from, CONTROL_QUEUE})  # + ControlConsumer's
    nodes.beat(client, sender, queues, booted_at, settings.node_dead_after_s)
    ended, destroyed = sweeps.reconcile(services(), booted_at)
    for record in ended:
        from tasks.stages import announce_end

        announce_end(record)
    if ended or destroyed:
        log.warning("reconciled node %s: ended %d lost job(s), destroyed %d sandbox(es)", sender, len(ended),
                    len(destroyed))
    thread = threading.Thread(target=_beat_forever, args=(client, sender, queues, booted_at, settings),
                              name="sandbox-heartbeat", daemon=True)
    thread.start()


def _beat_forever(client: redis.Redis, node: str, queues: list[str], booted_at: float, settings: Any) -> None:
    beats = 0
    while not _stop.wait(settings.heartbeat_interval_s):
        try:
            nodes.beat(client, node, queues, booted_at, settings.node_dead_after_s)
            if beats % QUEUE_CHECK_EVERY == 0:
                _report_unconsumed(client, settings)
        except redis.RedisError as e:  # Redis restarting: the next beat tries again
            log.warning("heartbeat of %s failed: %s", node, e)
        beats += 1


def _report_unconsumed(client: redis.Redis, settings: Any) -> None:
    # A producer that sends where no worker reads (a misrouted queue name, a node that never came
    # back) waits forever in silence otherwise.
    for queue, count in nodes.unconsumed_queues(client, settings.node_dead_after_s).items():
        log.error("queue %r holds %d message(s) that no live worker consumes", queue, count)


@worker_shutdown.connect
def _stop_beating(**_: object) -> None:
    _stop.set()


__all__ = ["app"]
