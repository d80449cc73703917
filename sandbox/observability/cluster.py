"""What Redis says about the cluster: queues, heartbeats, admission, sweeps, Redis itself.

Read at scrape time (sandbox.observability.gauges) and by `python -m sandbox health`. Key names are
the shared contract (heartbeats and sweeps: reliability; admission: capacity; queues: kombu).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from sandbox.admission import admitted_key, capacity_key
from sandbox.deadletters import DEAD_LIST as DEAD_LETTERS
from sandbox.nodes import BEAT_STARTED_KEY, LAST_BEATS_KEY, NODES_SET, SERVICE_QUEUES, SWEEPS, heartbeat_key, node_queue, sweep_last_key
from sandbox.state import ACTIVE_SET

BASE_QUEUES = (*SERVICE_QUEUES, "sandbox.create")  # the intakes, Celery's default, control, creates
SENT_AT_HEADER = "sandbox_sent_at"  # unix seconds, set by every producer we ship (see docs/operations.md)
_KOMBU_BINDINGS = "_kombu.binding.*"
_KOMBU_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's Redis transport: a list per step, "queue\x06\x16<step>"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _json(raw: Any) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


@dataclass
class Heartbeat:
    """One node's last heartbeat; age_s is None for a node stopped on purpose (the node is gone).
    `expired`: its heartbeat key ran out, the age is its last beat's (never live, however young)."""

    node: str
    age_s: float | None
    queues: list[str] = field(default_factory=list)
    expired: bool = False

    def live(self, fresh_s: float) -> bool:
        return not self.expired and self.age_s is not None and self.age_s <= fresh_s


@dataclass
class Queue:
    """A broker queue: messages waiting, the oldest one's age, and the live nodes consuming it."""

    name: str
    messages: int
    oldest_age_s: float | None
    consumers: list[str]


class FirstSeen:
    """When a message without a sent-at header (a stock producer's) was first seen at a queue's head,
    by any process: kept in Redis, so `python -m sandbox health` (a new process every run) and every
    worker's gauges age it alike. A lower bound of its age."""

    TTL_S = 86400  # a message waiting longer than a day is old by then anyway

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def age(self, message_id: str, now: float) -> float:
        key = f"sandbox:queue:first_seen:{message_id[:200]}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(key, repr(now), nx=True, ex=self.TTL_S)
        pipe.get(key)
        _, seen = pipe.execute()
        try:
            return max(0.0, now - float(seen))
        except (TypeError, ValueError):
            return 0.0


