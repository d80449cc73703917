"""`python -m sandbox health`: is the service up, and if not, what is wrong (exit 0 ok, 1 degraded, 2 down)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import redis

from config.settings import Settings
from sandbox.nodes import LAST_BEATS_KEY, sweep_periods
from sandbox.observability.cluster import Cluster, node_queue

OK, DEGRADED, DOWN = "ok", "degraded", "down"
EXIT_CODES = {OK: 0, DEGRADED: 1, DOWN: 2}
# A sweep is due one period after its last run (or after beat started, if later); it counts as missed
# once a second period and this slack passed too (a beat tick, a queue hop, the sweep's own run time).
SWEEP_SLACK_S = 10.0
MEMORY_HEADROOM = 0.9  # used/maxmemory above this is degraded: writes fail at maxmemory under noeviction


@dataclass
class Check:
    """One line of the table."""

    name: str
    status: str
    detail: str


def worst(checks: list[Check]) -> str:
    order = [OK, DEGRADED, DOWN]
    return max((c.status for c in checks), key=order.index, default=OK)


def run(settings: Settings, artifacts: Callable[[], Any], now: float | None = None) -> list[Check]:
    """Every check; with Redis down, the checks that read it say so instead of running.
    `artifacts` builds the ArtifactStore (it refuses to exist without S3 settings: that is a check's answer)."""
    now = time.time() if now is None else now
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)
    checks = [_guard("s3", lambda: check_s3(artifacts()))]
    try:
        client.ping()
    except redis.RedisError as e:
        return [Check("redis", DOWN, f"unreachable at {where(settings.redis_url)}: {e}"), *checks,
                *(Check(n, DOWN, "unknown: Redis is down") for n in ("workers", "beat", "queues", "dead_letters"))]
    cluster = Cluster(client)
    fresh_s = 3 * float(getattr(settings, "heartbeat_interval_s", 10.0))
    checks[:0] = [_guard("redis", lambda: check_redis(cluster))]
    checks += [_guard("workers", lambda: check_workers(cluster, fresh_s, now)),
               _guard("beat", lambda: check_beat(cluster, now, sweep_periods(settings))),
               _guard("queues", lambda: check_queues(cluster, fresh_s, settings.queue_age_max_s, now)),
               _guard("dead_letters", lambda: check_dead_letters(cluster))]
    return checks


def check_dead_letters(cluster: Cluster) -> Check:
    """Messages no worker could run wait in `sandbox.dead` for someone to look at them."""
    count = cluster.dead_letters()
    if not count:
        return Check("dead_letters", OK, "none")
    return Check("dead_letters", DEGRADED, f"{count} message(s) no worker could run: "
                 "python -m sandbox dead-letters (then --drop ID or --drop-all)")


