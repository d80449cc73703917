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
from sandbox.events import PUBLISH_LUA_FUNCTION


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


def moved_past(record: JobRecord, status: JobStatus) -> bool:
    """True when a job that has not ended is already later in its life than `status`: a stage
    message for `status` arriving now is a stale copy (sandbox.services.begin)."""
    current = JobStatus(record["status"])
    return not current.terminal and _ORDER.index(current) > _ORDER.index(status)


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
# The last record value this process read or wrote, per job: an update starts from it instead of
# reading the record first. Only a guess; the compare-and-set checks it against Redis.
RECORD_CACHE_ENTRIES, RECORD_CACHE_MAX_BYTES = 1024, 64 << 10

# One round trip per record change: compare-and-set, and when the status changed, its event, in
# one atomic step (so event seq order is the order of the record's changes, and a write that lost
# the race appends nothing). On a miss it answers the current value (nil: no record), which the
# caller applies its change to again without another read.
# KEYS: record, active set, execution claim, then (only with an event) events stream, events seq.
# ARGV: the value read, the new value ('': nothing changed, only confirm the value read is
# current), 1 if terminal, job id, the claim's token ('': no claim) and ttl, then (only with an
# event) publish_event's ARGV. Answers {seq or 0, 1 if the claim was taken} on success.
_UPDATE_LUA = PUBLISH_LUA_FUNCTION + """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then return current end
local seq, claimed = 0, 0
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  if ARGV[3] == '1' then redis.call('ZREM', KEYS[2], ARGV[4]) end
  if #ARGV >= 10 then seq = publish_event(KEYS[4], KEYS[5], ARGV[7], ARGV[8], ARGV[9], ARGV[10]) end
end
if ARGV[5] ~= '' and redis.call('SET', KEYS[3], ARGV[5], 'NX', 'EX', ARGV[6]) then claimed = 1 end
return {seq, claimed}
"""

