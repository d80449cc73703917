"""The worker's message guard: no message can stop or stall a worker.

Celery's own handler trusts the envelope: a body that is JSON but not `[args, kwargs, embed]`
killed the worker's main process, headers without `id` looped the connection forever. Every task
message now passes `check_message` first; one that fails (or that makes Celery's strategy raise) is
logged, counted, copied to `sandbox.dead` and acknowledged, and the worker goes on. The same guard
counts deliveries per task id (SANDBOX_MAX_DELIVERIES) and hands `sandbox.cancel` to its own
threads, so a cancel never waits behind busy pool slots.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable

import redis
from celery import bootsteps, states
from celery.signals import task_postrun
from kombu import Consumer as KombuConsumer, Queue
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer as CeleryConsumer

from config import load_settings
from sandbox import deadletters

log = logging.getLogger("sandbox.consumer")

CONTROL_QUEUE = "sandbox.control"  # cancel and beat's sweeps are routed here (celeryconfig.task_routes)
# Run on side threads when they come through the control queue: none of them may wait for a slot
# (a cancel must act within a second, a stuck job must end within a minute when every slot is busy).
CONTROL_TASKS = ("sandbox.cancel", "sandbox.sweep_stuck", "sandbox.sweep_orphans")
STAGES = ("sandbox.create", "sandbox.prepare", "sandbox.execute", "sandbox.collect", "sandbox.cleanup")
_OPTIONAL_STR = ("root_id", "parent_id", "group", "shadow", "origin", "argsrepr", "kwargsrepr", "lang")
# Cancels (and giving up on over-delivered jobs) run here: never in a pool slot, never in the
# consumer's own thread (a remote kill waits for replies).
side_work = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sandbox-side")
# Task events (received, started, succeeded) wait this long in the dispatcher's buffer, so that one
# PUBLISH carries those of many tasks: Celery flushed on the next loop tick, ~2.5 PUBLISH per task.
EVENT_BATCH_S = 0.05
# Celery's dispatcher also flushes, in the sending thread, whenever 24 events wait: at ~25 jobs/s
# (23 events each) that was most batches, each a PUBLISH from a pool thread. Only this bound (memory
# while the batch thread is late) flushes early now.
EVENT_BUFFER_LIMIT = 1000


class Poison(Exception):
    """A message no worker can run; the text says why."""


def check_message(message: Any, registered: Callable[[str], bool], max_bytes: int) -> tuple[str, str, list]:
    """(task name, task id, [args, kwargs, embed]) of a well-formed protocol-2 JSON task message."""
    headers = message.headers
    if not isinstance(headers, dict):
        raise Poison(f"headers are {type(headers).__name__}, not an object")
    task, task_id = headers.get("task"), headers.get("id")
    if "task" not in headers and "id" not in headers:
        raise Poison("not a Celery protocol-2 task message (no task/id headers)")
    if not isinstance(task, str) or not task:
        raise Poison("header 'task' is missing or not a string")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 255:
        raise Poison("header 'id' is missing or not a string")
    if not registered(task):
        raise Poison(f"unknown task {task[:200]!r}")
    _check_headers(headers)
    if message.content_type != "application/json":
        raise Poison(f"content type {str(message.content_type)[:100]!r} is not application/json")
    body = message.body
    if not isinstance(body, (bytes, str)):
        raise Poison("body is not text")
    if len(body) > max_bytes:
        raise Poison(f"body of {len(body)} bytes exceeds SANDBOX_MAX_MESSAGE_BYTES ({max_bytes})")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Poison(f"body is not JSON: {e}") from e
    if (not isinstance(payload, list) or len(payload) != 3 or not isinstance(payload[0], list)
            or not isinstance(payload[1], dict) or not isinstance(payload[2], dict)):
        raise Poison("body is not [args, kwargs, embed]")
    for key in ("callbacks", "errbacks", "chain"):
        if payload[2].get(key) is not None and not isinstance(payload[2][key], list):
            raise Poison(f"embed field {key!r} is not a list")
    return task, task_id, payload


def _check_headers(headers: dict) -> None:
    for key in _OPTIONAL_STR:
        if headers.get(key) is not None and not isinstance(headers[key], str):
            raise Poison(f"header {key!r} is not a string")
    for key in ("eta", "expires"):
        value = headers.get(key)
        if value is None:
            continue
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError) as e:
            raise Poison(f"header {key!r} is not an ISO 8601 time") from e
    retries = headers.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise Poison("header 'retries' is not a whole number")
    limits = headers.get("timelimit")
    if limits is not None and (not isinstance(limits, (list, tuple)) or len(limits) != 2 or any(
            v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)) for v in limits)):
        raise Poison("header 'timelimit' is not [soft, hard]")


class Consumer(CeleryConsumer):
    """Celery's consumer with the guard in front of every task strategy (`worker_consumer`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = load_settings()
        self.guard_redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
        self._events_due = threading.Event()
        threading.Thread(target=self._flush_events_in_batches, name="sandbox-events", daemon=True).start()
        # The task-sent events of the chain links this worker publishes join the same batches.
        self.app.amqp._event_dispatcher = _SentEventsInBatches(self, self.app.amqp._event_dispatcher)

    @property
    def event_dispatcher(self) -> Any:
        return self._event_dispatcher

    @event_dispatcher.setter
    def event_dispatcher(self, dispatcher: Any) -> None:
        # Celery's Events step makes a new dispatcher at every (re)connect: each gets the bound.
        if dispatcher is not None:
            dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        self._event_dispatcher = dispatcher

    def on_send_event_buffered(self) -> None:
        # (Celery's own: hub.call_soon(flush) for every buffered event.) The dispatcher's mutex
        # serialises this thread's flushes with the worker heartbeat's publishes.
        self._events_due.set()

    def _flush_events_in_batches(self) -> None:
        while True:
            self._events_due.wait()
            time.sleep(EVENT_BATCH_S)
            self._events_due.clear()  # before the flush: an event buffered during it sets it again
            try:
                self._flush_events()
            except Exception:  # noqa: BLE001 - a lost connection: Events.start re-buffers and flushes
                log.exception("could not publish task events")

    def _flush_events_now(self) -> None:
        try:  # what the last batch holds, before the dispatcher closes
            self._flush_events()
        except Exception:  # noqa: BLE001 - stopping goes on
            log.exception("could not publish the last task events")

    def stop(self) -> None:
        self._flush_events_now()
        super().stop()

    def shutdown(self) -> None:
        self._flush_events_now()
        super().shutdown()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        celery_handler = super().create_task_handler(*args, **kwargs)
        registered = self.app.tasks.__contains__

        def on_task_received(message: Any) -> None:
            queue = _queue_of(message)
            try:
                task, task_id, payload = check_message(message, registered, self.settings.max_message_bytes)
            except Poison as e:
                return self._dead(message, queue, str(e))
            except Exception as e:  # noqa: BLE001 - whatever it is, it must not reach Celery
                return self._dead(message, queue, f"unreadable message: {type(e).__name__}: {e}")
            if task_id in worker_state.requests:
                # The same delivery again while it still runs here (a broker reconnect restores
                # unacknowledged messages): running it twice is never right.
                log.warning("task %s (%s) delivered again while it runs here; dropped the copy", task_id, task)
                return _ack(message)
            if self._over_delivered(task, task_id, payload, message):
                return None
            if task == "sandbox.cancel":
                return self._side(message, task_id, payload, cancel_now, task)
            if not getattr(message, "_decoded_cache", True):
                # Celery's strategy decodes the body only to tell protocol 1 from 2 (`'args' in
                # message.payload`): the guard's parse answers that just as well.
                message._decoded_cache = payload
            try:
                celery_handler(message)
            except Exception as e:  # noqa: BLE001 - Celery's strategy raised: the worker would die
                log.exception("task message %s (%s) broke Celery's handler", task_id, task)
                self._dead(message, queue, f"{type(e).__name__} in Celery's handler: {e}", task, task_id)
            return None

        return on_task_received

    def _dead(self, message: Any, queue: str, reason: str, task: Any = None, task_id: Any = None) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = task_id or headers.get("id")
        deadletters.push(self.guard_redis, queue, reason, message.body, task or headers.get("task"),
                         task_id, cap=self.settings.dead_letter_max)
        if isinstance(task_id, str) and 0 < len(task_id) <= 255:
            try:  # a producer waiting on this task gets the reason, not silence
                self.app.backend.mark_as_failure(task_id, ValueError(f"dead-lettered: {reason}"))
            except Exception:  # noqa: BLE001 - the dead letter is what matters
                log.exception("could not store the failure of dead-lettered task %s", task_id)
        _ack(message)

    def _over_delivered(self, task: str, task_id: str, payload: list, message: Any) -> bool:
        """Count this delivery if it is a redelivery; past SANDBOX_MAX_DELIVERIES the task is given up.

        A first delivery costs no Redis write: it has nothing to count yet, and one that dies with
        its worker comes back through kombu's restore (visibility timeout, a closing channel, a
        Reject with requeue), which flags the message `redelivered`. A redelivery finding no count
        counts the first delivery too (SET NX 1, then INCR): the only first delivery that ran to an
        end and still came back is a requeued Reject, and its task_postrun leaves a 0 behind."""
        if not _redelivered(message):
            return False
        retries = message.headers.get("retries", 0)
        key = deliveries_key(task_id, retries)
        try:
            pipe = self.guard_redis.pipeline(transaction=True)
            pipe.set(key, 1, nx=True, ex=self.settings.record_ttl_s)
            pipe.incr(key)
            pipe.expire(key, self.settings.record_ttl_s)
            count = int(pipe.execute()[1])
        except redis.RedisError:
            return False  # the broker connection has its own recovery; do not drop work over a count
        if count <= self.settings.max_deliveries:
            if len(_counted) > _COUNTED_MAX:
                _counted.clear()
            _counted.add((task_id, retries))
            return False
        reason = (f"{task} was delivered {count} times (SANDBOX_MAX_DELIVERIES={self.settings.max_deliveries}) "
                  "and its worker died before it ended each time")
        job_id = payload[0][0] if task in STAGES and payload[0] and isinstance(payload[0][0], str) else None
        if job_id is None:
            self._dead(message, _queue_of(message), reason, task, task_id)
        else:
            self._side(message, task_id, [[job_id, reason], {}, {}], give_up_now)
        return True

    def _side(self, message: Any, task_id: str, payload: list, work: Callable[..., Any],
              as_task: str | None = None) -> None:
        def run() -> None:
            try:
                result = work(*payload[0], **payload[1])
                self.app.backend.store_result(task_id, result, states.SUCCESS)
                log.info("side task %s[%s] returned %r", work.__name__, task_id, result)
                if as_task:  # what Celery's tracer would signal, so audit and metrics hooks see it
                    task_postrun.send(sender=self.app.tasks[as_task], task_id=task_id, task=self.app.tasks[as_task],
                                      args=payload[0], kwargs=payload[1], retval=result, state=states.SUCCESS)
            except Exception as e:  # noqa: BLE001 - the caller gets the failure as a task failure
                log.exception("%s of task %s failed", work.__name__, task_id)
                try:
                    self.app.backend.mark_as_failure(task_id, e)
                except Exception:  # noqa: BLE001
                    log.exception("could not store the failure of task %s", task_id)
            finally:
                # acks go through the event loop's own thread, as the pool's do
                self.call_soon_ack(_ack, message)

        side_work.submit(run)


