"""Worker nodes in Redis: heartbeats, the broker's durability, and a restarted node's reconcile.

A node is one worker process (one host). It refreshes `sandbox:node:{node}:heartbeat` every
SANDBOX_HEARTBEAT_INTERVAL; a node whose heartbeat is older than SANDBOX_NODE_DEAD_AFTER (or gone)
is dead, and the stuck sweep ends its jobs. A node that comes back reconciles first: whatever of
its jobs a stage was running in the dead process ends `error` ("worker lost"), never runs again.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import redis

from sandbox.errors import ConfigError
from sandbox.state import JobRecord, JobStatus, JobStore

log = logging.getLogger("sandbox.nodes")
NODES_SET = "sandbox:nodes"
# node -> time of its last heartbeat, kept after the heartbeat key expires: a node that died keeps
# an age (its alert fires), one stopped on purpose is removed (stopped()), nothing else expires it
LAST_BEATS_KEY = "sandbox:nodes:last_beat"
_OUTCOME_STATUS = {s.value: s for s in JobStatus}


def node_queue(node: str) -> str:
    """The queue only `node` consumes: every stage after create runs where the sandbox is."""
    return f"sandbox.node.{node}"


def sweep_last_key(name: str) -> str:
    """When the sweep `name` last ran, and what it did (read by health and the metrics)."""
    return f"sandbox:sweep:{name}:last"


BEAT_STARTED_KEY = "sandbox:beat:started"
ARTIFACTS_SWEEP_PERIOD_S = 3600.0  # retention is counted in days: once an hour is plenty
# Beat's sweeps, the one list of them (celeryconfig's beat_schedule, beat's announcement, health's
# "missed sweep" check, the metrics): name -> the setting holding its period in seconds (None: fixed).
_SWEEP_PERIOD_SETTINGS = {"orphans": "orphan_sweep_interval_s", "stuck": "stuck_sweep_interval_s", "artifacts": None}
SWEEPS = tuple(_SWEEP_PERIOD_SETTINGS)


def sweep_task(name: str) -> str:
    """The task beat sends for the sweep `name`."""
    return f"sandbox.sweep_{name}"


def sweep_periods(settings: Any) -> dict[str, float]:
    """Every sweep beat sends, and how often (seconds), as celeryconfig's beat_schedule sets them."""
    return {name: float(getattr(settings, field)) if field else ARTIFACTS_SWEEP_PERIOD_S
            for name, field in _SWEEP_PERIOD_SETTINGS.items()}


def beat_schedule(settings: Any) -> dict[str, dict[str, Any]]:
    """Celery's beat_schedule: every sweep, every period."""
    return {f"sweep-{name}": {"task": sweep_task(name), "schedule": period}
            for name, period in sweep_periods(settings).items()}


def beat_started(client: Any, periods_s: dict[str, float], host: str) -> None:
    """Record that a beat started now, and its sweep periods: health tells a sweep not due yet from
    one that was missed by counting from here (an hourly sweep has not run on a 5-minute-old stack)."""
    client.set(BEAT_STARTED_KEY, json.dumps({"at": time.time(), "host": host, "pid": os.getpid(),
                                             "periods_s": periods_s}))


def heartbeat_key(node: str) -> str:
    return f"sandbox:node:{node}:heartbeat"


def beat(client: redis.Redis, node: str, queues: list[str], started_at: float, dead_after_s: float) -> None:
    """Write this node's heartbeat (expiring once it would count as dead anyway)."""
    value = {"node": node, "pid": os.getpid(), "at": time.time(), "queues": queues, "started_at": started_at}
    pipe = client.pipeline()
    pipe.set(heartbeat_key(node), json.dumps(value), px=int(dead_after_s * 1000))
    pipe.sadd(NODES_SET, node)
    pipe.hset(LAST_BEATS_KEY, node, repr(value["at"]))
    pipe.execute()


def stopped(client: Any, node: str) -> None:
    """A node stopped on purpose (a warm shutdown): its last-beat age is no longer exported, so the
    heartbeat alert pages for a node that died, not for one taken out of service."""
    client.hdel(LAST_BEATS_KEY, node)


def heartbeat(client: Any, node: str) -> dict[str, Any] | None:
    """The node's last heartbeat, or None."""
    return beat_of(client.get(heartbeat_key(node)))


def beat_of(raw: Any) -> dict[str, Any] | None:
    """A heartbeat as read from its key (None: missing or unreadable)."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def is_dead(beat_value: dict[str, Any] | None, dead_after_s: float, now: float) -> bool:
    """True when a node's heartbeat is missing or older than `dead_after_s`."""
    return beat_value is None or now - float(beat_value.get("at", 0)) > dead_after_s


def heartbeats_tell(client: Any, dead_after_s: float) -> bool:
    """True when a missing or old heartbeat can mean a dead node: Redis has been up at least
    `dead_after_s`. A Redis that restarted after being down longer than that has let every
    heartbeat expire (their TTL is an absolute time in its AOF), and every live node looks dead
    until its next beat: a sweep then would end, or take the messages of, nodes that run."""
    try:
        uptime = client.info("server").get("uptime_in_seconds")
    except redis.ResponseError:  # INFO refused (a managed Redis's renamed command): judge as before
        return True
    try:
        return uptime is None or float(uptime) >= dead_after_s
    except (TypeError, ValueError):
        return True


