"""Admission: a node builds a job's sandbox only while the admitted jobs' requests fit its capacity.

The ledger is the Redis hash `sandbox:node:{node}:admitted` (field = job id, value = JSON
{"cpu", "memory_bytes", "disk_bytes", "at"}), changed only by one Lua script, so any number of
threads and processes of one node admit atomically. Every ending releases (lifecycle._destroy);
`reconcile` gives back what a killed worker held, at start-up and after each orphan sweep.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import redis

from config.settings import Settings, free_disk_bytes
from config.units import format_size
from sandbox.errors import JobRejected
from sandbox.nodes import NODES_SET  # written by the heartbeat; read for submit-time checks
from sandbox.spec import ResourceLimits

log = logging.getLogger("sandbox.admission")

MIN_DISK_BYTES = 4 << 20  # the runtime's smallest image (ext4 metadata); requests below it use this
DISK_RESERVE_BYTES = 256 << 20  # never admit a job that would leave the work dir's filesystem fuller
POLL_S = 0.25  # a waiting create re-checks this often (releases by other processes are not signalled)
ADMIT_GRACE_S = 120.0  # an entry without a sandbox younger than this may be a create under way


def admitted_key(node: str) -> str:
    return f"sandbox:node:{node}:admitted"


def capacity_key(node: str) -> str:
    return f"sandbox:node:{node}:capacity"



# KEYS: admitted hash. ARGV: job id, entry JSON, cpu, memory, disk, cap cpu, cap memory, cap disk,
# max sandboxes, free disk now. Answers "ok" or the name of the resource that is short.
_ADMIT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'ok' end
local entries = redis.call('HVALS', KEYS[1])
if #entries + 1 > tonumber(ARGV[9]) then return 'max_sandboxes' end
local cpu, memory, disk = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if disk > tonumber(ARGV[10]) then return 'free_disk' end
for _, raw in ipairs(entries) do
  local e = cjson.decode(raw)
  cpu = cpu + e.cpu
  memory = memory + e.memory_bytes
  disk = disk + e.disk_bytes
end
if cpu > tonumber(ARGV[6]) + 1e-9 then return 'cpu' end
if memory > tonumber(ARGV[7]) then return 'memory' end
if disk > tonumber(ARGV[8]) then return 'disk' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 'ok'
"""


@dataclass(frozen=True)
class Request:
    """What one job's sandbox takes from its node while it exists."""

    cpu: float
    memory_bytes: int
    disk_bytes: int

    @classmethod
    def of(cls, resources: ResourceLimits) -> "Request":
        """From a JobSpec's limits (the disk as the runtime will size the image)."""
        return cls(float(resources.cpu), int(resources.memory_bytes), max(MIN_DISK_BYTES, int(resources.disk_bytes)))


@dataclass(frozen=True)
class Capacity:
    """What a node admits in total: cpu already multiplied by the overcommit factor."""

    cpu: float
    memory_bytes: int
    disk_bytes: int
    max_sandboxes: int

    @classmethod
    def of(cls, settings: Settings) -> "Capacity":
        # every live sandbox holds a host uid of its own: never admit more than the range has
        return cls(settings.node_cpu * settings.cpu_overcommit, settings.node_memory_bytes,
                   settings.node_disk_bytes, min(settings.node_max_sandboxes, settings.sandbox_uid_count))


def check_possible(resources: ResourceLimits, settings: Settings,
                   published: Iterable[dict] | Callable[[], Iterable[dict]] = ()) -> None:
    """JobRejected naming the field when no node (this one, or any that published its capacity)
    could ever admit the request: more cores than a node has, more memory or disk than it admits.
    `published` may be a function: it is called (a Redis read) only when this node alone is too small."""
    req = Request.of(resources)
    local = {"cpu": settings.node_cpu, "memory_bytes": settings.node_memory_bytes, "disk_bytes": settings.node_disk_bytes}
    needs = (("/resources/cpu", "cpu", req.cpu, "cores"),
             ("/resources/memory", "memory_bytes", req.memory_bytes, "bytes"),
             ("/resources/disk", "disk_bytes", req.disk_bytes, "bytes"))
    if all(need <= float(local[name]) for _, name, need, _ in needs):
        return  # the common case: this node could admit it, whatever the others have
    nodes = [local, *(published() if callable(published) else published)]
    for field, name, need, unit in needs:
        largest = max(float(n.get(name, 0)) for n in nodes)
        if need > largest:
            shown = f"{need:g} cores" if unit == "cores" else format_size(int(need))
            most = f"{largest:g} cores" if unit == "cores" else format_size(int(largest))
            raise JobRejected(field, "above_node_capacity",
                              f"{shown} is more than any worker node has ({most}); the job could never start")


