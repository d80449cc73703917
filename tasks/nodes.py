"""Start-up of a worker node, in one handler and in this order: consume the node's queues, start the
metrics endpoint and the audit trail, check the broker keeps what it is given, write a first
heartbeat, reconcile what a dead process of this node left (its jobs, its admitted capacity, its
sandboxes, the messages it held), publish the node's capacity, then keep a heartbeat in Redis. All
of it before the worker consumes (celeryd_after_setup)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from celery.signals import celeryd_after_setup, worker_shutdown
from kombu.exceptions import OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from config import load_settings
from sandbox import nodes, sweeps
from sandbox.errors import ConfigError
from sandbox.observability import metrics
from tasks import transport
from tasks.app import app, consume_own_queues, services
from tasks.consumer import CONTROL_QUEUE, ControlConsumer
from tasks.monitoring import start_endpoint

app.steps["consumer"].add(ControlConsumer)

log = logging.getLogger("sandbox.nodes")
_stop = threading.Event()
_booted: dict[str, float] = {}
_beating: dict[str, Any] = {}  # the client and node name the heartbeat thread beats with


def booted_at() -> float:
    """When this worker process started (0 before its start-up ran)."""
    return _booted.get("at", 0.0)


QUEUE_CHECK_EVERY = 6  # heartbeats between two checks for queues nobody consumes


START_REDIS_WAIT_S = 60.0  # how long start-up waits for an unreachable Redis before the worker gives up


@celeryd_after_setup.connect
def _start_node(sender: str, instance: Any, **_: object) -> None:
    # The one start-up handler: its steps depend on each other's order (the services need the node
    # name; the reconcile's audit lines need the trail), which receivers of one signal would get only
    # from the order their modules happen to be imported in.
    # Celery only logs what a signal receiver raises, then starts consuming: a node whose start-up
    # failed would run jobs with no heartbeat, reconcile or capacity, and the stuck sweep would end
    # them as lost while they ran. So a step that fails for good stops the worker instead.
    try:
        _start(sender, instance)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - any failure: refuse to start, saying why
        log.critical("refusing to start: %s: %s", type(e).__name__, e, exc_info=True)
        raise SystemExit(f"refusing to start: {type(e).__name__}: {e}") from e


def _start(sender: str, instance: Any) -> None:
    booted_at = _booted["at"] = time.time()
    consume_own_queues(sender, instance)  # Celery's default `celery` among them: stock producers
    host = socket.gethostname()
    transport.set_holder(sender, os.getpid(), booted_at, host)
    start_endpoint(sender)
    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    queues = sorted({*instance.app.amqp.queues.consume_from, CONTROL_QUEUE})  # + ControlConsumer's
    # Redis restarting while the node boots (both started together, say) is waited for; each step
    # below is safe to run again after a partial run (the reconcile is a sweep's own work). The jobs
    # ended are gathered across attempts: one an attempt ended before Redis dropped is terminal by
    # the retry, which would not end (nor announce) it again.
    ended: list[dict] = []
    # (the give-back of held messages goes through kombu, which wraps Redis's errors in OperationalError)
    transient = (redis.ConnectionError, redis.TimeoutError, OperationalError)
    for attempt in Retrying(retry=retry_if_exception_type(transient),
                            stop=stop_after_delay(START_REDIS_WAIT_S), wait=wait_exponential(max=5), reraise=True,
                            before_sleep=lambda state: log.warning("start-up waits for Redis: %s",
                                                                   state.outcome.exception())):
        with attempt:
            try:
                nodes.check_durability(client, settings.require_durable_redis)
            except ConfigError as e:
                log.critical("refusing to start: %s", e)
                raise SystemExit(f"refusing to start: {e}") from e
            nodes.beat(client, sender, queues, booted_at, settings.node_dead_after_s)
            svc = services()
            _, destroyed = sweeps.reconcile(svc, booted_at, ended)
            # what a dead process of this node had taken and not finished goes back to its queues
            # now, not after the visibility timeout (its begun stages' jobs were just ended)
            restored = transport.restore_held(app, lambda holder, _read: _gone(holder, sender, host))
            if svc.admission is not None:
                svc.admission.publish_capacity()
    for record in ended:
        from tasks.stages import announce_end

        announce_end(record)
    metrics.restored("startup", len(restored))
    if ended or destroyed or restored:
        log.warning("reconciled node %s: ended %d lost job(s), destroyed %d sandbox(es), gave back %d message(s)"
                    " a dead process of it held", sender, len(ended), len(destroyed), len(restored))
    _beating.update(client=client, node=sender)
    thread = threading.Thread(target=_beat_forever, args=(client, sender, queues, booted_at, settings),
                              name="sandbox-heartbeat", daemon=True)
    thread.start()
    _beating["thread"] = thread


def _gone(holder: dict[str, Any], node: str, host: str) -> bool:
    """True for a holder that was a process of this node on this host and is no longer running."""
    since = holder.get("since")
    return (holder.get("node") == node and holder.get("host") == host and isinstance(since, (int, float))
            and not nodes.process_alive(holder.get("pid"), since))


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
    if "thread" in _beating:  # a beat under way now would write the entry back after its removal
        _beating["thread"].join(timeout=5)
    if "client" in _beating:  # stopped on purpose: no heartbeat alert for this node
        try:
            nodes.stopped(_beating["client"], _beating["node"])
        except redis.RedisError as e:
            log.warning("could not record that node %s stopped: %s", _beating["node"], e)


__all__ = ["app"]