# -- the broker must keep what it is given ------------------------------------------------------

def durability_problems(client: redis.Redis) -> list[str]:
    """What this Redis lacks to keep every job across a restart (empty when nothing)."""
    problems = []
    try:
        config = {**client.config_get("appendonly"), **client.config_get("appendfsync"),
                  **client.config_get("maxmemory-policy"), **client.config_get("save")}
    except redis.ResponseError as e:  # CONFIG disabled (managed Redis): fall back to INFO
        info = client.info("persistence")
        if not info.get("aof_enabled"):
            problems.append(f"AOF is off (and CONFIG GET is refused: {e})")
        return problems
    if config.get("appendonly") != "yes":
        problems.append("appendonly is not 'yes': a restart loses every queued message and job record")
    elif config.get("appendfsync") not in ("everysec", "always"):
        problems.append(f"appendfsync is {config.get('appendfsync')!r}: use 'everysec' (lose at most 1 s)")
    if config.get("maxmemory-policy") != "noeviction":
        problems.append(f"maxmemory-policy is {config.get('maxmemory-policy')!r}: Redis may evict queued "
                        "messages and job records under memory pressure; use 'noeviction'")
    return problems


def check_durability(client: redis.Redis, require: bool) -> list[str]:
    """Warn loudly about a broker that can lose jobs; refuse to start if `require`."""
    problems = durability_problems(client)
    for problem in problems:
        log.error("REDIS IS NOT DURABLE: %s (see docs/reliability.md)", problem)
    if problems and require:
        raise ConfigError("SANDBOX_REQUIRE_DURABLE_REDIS", "the broker is not durable: " + "; ".join(problems))
    return problems


# -- which jobs a dead process was running -------------------------------------------------------

def running_stage(record: JobRecord) -> tuple[str, dict[str, Any]] | None:
    """The stage that began and never finished (name, entry), if any."""
    open_stages = [(name, e) for name, e in record.get("stages", {}).items()
                   if e.get("started_at") is not None and e.get("finished_at") is None]
    return max(open_stages, key=lambda item: item[1]["started_at"]) if open_stages else None


def node_of(record: JobRecord) -> str | None:
    """The node a job depends on now: the host of its running stage, else of its sandbox."""
    stage = running_stage(record)
    if stage is not None:
        return stage[1].get("host")
    return (record.get("sandbox") or {}).get("host")


def lost_on(record: JobRecord, node: str, before: float) -> bool:
    """True if a stage of this job began on `node` (this host) before `before`, in a process that is
    gone (another live process under the same node name keeps its own stages)."""
    stage = running_stage(record)
    if stage is None or stage[1].get("host") != node or stage[1]["started_at"] >= before:
        return False
    return not process_alive(stage[1].get("pid"), stage[1]["started_at"])


def process_alive(pid: Any, since: float) -> bool:
    """True if process `pid` of this host runs and was already running at `since` (a pid reused by a
    later process, such as a restarted container's worker, is not the same process)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="utf-8") as f:
            boot_s = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    started_s = boot_s + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time
    return started_s <= since + 1.0  # btime is whole seconds


def lost_ending(record: JobRecord, reason: str) -> tuple[JobStatus, dict[str, Any] | None]:
    """The one terminal status of a job whose worker was lost: its command's own ending if it had one."""
    if record.get("cancel_requested"):
        return JobStatus.CANCELLED, {"code": "cancelled", "message": "cancelled on request", "field": None}
    outcome = (record.get("outcome") or {}).get("outcome")
    if outcome and outcome != "error":
        return _OUTCOME_STATUS[outcome], None  # it ran to its end; only collect or cleanup was lost
    return JobStatus.ERROR, {"code": "worker_lost", "message": reason, "field": None}


def end_if(store: JobStore, job_id: str, still: Any, reason: str,
           watch: tuple[str, ...] = ()) -> JobRecord | None:
    """End the job as lost if `still(record, read)` holds, in one atomic step; the ended record or None.

    `read(key)` reads one of `watch` inside the same transaction, so a heartbeat that arrives
    between the check and the write aborts the write (and the check runs again).
    """
    key = f"sandbox:job:{job_id}"
    ended: dict[str, Any] = {}

    def apply(pipe: Any) -> None:
        ended.clear()
        raw = pipe.get(key)
        if raw is None:
            return
        record = json.loads(raw)
        if JobStatus(record["status"]).terminal or not still(record, pipe.get):
            return
        status, error = lost_ending(record, reason)
        now = time.time()
        record.update(status=status.value, finished_at=now, updated_at=now)
        record["timeline"].append({"status": status.value, "at": now})
        if error:
            record["error"] = error
        pipe.multi()
        pipe.set(key, json.dumps(record), keepttl=True)
        pipe.zrem("sandbox:jobs:active", job_id)
        # the same status event a normal ending sends, in the same transaction: a sweep that dies
        # right after its write cannot leave a terminal record whose event never went out
        ended["published"] = store.publish_status_on(pipe, record)
        ended["record"] = record

    store.redis.transaction(apply, key, *watch)
    record = ended.get("record")
    if record is not None and not ended["published"]:
        store.publish_status(record)
    return record