class Cluster:
    """Reads of the shared keys; every method is a handful of Redis commands."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.first_seen = FirstSeen(client)

    def nodes(self) -> list[str]:
        return sorted(_text(n) for n in self.redis.smembers(NODES_SET))

    def heartbeats(self, now: float | None = None) -> list[Heartbeat]:
        """Every node seen, with its heartbeat's age: once the heartbeat's TTL ran out, the age of its
        last beat (a node that died); None for a node stopped on purpose or never recorded."""
        now = time.time() if now is None else now
        nodes = self.nodes()
        raws = self.redis.mget([heartbeat_key(n) for n in nodes]) if nodes else []
        lasts = self.redis.hmget(LAST_BEATS_KEY, nodes) if nodes else []
        beats = []
        for node, raw, last in zip(nodes, raws, lasts):
            beat = _json(raw)
            if not isinstance(beat, dict):
                last_at = _json(last)
                beats.append(Heartbeat(node, max(0.0, now - last_at) if isinstance(last_at, (int, float)) else None,
                                       expired=True))
                continue
            queues = [q for q in beat.get("queues") or [] if isinstance(q, str)]
            beats.append(Heartbeat(node, max(0.0, now - float(beat.get("at") or 0)), queues))
        return beats

    def queue_names(self, nodes: list[str]) -> list[str]:
        """Known queues, every queue ever bound in kombu's tables, and every node's own queue."""
        names = set(BASE_QUEUES) | {node_queue(n) for n in nodes}
        for key in self.redis.scan_iter(match=_KOMBU_BINDINGS, count=100):
            for member in self.redis.smembers(key):
                name = _text(member).split(_KOMBU_SEP)[-1]
                if name and "pidbox" not in name and not name.startswith("celeryev"):
                    names.add(name)
        return sorted(names)

    def queues(self, fresh_s: float, now: float | None = None) -> list[Queue]:
        """Depth, oldest message age and consumers (nodes with a heartbeat younger than fresh_s)."""
        now = time.time() if now is None else now
        beats = self.heartbeats(now)
        live = [b for b in beats if b.live(fresh_s)]
        out = []
        for name in self.queue_names([b.node for b in beats]):
            lists = [name] + [f"{name}{_KOMBU_SEP}{p}" for p in _PRIORITY_STEPS if p]
            pipe = self.redis.pipeline(transaction=False)
            for key in lists:
                pipe.llen(key)
                pipe.lindex(key, -1)  # kombu LPUSHes and BRPOPs: the oldest message is the last
            replies = pipe.execute()
            depth = sum(int(replies[i] or 0) for i in range(0, len(replies), 2))
            ages = [self._age(raw, now) for raw in replies[1::2] if raw is not None]
            out.append(Queue(name, depth, max(ages) if ages else None,
                             sorted(b.node for b in live if name in b.queues)))
        return out

    def _age(self, raw: bytes, now: float) -> float:
        message = _json(raw)
        headers = message.get("headers") if isinstance(message, dict) else None
        headers = headers if isinstance(headers, dict) else {}
        sent_at = headers.get(SENT_AT_HEADER)
        if isinstance(sent_at, (int, float)) and not isinstance(sent_at, bool):
            return max(0.0, now - float(sent_at))
        return self.first_seen.age(str(headers.get("id") or hashlib.sha256(raw).hexdigest()), now)

    def dead_letters(self) -> int:
        return int(self.redis.llen(DEAD_LETTERS))

    def active_jobs(self) -> int:
        return int(self.redis.zcard(ACTIVE_SET))

    def admission(self, node: str) -> tuple[dict[str, float], dict[str, float]]:
        """(admitted totals, capacity) of a node: cpu cores, memory/disk bytes, sandboxes."""
        admitted = {"cpu": 0.0, "memory_bytes": 0.0, "disk_bytes": 0.0, "sandboxes": 0.0}
        for raw in self.redis.hvals(admitted_key(node)):
            entry = _json(raw)
            if isinstance(entry, dict):
                admitted["sandboxes"] += 1
                for key in ("cpu", "memory_bytes", "disk_bytes"):
                    value = entry.get(key)
                    admitted[key] += float(value) if isinstance(value, (int, float)) else 0.0
        capacity = _json(self.redis.get(capacity_key(node)))
        capacity = capacity if isinstance(capacity, dict) else {}
        limits = {"cpu": capacity.get("cpu"), "memory_bytes": capacity.get("memory_bytes"),
                  "disk_bytes": capacity.get("disk_bytes"), "sandboxes": capacity.get("max_sandboxes")}
        return admitted, {k: float(v) for k, v in limits.items() if isinstance(v, (int, float))}

    def last_sweeps(self) -> dict[str, dict[str, Any] | None]:
        raws = self.redis.mget([sweep_last_key(n) for n in SWEEPS])
        return {name: (v if isinstance(v := _json(raw), dict) else None) for name, raw in zip(SWEEPS, raws)}

    def beat_started(self) -> dict[str, Any] | None:
        """When the last beat to start did, and the sweep periods it sends (None: no beat recorded one)."""
        value = _json(self.redis.get(BEAT_STARTED_KEY))
        return value if isinstance(value, dict) and isinstance(value.get("at"), (int, float)) else None

    def redis_facts(self) -> dict[str, Any]:
        """Persistence, eviction policy and memory, from INFO (CONFIG may be disabled on managed Redis)."""
        persistence, memory = self.redis.info("persistence"), self.redis.info("memory")
        return {
            "aof_enabled": bool(persistence.get("aof_enabled")),
            "rdb_last_bgsave_ok": persistence.get("rdb_last_bgsave_status", "ok") == "ok",
            "aof_last_write_ok": persistence.get("aof_last_write_status", "ok") == "ok",
            "maxmemory_policy": _text(memory.get("maxmemory_policy", "")),
            "used_memory_bytes": int(memory.get("used_memory", 0)),
            "maxmemory_bytes": int(memory.get("maxmemory", 0)),
            "total_system_memory_bytes": int(memory.get("total_system_memory", 0)),
        }