class _SentEventsInBatches:
    """Stands in for Celery's task-sent publisher (AMQP._event_dispatcher, whose `publish` sent one
    PUBLISH per task sent): the worker's own dispatcher buffers it with its other task events. Its
    `hostname` (Flower's "client" of the task) is then the worker's node name."""

    def __init__(self, consumer: Consumer, fallback: Any) -> None:
        self.consumer, self.fallback = consumer, fallback

    def publish(self, type: str, fields: dict, producer: Any, **kwargs: Any) -> Any:  # noqa: A002 - Celery's name
        dispatcher = self.consumer.event_dispatcher
        if (type != "task-sent" or dispatcher is None or not dispatcher.enabled
                or "task" not in (dispatcher.groups or ("task",)) or not dispatcher.on_send_buffered):
            return self.fallback.publish(type, fields, producer, **kwargs)
        return dispatcher.send(type, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fallback, name)


class ControlConsumer(bootsteps.ConsumerStep):
    """Consumes `sandbox.control` (cancels, beat's stuck and orphan sweeps) on a channel of its own,
    outside the task prefetch limit: with every slot busy the task channel fetches nothing, this one
    still does (a cancel sent to another queue still works, once a slot frees)."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.c = c

    def get_consumers(self, channel: Any) -> list[Any]:
        return [KombuConsumer(channel, queues=[Queue(CONTROL_QUEUE)], on_message=self.on_message,
                              accept=["json"], no_ack=False)]

    def on_message(self, message: Any) -> None:
        guard = self.c  # our Consumer (celeryconfig.worker_consumer): its dead letters and side threads
        try:
            task, task_id, payload = check_message(message, CONTROL_TASKS.__contains__,
                                                   guard.settings.max_message_bytes)
        except Poison as e:
            return guard._dead(message, CONTROL_QUEUE, str(e))
        except Exception as e:  # noqa: BLE001
            return guard._dead(message, CONTROL_QUEUE, f"unreadable message: {type(e).__name__}: {e}")
        work = cancel_now if task == "sandbox.cancel" else guard.app.tasks[task].run
        return guard._side(message, task_id, payload, work, task)


def deliveries_key(task_id: str, retries: int) -> str:
    """Deliveries of one message (a retry is a new message under the same id) not yet run to an end."""
    return f"sandbox:deliveries:{task_id}:{retries}"


# (task id, retries) of redeliveries counted in Redis whose run has not ended yet in this process.
_counted: set[tuple[str, Any]] = set()
_COUNTED_MAX = 10_000  # a revoked redelivery never reaches task_postrun: never grow without bound


def _redelivered(message: Any) -> bool:
    """kombu's restore marks both (Channel._do_restore_message); either one is enough."""
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return bool(info.get("redelivered") or message.headers.get("redelivered"))