# -- a waiter whose job Redis lost ---------------------------------------------------------------

def redis_run_id(client: redis.Redis) -> str | None:
    """The run of Redis `client` talks to (INFO's run_id, new at every start), or None if it is down.
    A submitter reads it before it sends: the baseline its SubmissionWatch compares against."""
    try:
        return str(client.info("server").get("run_id"))
    except redis.RedisError:
        return None


class SubmissionWatch:
    """Tells a submitter waiting for a job when that job can no longer end (Redis lost it).

    `run_id` is the run of Redis the job was submitted to (`redis_run_id`, read before the send), so
    a restart between the submit and a later wait is seen too. Without it (or when Redis was down
    then) the baseline is the run seen when the wait begins, and a data-losing restart before that
    goes unseen: such a wait ends only by its own timeout.

    Each check reads the record once. Only a Redis restart (its `run_id` changed) while the job was
    never recorded is a reason to look for its message in the queue and `unacked`: at once, then
    again after RESCAN_FIRST_S doubling up to RESCAN_MAX_S while it stays unrecorded (a queue of
    thousands is not read on every tick). A scan that misses it is confirmed by one more scan
    RESCAN_FIRST_S later before the job is called lost: kombu moves a restored or just-fetched
    message between the queue and `unacked` in two steps, so one scan can fall between them.
    """

    RESCAN_FIRST_S = 1.0
    RESCAN_MAX_S = 60.0

    def __init__(self, client: redis.Redis, job_id: str, task_id: str, queue: str = "sandbox",
                 clock: Callable[[], float] = time.monotonic, run_id: str | None = None) -> None:
        self.client, self.job_id, self.task_id, self.queue = client, job_id, task_id, queue
        self.clock = clock
        self.run_id = run_id if run_id is not None else redis_run_id(client)
        self.seen = False
        self.next_scan_at: float | None = None  # set by a restart; None: no reason to scan
        self.rescan_s = self.RESCAN_FIRST_S
        self.missed = False  # the last scan did not find the message: the next one confirms

    def check(self) -> tuple[str, Any] | None:
        """("ended", record), ("vanished", reason), or None while the job may still end."""
        try:
            raw = self.client.get(f"sandbox:job:{self.job_id}")
            if raw is not None:
                self.seen = True
                record = json.loads(raw)
                return ("ended", record) if JobStatus(record["status"]).terminal else None
            if self.seen:
                return "vanished", f"job {self.job_id}'s record disappeared from Redis (data lost)"
            return self._check_unrecorded()
        except redis.RedisError:
            return None  # Redis is down: keep waiting, it may come back with everything

    def _check_unrecorded(self) -> tuple[str, Any] | None:
        run_id = redis_run_id(self.client)
        if self.run_id is None:
            self.run_id = run_id  # Redis was down at the submit and when the wait began: the first run seen
        elif run_id is not None and run_id != self.run_id:
            self.run_id, self.missed = run_id, False  # restarted (again): look at once
            self.next_scan_at, self.rescan_s = self.clock(), self.RESCAN_FIRST_S
        if self.next_scan_at is None or self.clock() < self.next_scan_at:
            return None
        if self._in_flight():
            self.missed = False
            self.next_scan_at = self.clock() + self.rescan_s
            self.rescan_s = min(self.rescan_s * 2, self.RESCAN_MAX_S)
            return None
        if not self.missed:
            self.missed = True
            self.next_scan_at = self.clock() + self.RESCAN_FIRST_S
            return None
        return "vanished", (f"Redis restarted and job {self.job_id} was lost with it (never recorded, "
                            "no longer queued): submit it again")

    def _in_flight(self) -> bool:
        needle = self.task_id.encode()
        return (any(needle in item for item in self.client.lrange(self.queue, 0, -1))
                or any(needle in item for item in self.client.hvals("unacked")))


# -- queues nobody reads ---------------------------------------------------------------------------

SERVICE_QUEUES = ("sandbox", "celery", "sandbox.control")


def unconsumed_queues(client: redis.Redis, dead_after_s: float, now: float | None = None) -> dict[str, int]:
    """Queues holding messages that no live node consumes: {queue: messages waiting}."""
    now = time.time() if now is None else now
    consumed: set[str] = set()
    for node in client.smembers(NODES_SET):
        beat_value = heartbeat(client, node.decode() if isinstance(node, bytes) else node)
        if not is_dead(beat_value, dead_after_s, now):
            consumed.update(beat_value.get("queues", []))
    names = set(SERVICE_QUEUES)
    for key in client.scan_iter(match="sandbox.node.*", count=500, _type="list"):
        names.add(key.decode() if isinstance(key, bytes) else key)
    waiting = {name: int(client.llen(name)) for name in sorted(names - consumed)}
    return {name: count for name, count in waiting.items() if count}