# record, spec, tombstone and active-set entry in one step: a worker that dies in between can no
# longer leave a record without its spec (a redelivered submit would then fail every stage). The
# same step appends the first status event and looks for a cancel that came before the record
# (precancel): the cancel sets its key before looking for the record again, so either it finds
# this record or this step finds its key. Answers 0 (exists), -1 (tombstone), 1 (created),
# 2 (created, and a cancel is waiting for it).
# KEYS: record, spec, tombstone, active set, precancel, events stream, events seq.
# ARGV: record, spec, ttl, tombstone ttl, job id, created at, 1 if active, then publish_event's ARGV.
_CREATE_LUA = PUBLISH_LUA_FUNCTION + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 and ARGV[7] == '1' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3]) end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
end
if #ARGV >= 11 then publish_event(KEYS[6], KEYS[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]) end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then return 2 end
return 1
"""


class JobStore:
    """Job records in Redis: created once per id, changed atomically, terminal exactly once."""

    def __init__(self, client: redis.Redis, events: EventPublisher | None = None, ttl_s: int = 604800,
                 tombstone_ttl_s: int = 30 * 86400) -> None:
        self.redis = client
        self.events = events or NullPublisher()
        self.ttl_s = ttl_s
        self._update_script = client.register_script(_UPDATE_LUA)
        self._specs: OrderedDict[str, bytes | str] = OrderedDict()  # job id -> spec JSON, oldest first
        self._records: OrderedDict[str, bytes | str] = OrderedDict()  # job id -> last record value seen
        self._cache_lock = threading.Lock()
        self.tombstone_ttl_s = tombstone_ttl_s  # the longest artifact retention
        self._create_script = client.register_script(_CREATE_LUA)

    def create(self, record: JobRecord, spec: dict[str, Any] | None = None) -> bool:
        """Store a new record (with its spec and active-set entry, in one atomic step); False if one
        already exists for the id (idempotent submit). JobRejected if the id belonged to a job
        whose objects may still be in storage (its tombstone)."""
        return self.create_job(record, spec) != "exists"

    def create_job(self, record: JobRecord, spec: dict[str, Any] | None = None) -> str:
        """As `create`, answering "created", "exists", or "precancelled" (created, and a cancel
        that came before it waits: see `precancel`), with its first status event, in one round trip."""
        job_id = record["id"]
        active = not JobStatus(record["status"]).terminal
        raw, raw_spec = json.dumps(record), "" if spec is None else json.dumps(spec)
        keys = [record_key(job_id), spec_key(job_id), tombstone_key(job_id), ACTIVE_SET, precancel_key(job_id)]
        args: list[Any] = [raw, raw_spec, self.ttl_s, self.ttl_s + self.tombstone_ttl_s if active else 0, job_id,
                           record["created_at"], int(active)]
        event_keys, event_args = self._status_event(record)
        created = self._create_script(keys=keys + event_keys, args=args + event_args)
        if created == -1:
            raise JobRejected("/id", "reused", f"job id {job_id!r} belonged to an earlier job whose objects may "
                              "still be kept; choose another id")
        if not created:
            return "exists"
        if not event_keys:
            self.publish_status(record)
        self._remember(self._records, job_id, raw, RECORD_CACHE_ENTRIES, RECORD_CACHE_MAX_BYTES)
        if raw_spec:
            self._remember(self._specs, job_id, raw_spec, SPEC_CACHE_ENTRIES, SPEC_CACHE_MAX_BYTES)
        return "precancelled" if created == 2 else "created"

    def precancel(self, job_id: str) -> None:
        """Remember a cancel for a job not recorded yet; its submit then ends it `cancelled`."""
        self.redis.set(precancel_key(job_id), "1", ex=self.ttl_s)

    def get(self, job_id: str) -> JobRecord:
        """The record as it is in Redis now (never from this process's memory)."""
        raw = self.redis.get(record_key(job_id))
        if raw is None:
            self._forget(job_id)
            raise JobNotFound(f"no job {job_id!r}")
        self._remember(self._records, job_id, raw, RECORD_CACHE_ENTRIES, RECORD_CACHE_MAX_BYTES)
        return json.loads(raw)

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None

    def spec(self, job_id: str) -> dict[str, Any]:
        """The job's validated spec; it never changes after submit, so small ones are kept in memory
        (four stages of one job read it, all in this process on a pinned runtime)."""
        with self._cache_lock:
            raw = self._specs.get(job_id)
        if raw is None:
            raw = self.redis.get(spec_key(job_id))
            if raw is None:
                raise JobNotFound(f"no stored spec for job {job_id!r}")
            self._remember(self._specs, job_id, raw, SPEC_CACHE_ENTRIES, SPEC_CACHE_MAX_BYTES)
        return json.loads(raw)

    def update(self, job_id: str, change: Callable[[JobRecord], bool | None]) -> JobRecord:
        """Apply `change` to the record atomically (optimistic: compare-and-set, retried on conflict).

        The change starts from the value this process last saw, without reading it first; when that
        is not the current value any more the compare-and-set fails, answers the current value, and
        the change is applied again to it. A status change appends its event in the same step.
        A change that returns False changed nothing: the record is not written (nor its
        updated_at), the round trip only confirms that what is returned is current."""
        return self._update(job_id, change)[0]

    def _update(self, job_id: str, change: Callable[[JobRecord], bool | None],
                claim: Callable[[JobRecord], str | None] | None = None) -> tuple[JobRecord, bool]:
        """`update`, and in the same atomic step the execution claim with the token `claim` gives
        for the changed record (None: no claim); True when that claim was taken (see claim_execution)."""
        key = record_key(job_id)
        with self._cache_lock:
            raw = self._records.get(job_id)
        if raw is None:
            raw = self.redis.get(key)
        while True:
            if raw is None:
                self._forget(job_id)
                raise JobNotFound(f"no job {job_id!r}")
            record = json.loads(raw)
            before = record["status"]
            if change(record) is False:
                new, terminal = "", False
            else:
                record["updated_at"] = time.time()
                terminal = JobStatus(record["status"]).terminal
                new = json.dumps(record)
            # a record left unwritten (ended, or refused by only_if) takes no claim either
            token = (claim(record) if claim and new else None) or ""
            event_keys, event_args = self._status_event(record) if record["status"] != before else ([], [])
            reply = self._update_script(keys=[key, ACTIVE_SET, claim_key(job_id), *event_keys],
                                        args=[raw, new, int(terminal), job_id, token, self.ttl_s, *event_args])
            if isinstance(reply, list):
                break
            raw = reply  # lost the race (or the guess was stale): the current value, or None
        self._remember(self._records, job_id, new or raw, RECORD_CACHE_ENTRIES, RECORD_CACHE_MAX_BYTES)
        if record["status"] != before and not event_keys:
            self.publish_status(record)
        return record, bool(reply[1])

    def transition(self, job_id: str, status: JobStatus, also: Callable[[JobRecord], None] | None = None,
                   only_if: Callable[[JobRecord], bool] | None = None, **fields: Any) -> JobRecord:
        """Move a non-terminal job forward to `status` (applying `also` and `fields` in the same
        atomic write); a terminal record never changes again. With `only_if`, a record it answers
        False for is not written either: the round trip then only reads the current record (a
        check and its transition in one round trip, instead of a read first)."""
        return self.update(job_id, self._transition_change(status, also, fields, only_if))

    @staticmethod
    def _transition_change(status: JobStatus, also: Callable[[JobRecord], None] | None,
                           fields: dict[str, Any], only_if: Callable[[JobRecord], bool] | None = None,
                           ) -> Callable[[JobRecord], bool | None]:
        def change(record: JobRecord) -> bool | None:
            current = JobStatus(record["status"])
            if current.terminal or (only_if is not None and not only_if(record)):
                return False  # not even updated_at: the round trip only confirms the record read
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
            return None

        return change

    def transition_and_claim(self, job_id: str, status: JobStatus, token: str,
                             also: Callable[[JobRecord], None] | None = None,
                             only_if: Callable[[JobRecord], bool] | None = None) -> tuple[JobRecord, bool]:
        """`transition`, and in the same atomic step `claim_execution(job_id, token)` when the job
        is still to run (not terminal, no outcome yet) and the record was written (`only_if`);
        (record, True) only when the claim was taken by this call. The claim is as exclusive as
        claim_execution's: one SET NX per job."""

        def wants(record: JobRecord) -> str | None:
            return None if JobStatus(record["status"]).terminal or record.get("outcome") else token

        return self._update(job_id, self._transition_change(status, also, {}, only_if), claim=wants)

    def claim_execution(self, job_id: str, token: str) -> bool:
        """True exactly once per job: the command is never started twice."""
        return bool(self.redis.set(claim_key(job_id), token, nx=True, ex=self.ttl_s))

    def active_ids(self, older_than: float | None = None) -> list[str]:
        """Ids of jobs not yet terminal, optionally only those created before `older_than`."""
        upper = "+inf" if older_than is None else older_than
        return [i.decode() if isinstance(i, bytes) else i for i in self.redis.zrangebyscore(ACTIVE_SET, "-inf", upper)]

    def publish_status(self, record: JobRecord) -> None:
        self.events.publish(record["id"], _status_of(record))

    def publish_status_on(self, pipe: Any, record: JobRecord) -> bool:
        """Queue the record's status event on `pipe` (a MULTI block that writes the record), so the
        two land together; False when the publisher cannot (call publish_status after the write)."""
        publish_on = getattr(self.events, "publish_on", None)
        if publish_on is None:
            return False
        publish_on(pipe, record["id"], _status_of(record))
        return True

    def _status_event(self, record: JobRecord) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV that make a record script append the record's status event; empty when
        the publisher is not an EventBus (it is then called after the write)."""
        encode = getattr(self.events, "encode", None)
        if encode is None:
            return [], []
        return encode(record["id"], _status_of(record))

    def _remember(self, cache: "OrderedDict[str, bytes | str]", job_id: str, raw: bytes | str, entries: int,
                  max_bytes: int) -> None:
        with self._cache_lock:
            if len(raw) > max_bytes:
                cache.pop(job_id, None)
                return
            cache[job_id] = raw
            cache.move_to_end(job_id)
            while len(cache) > entries:
                cache.popitem(last=False)

    def _forget(self, job_id: str) -> None:
        with self._cache_lock:
            self._records.pop(job_id, None)


def _status_of(record: JobRecord) -> dict[str, Any]:
    return {"type": "status", "status": record["status"], "detail": (record.get("error") or {}).get("message")}