@task_postrun.connect
def _delivery_ran_to_its_end(task_id: str | None = None, task: Any = None, state: str | None = None,
                             **_: Any) -> None:
    # Whatever the outcome, this delivery did not kill its worker: only deliveries that never got
    # here count. A first delivery left no count behind unless it goes back to the queue (a create
    # requeued while it waits for capacity): then 0 says its redelivery is the first that counts.
    retries = getattr(getattr(task, "request", None), "retries", 0) or 0
    counted = (str(task_id), retries) in _counted
    if not counted and state != states.REJECTED:
        return
    from tasks.app import services

    _counted.discard((str(task_id), retries))
    key = deliveries_key(str(task_id), int(retries))
    try:
        client = services().store.redis
        if state == states.REJECTED:
            client.set(key, 0, ex=services().settings.record_ttl_s)
        else:
            client.delete(key)
    except Exception:  # noqa: BLE001 - a count left behind only matters after more crashes
        log.warning("could not clear the delivery count of task %s", task_id)


def _ack(message: Any) -> None:
    try:
        if not message.acknowledged:
            message.ack()
    except Exception:  # noqa: BLE001 - a lost connection restores it; the guard sees it again
        log.exception("could not acknowledge a message")


def _queue_of(message: Any) -> str:
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return str(info.get("routing_key") or info.get("queue") or "?")


def cancel_now(job_id: Any) -> dict:
    """sandbox.cancel, run on a side thread of the consumer."""
    from tasks.stages import cancel_job

    return cancel_job(job_id)


def give_up_now(job_id: str, reason: str) -> dict | None:
    """End a job whose stage keeps killing its worker, as `error` with the reason."""
    from tasks.stages import give_up

    return give_up(job_id, reason)
