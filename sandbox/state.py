"""Job status, the job record, and the Redis job store that keeps them."""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from enum import Enum
from typing import Any, Callable, Protocol

import redis

from sandbox.errors import JobNotFound, JobRejected


class JobStatus(str, Enum):
    """A job's place in its life; the last seven are terminal."""

    QUEUED = "queued"
    CREATING = "creating"
    PREPARING = "preparing"
    RUNNING = "running"
    COLLECTING = "collecting"
    CLEANING = "cleaning"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    OOM_KILLED = "oom_killed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    ERROR = "error"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.OOM_KILLED,
     JobStatus.CANCELLED, JobStatus.REJECTED, JobStatus.ERROR}
)
_ORDER = [JobStatus.QUEUED, JobStatus.CREATING, JobStatus.PREPARING, JobStatus.RUNNING,
          JobStatus.COLLECTING, JobStatus.CLEANING]

JobRecord = dict[str, Any]


class EventPublisher(Protocol):
    """Where status and security events go (sandbox.events.EventBus in production)."""

    def publish(self, job_id: str, event: dict[str, Any]) -> None: ...


class NullPublisher:
    """Publishes nothing; for tools that only read."""

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        return None


def new_record(job_id: str, status: JobStatus, now: float | None = None) -> JobRecord:
    """A fresh record in `status`."""
    now = time.time() if now is None else now
    return {
        "id": job_id, "status": status.value, "exit_code": None, "signal": None, "error": None,
        "created_at": now, "updated_at": now, "finished_at": None,
        "timeline": [{"status": status.value, "at": now}],
        "stages": {}, "resources_used": {}, "artifacts": [], "logs": [], "skipped_outputs": [],
        "security_events": [], "webhook_deliveries": [], "output_truncated": {},
        "cancel_requested": False, "network": None, "setup": None, "sandbox": None, "outcome": None, "submit_task_id": None,
    }


def record_key(job_id: str) -> str:
    return f"sandbox:job:{job_id}"


def spec_key(job_id: str) -> str:
    return f"sandbox:job:{job_id}:spec"


def claim_key(job_id: str) -> str:
    return f"sandbox:job:{job_id}:exec-claim"


def precancel_key(job_id: str) -> str:
    """A cancel that came before its job was recorded (its submit still queued)."""
    return f"sandbox:job:{job_id}:cancel"


def tombstone_key(job_id: str) -> str:
    """Reserves an accepted job's id (and so its jobs/{id}/ objects) until its retention ends."""
    return f"sandbox:job:{job_id}:id"


ACTIVE_SET = "sandbox:jobs:active"
SPEC_CACHE_ENTRIES, SPEC_CACHE_MAX_BYTES = 1024, 64 << 10  # at most 64 MiB of specs in a worker
# KEYS: record, active set. ARGV: the value read, the new value, 1 if terminal, job id.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
if ARGV[3] == '1' then redis.call('ZREM', KEYS[2], ARGV[4]) end
return 1
"""

# record, spec, tombstone and active-set entry in one step: a worker that dies in between can no
# longer leave a record without its spec (a redelivered submit would then fail every stage).
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 and ARGV[7] == '1' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3]) end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
end
return 1
"""