class Admission:
    """This node's ledger of admitted sandboxes in Redis; safe to share between threads."""

    def __init__(self, client: redis.Redis, node: str, settings: Settings) -> None:
        self.redis, self.node, self.settings = client, node, settings
        self.capacity = Capacity.of(settings)
        self._script = client.register_script(_ADMIT)
        self._released = threading.Condition()
        self._waiting = 0  # this process's creates waiting for capacity (guarded by _released)

    @property
    def waiting(self) -> int:
        """How many creates of this process wait for capacity now (a submit admitting its job at once
        would overtake them)."""
        return self._waiting

    def publish_capacity(self) -> None:
        """Write this node's capacity where submit-time checks and operators read it."""
        c = self.capacity
        self.redis.set(capacity_key(self.node), json.dumps(
            {"cpu": self.settings.node_cpu, "cpu_admitted": c.cpu, "memory_bytes": c.memory_bytes,
             "disk_bytes": c.disk_bytes, "max_sandboxes": c.max_sandboxes}))

    def try_admit(self, job_id: str, req: Request) -> str:
        """'ok' (admitted now, or already) or the resource that is short; atomic per node."""
        c = self.capacity
        free_disk = free_disk_bytes(self.settings.work_dir) - DISK_RESERVE_BYTES
        entry = json.dumps({**asdict(req), "at": time.time()})
        answer = self._script(keys=[admitted_key(self.node)],
                              args=[job_id, entry, req.cpu, req.memory_bytes, req.disk_bytes, c.cpu,
                                    c.memory_bytes, c.disk_bytes, c.max_sandboxes, free_disk])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def admit(self, job_id: str, req: Request, wait_s: float, still_wanted: Callable[[], bool]) -> bool:
        """Admit, waiting up to `wait_s` for capacity to come back; False if it did not (or the job
        ended meanwhile: `still_wanted` is asked about once a second). `wait_s` 0: one try, no wait."""
        short = self.try_admit(job_id, req)
        if short == "ok" or wait_s <= 0:
            return short == "ok"
        deadline = time.monotonic() + wait_s
        next_check = time.monotonic() + 1.0
        with self._released:
            self._waiting += 1
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    log.info("job %s not admitted on %s within %.0f s (short of %s)", job_id, self.node, wait_s, short)
                    return False
                if now >= next_check:
                    if not still_wanted():
                        return False
                    next_check = now + 1.0
                with self._released:
                    self._released.wait(min(POLL_S, deadline - now))
                short = self.try_admit(job_id, req)
                if short == "ok":
                    return True
        finally:
            with self._released:
                self._waiting -= 1

    def release(self, job_id: str) -> None:
        """Give the job's share back (idempotent) and wake this process's waiting creates."""
        self.redis.hdel(admitted_key(self.node), job_id)
        with self._released:
            self._released.notify_all()

    def admitted(self) -> dict[str, dict]:
        """Job id -> its admitted request, as stored."""
        raw = self.redis.hgetall(admitted_key(self.node))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def reconcile(self, live_job_ids: Iterable[str], ended: Callable[[str], bool],
                  grace_s: float = ADMIT_GRACE_S) -> list[str]:
        """Release every entry whose job has no sandbox on this node and either ended (or vanished)
        or was admitted over `grace_s` ago (a create still under way keeps its entry)."""
        live = set(live_job_ids)
        now = time.time()
        released = []
        for job_id, entry in self.admitted().items():
            if job_id in live:
                continue
            if ended(job_id) or float(entry.get("at", 0)) + grace_s < now:
                self.redis.hdel(admitted_key(self.node), job_id)
                released.append(job_id)
        if released:
            log.warning("admission on %s: released %d entries without a sandbox: %s", self.node,
                        len(released), ", ".join(released[:20]))
            with self._released:
                self._released.notify_all()
        return released


def published_capacities(client: redis.Redis) -> list[dict]:
    """Capacities of the nodes the heartbeat has listed (empty when none has published yet)."""
    nodes = sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(NODES_SET))
    if not nodes:
        return []
    return [json.loads(raw) for raw in client.mget([capacity_key(n) for n in nodes]) if raw]