def _guard(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - a check that cannot run says why, the others still run
        return Check(name, DOWN, f"check failed: {type(e).__name__}: {e}")


def where(url: str) -> str:
    """The host part of a URL: what an error may print (never a password)."""
    return url.split("@")[-1]


def check_redis(cluster: Cluster) -> Check:
    facts = cluster.redis_facts()
    problems = []
    if not facts["aof_enabled"]:
        problems.append("persistence: AOF is off (a restart loses queued jobs and records since the last snapshot)")
    if not (facts["rdb_last_bgsave_ok"] and facts["aof_last_write_ok"]):
        problems.append("persistence: the last RDB save or AOF write failed")
    if facts["maxmemory_policy"] != "noeviction":
        problems.append(f"eviction: maxmemory-policy is {facts['maxmemory_policy']} (must be noeviction, or "
                        "Redis drops queued messages and job records when full)")
    used, limit = facts["used_memory_bytes"], facts["maxmemory_bytes"] or facts["total_system_memory_bytes"]
    if limit and used > MEMORY_HEADROOM * limit:
        problems.append(f"memory: {used} of {limit} bytes used")
    shown = f"aof={'on' if facts['aof_enabled'] else 'off'}, policy={facts['maxmemory_policy']}, used={used} B"
    return Check("redis", DEGRADED if problems else OK, "; ".join(problems) or shown)


def check_s3(artifacts: Any) -> Check:
    try:
        artifacts.check_bucket()
    except Exception as e:  # noqa: BLE001 - StorageError/StorageUnavailable carry the reason
        return Check("s3", DOWN, f"bucket {artifacts.bucket}: {e}")
    return Check("s3", OK, f"bucket {artifacts.bucket} reachable with the configured credentials")


def check_workers(cluster: Cluster, fresh_s: float, now: float) -> Check:
    beats = cluster.heartbeats(now)
    live = [b for b in beats if b.live(fresh_s)]
    if not live:
        return Check("workers", DOWN, f"no worker: no heartbeat younger than {fresh_s:.0f} s "
                     f"({len(beats)} node(s) ever seen)")
    problems = [f"{b.node} does not consume {', '.join(missing)}" for b in live
                if (missing := [q for q in ("sandbox", node_queue(b.node)) if q not in b.queues])]
    # a node that died keeps its last beat's age (one stopped on purpose has none): it is a problem
    # even while another node serves, until it beats again or is forgotten
    problems += [f"{b.node} died: no heartbeat for {b.age_s:.0f} s (once it is gone for good: "
                 f"redis-cli hdel {LAST_BEATS_KEY} {b.node})" for b in beats if b not in live and b.age_s is not None]
    gone = [b.node for b in beats if b not in live]
    detail = f"{len(live)} live: {', '.join(b.node for b in live)}" + (f"; gone: {', '.join(gone)}" if gone else "")
    return Check("workers", DEGRADED if problems else OK, "; ".join(problems) or detail)


def check_beat(cluster: Cluster, now: float, periods_s: dict[str, float]) -> Check:
    """Each sweep ran within two periods (+ slack) of its last run or of beat's start, whichever is later:
    on a stack whose beat started minutes ago the hourly artifact sweep is not due yet, not missed.
    `periods_s` (from the settings) stands in for the periods a beat publishes when it starts."""
    started = cluster.beat_started()
    started_at = float(started["at"]) if started else None
    published = (started or {}).get("periods_s")
    periods = {**periods_s, **{k: float(v) for k, v in (published if isinstance(published, dict) else {}).items()
                               if isinstance(v, (int, float)) and v > 0}}
    problems, seen = [], []
    for name, entry in cluster.last_sweeps().items():
        at = entry.get("at") if entry else None
        ran = isinstance(at, (int, float))
        period = periods.get(name, 3600.0)
        since = max(at if ran else 0.0, started_at or 0.0)
        if not since:
            problems.append(f"sweep {name} never ran and no beat start is recorded: is beat running?")
        elif now - since <= 2 * period + SWEEP_SLACK_S:
            seen.append(f"{name} {now - at:.0f} s ago" if ran else f"{name} not due yet")
        elif ran and at >= since:
            problems.append(f"sweep {name} last ran {now - at:.0f} s ago (every {period:.0f} s)")
        else:
            problems.append(f"sweep {name} has not run since beat started {now - since:.0f} s ago "
                            f"(every {period:.0f} s{f'; last ran {now - at:.0f} s ago' if ran else ''})")
    if started_at is not None:
        seen.append(f"beat started {now - started_at:.0f} s ago")
    return Check("beat", DEGRADED if problems else OK, "; ".join(problems) or "sweeps: " + ", ".join(seen))


def check_queues(cluster: Cluster, fresh_s: float, max_age_s: float, now: float) -> Check:
    problems, total = [], 0
    for q in cluster.queues(fresh_s, now):
        total += q.messages
        if q.messages and not q.consumers:
            problems.append(f"{q.name}: {q.messages} message(s) and no consumer")
        if q.oldest_age_s is not None and q.oldest_age_s > max_age_s:
            problems.append(f"{q.name}: oldest message {q.oldest_age_s:.0f} s old (limit {max_age_s:.0f} s)")
    return Check("queues", DEGRADED if problems else OK, "; ".join(problems) or f"{total} message(s) waiting")


def table(checks: list[Check]) -> str:
    """The short table the CLI prints."""
    width = max(len(c.name) for c in checks)
    lines = [f"{c.name:<{width}}  {c.status.upper():<8}  {c.detail}" for c in checks]
    return "\n".join(lines + [f"{'overall':<{width}}  {worst(checks).upper()}"])


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"status": worst(checks), "checks": [asdict(c) for c in checks]}