class JobStore:
    """Job records in Redis: created once per id, changed atomically, terminal exactly once."""

    def __init__(self, client: redis.Redis, events: EventPublisher | None = None, ttl_s: int = 604800,
                 tombstone_ttl_s: int = 30 * 86400) -> None:
        self.redis = client
        self.events = events or NullPublisher()
        self.ttl_s = ttl_s
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._specs: OrderedDict[str, bytes] = OrderedDict()  # job id -> spec JSON, oldest first
        self._spec_lock = threading.Lock()
        self.tombstone_ttl_s = tombstone_ttl_s  # the longest artifact retention
        self._create_script = client.register_script(_CREATE_LUA)

    def create(self, record: JobRecord, spec: dict[str, Any] | None = None) -> bool:
        """Store a new record (with its spec and active-set entry, in one atomic step); False if one
        already exists for the id (idempotent submit). JobRejected if the id belonged to a job
        whose objects may still be in storage (its tombstone)."""
        job_id = record["id"]
        active = not JobStatus(record["status"]).terminal
        created = self._create_script(
            keys=[record_key(job_id), spec_key(job_id), tombstone_key(job_id), ACTIVE_SET],
            args=[json.dumps(record), "" if spec is None else json.dumps(spec), self.ttl_s,
                  self.ttl_s + self.tombstone_ttl_s if active else 0, job_id, record["created_at"], int(active)])
        if created == -1:
            raise JobRejected("/id", "reused", f"job id {job_id!r} belonged to an earlier job whose objects may "
                              "still be kept; choose another id")
        if not created:
            return False
        self._publish_status(record)
        return True

    def precancel(self, job_id: str) -> None:
        """Remember a cancel for a job not recorded yet; its submit then ends it `cancelled`."""
        self.redis.set(precancel_key(job_id), "1", ex=self.ttl_s)

    def precancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(precancel_key(job_id)))

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.get(record_key(job_id))
        if raw is None:
            raise JobNotFound(f"no job {job_id!r}")
        return json.loads(raw)

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None

    def spec(self, job_id: str) -> dict[str, Any]:
        """The job's validated spec; it never changes after submit, so small ones are kept in memory
        (four stages of one job read it, all in this process on a pinned runtime)."""
        with self._spec_lock:
            raw = self._specs.get(job_id)
        if raw is None:
            raw = self.redis.get(spec_key(job_id))
            if raw is None:
                raise JobNotFound(f"no stored spec for job {job_id!r}")
            if len(raw) <= SPEC_CACHE_MAX_BYTES:
                with self._spec_lock:
                    self._specs[job_id] = raw
                    while len(self._specs) > SPEC_CACHE_ENTRIES:
                        self._specs.popitem(last=False)
        return json.loads(raw)

    def update(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        """Apply `change` to the record atomically (optimistic: compare-and-set, retried on conflict)."""
        key = record_key(job_id)
        while True:
            raw = self.redis.get(key)
            if raw is None:
                raise JobNotFound(f"no job {job_id!r}")
            record = json.loads(raw)
            before = record["status"]
            change(record)
            record["updated_at"] = time.time()
            terminal = JobStatus(record["status"]).terminal
            # One round trip for the write where WATCH/MULTI/EXEC took two (every stage writes twice).
            if self._cas(keys=[key, ACTIVE_SET], args=[raw, json.dumps(record), int(terminal), job_id]):
                break
        if record["status"] != before:
            self._publish_status(record)
        return record

    def transition(self, job_id: str, status: JobStatus, also: Callable[[JobRecord], None] | None = None,
                   **fields: Any) -> JobRecord:
        """Move a non-terminal job forward to `status` (applying `also` and `fields` in the same
        atomic write); a terminal record never changes again."""

        def change(record: JobRecord) -> None:
            current = JobStatus(record["status"])
            if current.terminal:
                return
            if not status.terminal and _ORDER.index(status) < _ORDER.index(current):
                return
            if status != current:
                now = time.time()
                record["status"] = status.value
                record["timeline"].append({"status": status.value, "at": now})
                if status.terminal:
                    record["finished_at"] = now
            record.update(fields)
            if also:
                also(record)

        return self.update(job_id, change)

    def claim_execution(self, job_id: str, token: str) -> bool:
        """True exactly once per job: the command is never started twice."""
        return bool(self.redis.set(claim_key(job_id), token, nx=True, ex=self.ttl_s))

    def active_ids(self, older_than: float | None = None) -> list[str]:
        """Ids of jobs not yet terminal, optionally only those created before `older_than`."""
        upper = "+inf" if older_than is None else older_than
        return [i.decode() if isinstance(i, bytes) else i for i in self.redis.zrangebyscore(ACTIVE_SET, "-inf", upper)]

    def _publish_status(self, record: JobRecord) -> None:
        self.events.publish(record["id"], {"type": "status", "status": record["status"],
                                           "detail": (record.get("error") or {}).get("message")})
