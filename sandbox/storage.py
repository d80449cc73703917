"""ArtifactStore: job inputs, outputs, logs and artifacts in R2 (or any S3 endpoint) through boto3.

Layout: jobs/{job-id}/{input,output,logs,artifacts}/..., templates/..., shared/...
Every object operation is audited; botocore errors are translated here, at the edge, by the rule
in sandbox.s3errors. Single-request PUTs and presigns go through sandbox.s3direct (botocore's
signer on urllib3, without boto3's per-call cost); everything else through the boto3 client.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import random
import time
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator

from botocore.exceptions import BotoCoreError
from botocore.retries.standard import RetryQuotaChecker, ThrottledRetryableChecker
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from urllib3.exceptions import HTTPError as Urllib3Error

from sandbox.errors import StorageError, StorageUnavailable
from sandbox.layout import CATEGORIES, DEFAULT_RETENTION_DAYS, category_of, check_key  # noqa: F401
from sandbox.s3client import checked_endpoint, client_for, direct_for, sse_c_key, sse_headers
from sandbox.s3errors import EDGE, error_code, translate

if TYPE_CHECKING:
    from sandbox.s3direct import DirectS3

audit_log = logging.getLogger("sandbox.audit")
log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_BYTES = 8 * MIB            # multipart part size (R2: all parts equal except the last; min 5 MiB)
MAX_PARTS = 10_000              # S3 and R2 limit per multipart upload
PRESIGN_MAX_S = 7 * 24 * 3600   # R2 and S3 SigV4 limit
RETRY_BACKOFF_MAX_S = 20.0      # botocore standard mode's cap on one wait between attempts
# botocore standard mode's retry quota costs, read from botocore (14 a retry, 5 after a throttling
# answer such as S3's SlowDown, 1 back for a call that needed none, in botocore 1.4x)
RETRY_COST = RetryQuotaChecker._RETRY_COST
THROTTLED_RETRY_COST = RetryQuotaChecker._THROTTLING_RETRY_COST
NO_RETRY_INCREMENT = RetryQuotaChecker._NO_RETRY_INCREMENT
THROTTLED_CODES = frozenset(ThrottledRetryableChecker._THROTTLED_ERROR_CODES)


def retention_from_settings(settings: Any) -> dict[str, int]:
    """Retention days per category from SANDBOX_RETENTION_DAYS_* (read leniently until settings carry them)."""
    return {cat: int(getattr(settings, f"retention_days_{cat}", DEFAULT_RETENTION_DAYS[cat])) for cat in CATEGORIES}


class ArtifactStore:
    """Objects of jobs in one bucket, with audit events for every put, get, delete and presign."""

    def __init__(self, settings: Any, actor: str, audit: Callable[[dict], None] | None = None,
                 max_attempts: int = 5, upload_attempts: int = 3, timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._endpoint = checked_endpoint(settings)
        self._sse_key = sse_c_key(settings)
        self._sse_headers = sse_headers(self._sse_key)
        self.bucket: str = settings.r2_bucket
        self.actor = actor
        self._audit = audit
        self._max_attempts = max_attempts        # attempts per HTTP call (botocore's, or _put_small's)
        self._upload_attempts = upload_attempts  # tenacity attempts for a whole (seekable) upload
        self._timeout_s = timeout_s

    # -- client and edge ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """This process's boto3 client, created on first use (after any fork)."""
        return client_for(self._settings, self._endpoint, self._max_attempts, self._timeout_s)

    @property
    def direct(self) -> DirectS3:
        """This process's DirectS3 for single-request PUTs and presigns, created on first use."""
        return direct_for(self._settings, self._endpoint, self._timeout_s)

    def _sse(self) -> dict[str, Any]:
        if self._sse_key is None:
            return {}
        return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": self._sse_key}

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One client call, its botocore failure translated into the service's error tree."""
        try:
            return getattr(self.client, method)(**kwargs)
        except EDGE as e:
            raise self._translate(e, what) from e

    def _translate(self, e: Exception, what: str) -> Exception:
        """A StorageUnavailable (transient) or StorageError (permanent) for a botocore failure."""
        return translate(e, what, sse_c=self._sse_key is not None)

    def _emit(self, op: str, job_id: str | None, key: str, size: int | None, outcome: str, **extra: Any) -> None:
        event = {"op": op, "job_id": job_id, "key": key, "size": size, "actor": self.actor,
                 "outcome": outcome, "at": dt.datetime.now(dt.timezone.utc).isoformat(), **extra}
        audit_log.info(json.dumps(event, sort_keys=True, default=str))
        if self._audit is not None:
            self._audit(event)

    @staticmethod
    def _outcome(e: Exception) -> str:
        return "unavailable" if isinstance(e, StorageUnavailable) else "error"

    # -- buckets -------------------------------------------------------------------------------

    def check_bucket(self) -> None:
        """Head the bucket with the configured credentials (health); StorageError says what is wrong."""
        self._call(f"head bucket {self.bucket}", "head_bucket", Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (local stack and tests; R2 buckets are made by hand)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except EDGE as e:
            if error_code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._translate(e, f"head bucket {self.bucket}") from e
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except EDGE as e:
            if error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._translate(e, f"create bucket {self.bucket}") from e

    # -- objects ---------------------------------------------------------------------------------

    def open_input(self, key: str, job_id: str) -> IO[bytes]:
        """A streaming reader for an input object under jobs/{job_id}/input/, templates/ or shared/."""
        check_key(key)
        if not key.startswith((f"jobs/{job_id}/input/", "templates/", "shared/")):
            self._emit("get", job_id, key, None, "denied")
            raise StorageError(f"input key {key!r:.200} is outside jobs/{job_id}/input/, templates/ and shared/")
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **self._sse())
        except EDGE as e:
            err = self._translate(e, f"get {key}")
            self._emit("get", job_id, key, None, self._outcome(err))
            raise err from e
        size = int(resp.get("ContentLength") or 0)
        self._emit("get", job_id, key, size, "ok")
        return io.BufferedReader(_Body(resp["Body"], self, key), buffer_size=1 * MIB)

    def upload(self, key: str, fileobj: IO[bytes], job_id: str, size: int | None = None,
               skip_empty: bool = False) -> int:
        """Stream fileobj to key; returns the bytes stored. Never leaves a partial object behind.

        `skip_empty`: an empty source stores nothing (returns 0, no request, no audit event: no
        object was touched); the caller records that it was empty."""
        check_key(key)
        start = _tell(fileobj)
        attempts = self._upload_attempts if start is not None else 1
        try:
            for attempt in Retrying(
                # Why tenacity on top of the per-call retries (botocore's, _put_small's): when a part
                # fails for good the upload id is aborted and the whole object must be re-sent;
                # that is only possible when the source can be rewound.
                retry=retry_if_exception_type(StorageUnavailable), stop=stop_after_attempt(attempts),
                wait=wait_exponential(multiplier=0.5, max=8), reraise=True,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        log.warning("retrying upload of %s (attempt %d)", key, attempt.retry_state.attempt_number)
                        fileobj.seek(start)  # type: ignore[arg-type]
                    stored = self._upload_once(key, fileobj, size, skip_empty)
        except (StorageError, StorageUnavailable) as e:
            self._emit("put", job_id, key, size, self._outcome(e))
            raise
        if stored or not skip_empty:
            self._emit("put", job_id, key, stored, "ok")
        return stored

    def _upload_once(self, key: str, fileobj: IO[bytes], size: int | None, skip_empty: bool = False) -> int:
        part_bytes = PART_BYTES if size is None else max(PART_BYTES, -(-size // MAX_PARTS // MIB) * MIB)
        first = _read_exactly(fileobj, part_bytes)
        if len(first) < part_bytes:
            _check_size(key, size, len(first))
            if not first and skip_empty:
                return 0
            self._put_small(key, first)
            return len(first)
        return self._multipart(key, fileobj, first, part_bytes, size)

    def _put_small(self, key: str, body: bytes) -> None:
        """One PUT of a body in memory, retried as botocore's standard mode retries a call: up to
        max_attempts on a transient failure, waiting a random 0..2^(n-1) s (at most 20 s) between,
        each retry paid from the process's retry quota (botocore's own RetryQuota of 500 and its
        costs; a success gives back what its last retry took, else 1). In a long
        outage the quota runs dry and calls fail at their first error instead of each waiting out
        its retries: no retry storm against a store that is down, and stages give up sooner."""
        what = f"put {key}"
        attempts = max(1, self._max_attempts)
        quota = self.direct.retry_quota
        taken = 0
        for attempt in range(1, attempts + 1):
            try:
                self.direct.put(self.bucket, key, body, self._sse_headers)
                quota.release(taken or NO_RETRY_INCREMENT)
                return
            except EDGE as e:
                err = self._translate(e, what)
                if not isinstance(err, StorageUnavailable) or attempt == attempts:
                    raise err from e
                taken = THROTTLED_RETRY_COST if error_code(e) in THROTTLED_CODES else RETRY_COST
                if not quota.acquire(taken):
                    log.warning("not retrying %s after %s: the retry quota is spent", what, type(e).__name__)
                    raise err from e
                log.info("retrying %s after %s (attempt %d)", what, type(e).__name__, attempt + 1)
            time.sleep(random.uniform(0, min(RETRY_BACKOFF_MAX_S, 2.0 ** (attempt - 1))))

    def _multipart(self, key: str, fileobj: IO[bytes], first: bytes, part_bytes: int, size: int | None) -> int:
        upload_id = self._call(f"start multipart {key}", "create_multipart_upload",
                               Bucket=self.bucket, Key=key, **self._sse())["UploadId"]
        parts, total, chunk = [], 0, first
        try:
            while chunk:
                if len(parts) >= MAX_PARTS:
                    raise StorageError(f"put {key}: more than {MAX_PARTS} parts of {part_bytes} bytes")
                number = len(parts) + 1
                resp = self._call(f"put {key} part {number}", "upload_part", Bucket=self.bucket, Key=key,
                                  UploadId=upload_id, PartNumber=number, Body=chunk, **self._sse())
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
                total += len(chunk)
                # A read error of the source propagates as itself: it is not the store's fault.
                chunk = _read_exactly(fileobj, part_bytes) if len(chunk) == part_bytes else b""
            _check_size(key, size, total)
            self._call(f"complete {key}", "complete_multipart_upload", Bucket=self.bucket, Key=key,
                       UploadId=upload_id, MultipartUpload={"Parts": parts})
            return total
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        # Best effort: if the store is down this fails too; the bucket's AbortIncompleteMultipartUpload
        # rule and sweep_expired() remove the orphan. An unfinished upload is never a visible object.
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except EDGE as e:
            log.warning("could not abort multipart upload of %s: %s", key, type(e).__name__)

    def presign_get(self, key: str, job_id: str, ttl_s: int | None = None) -> str:
        """A presigned GET URL for key, valid ttl_s seconds (1 s..7 days; default from settings)."""
        return self._presign("GET", key, job_id, ttl_s)

    def presign_put(self, key: str, job_id: str, ttl_s: int | None = None) -> str:
        """A presigned PUT URL for a remote (fly) sandbox's own output; never for a local sandbox."""
        if getattr(self._settings, "runtime", "local") == "local":
            raise StorageError("presigned upload URLs are never handed to a local sandbox")
        if not key.startswith(tuple(f"jobs/{job_id}/{c}/" for c in ("output", "artifacts", "logs"))):
            raise StorageError(f"upload key {key!r:.200} is outside the job's output, artifacts and logs")
        return self._presign("PUT", key, job_id, ttl_s)

    def _presign(self, method: str, key: str, job_id: str, ttl_s: int | None) -> str:
        check_key(key)
        op = "presign" if method == "GET" else "presign_put"
        ttl = int(self._settings.presign_ttl_s if ttl_s is None else ttl_s)
        if not 1 <= ttl <= PRESIGN_MAX_S:
            raise StorageError(f"presign ttl must lie between 1 and {PRESIGN_MAX_S} seconds, not {ttl}")
        try:
            url = self.direct.presign(method, self.bucket, key, ttl, self._sse_headers)
        except EDGE as e:
            self._emit(op, job_id, key, None, "error", ttl_s=ttl)
            raise self._translate(e, f"presign {key}") from e
        self._emit(op, job_id, key, None, "ok", ttl_s=ttl)  # the URL itself is never logged
        return url

    def list_keys(self, prefix: str) -> Iterator[dict]:
        """Every object under prefix: {key, size, last_modified} (aware UTC datetime)."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield {"key": obj["Key"], "size": int(obj["Size"]),
                           "last_modified": obj["LastModified"].astimezone(dt.timezone.utc)}
        except EDGE as e:
            raise self._translate(e, f"list {prefix}") from e

    def delete_keys(self, keys: Iterable[str], job_id: str | None) -> int:
        """Delete keys (batches of 1000); returns how many were deleted."""
        batch: list[str] = []
        deleted = 0
        for key in keys:
            batch.append(check_key(key))
            if len(batch) == 1000:
                deleted += self._delete_batch(batch, job_id)
                batch = []
        if batch:
            deleted += self._delete_batch(batch, job_id)
        return deleted

    def _delete_batch(self, keys: list[str], job_id: str | None) -> int:
        try:
            resp = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": False})
        except EDGE as e:
            err = self._translate(e, f"delete {len(keys)} keys")
            for key in keys:
                self._emit("delete", job_id, key, None, self._outcome(err))
            raise err from e
        failed = {err.get("Key"): err.get("Code") for err in resp.get("Errors", ())}
        for key in keys:
            self._emit("delete", job_id, key, None, "error" if key in failed else "ok")
        if failed:
            raise StorageError(f"delete refused for {len(failed)} keys, e.g. {next(iter(failed.items()))}")
        return len(keys)

    # -- expiry ----------------------------------------------------------------------------------

    def sweep_expired(self, retention: dict[str, int], now: dt.datetime | None = None) -> int:
        """Delete objects older than their category's retention in days; returns the count deleted."""
        now = now or dt.datetime.now(dt.timezone.utc)
        prefixes = ["jobs/"] + [f"{c}/" for c in ("templates", "shared") if c in retention]
        expired: list[tuple[str, str | None]] = []
        for prefix in prefixes:
            for obj in self.list_keys(prefix):
                days = retention.get(category_of(obj["key"]) or "")
                if days is not None and obj["last_modified"] <= now - dt.timedelta(days=days):
                    expired.append((obj["key"], _job_id_of(obj["key"])))
        deleted = 0
        for job_id in sorted({j or "" for _, j in expired}):
            deleted += self.delete_keys([k for k, j in expired if (j or "") == job_id], job_id or None)
        self._abort_stale_uploads(now)
        return deleted

    def _abort_stale_uploads(self, now: dt.datetime, older_than: dt.timedelta = dt.timedelta(days=1)) -> None:
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket)
            for page in pages:
                for up in page.get("Uploads", ()):
                    if up["Initiated"].astimezone(dt.timezone.utc) <= now - older_than:
                        self._abort(up["Key"], up["UploadId"])
        except EDGE as e:
            log.warning("could not list multipart uploads: %s", self._translate(e, "list uploads"))

    def apply_lifecycle(self, retention: dict[str, int]) -> None:
        """Bucket lifecycle rules: jobs/ at the longest job retention, templates/ shared/ if given.

        Lifecycle filters are prefixes, and jobs/{id}/input/ has the job id before the category,
        so per-category retention under jobs/ is enforced by sweep_expired(), not by the bucket.
        """
        rules: list[dict[str, Any]] = [{"ID": "abort-incomplete-uploads", "Status": "Enabled",
                                        "Filter": {"Prefix": ""},
                                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]
        job_days = [d for c, d in retention.items() if c in CATEGORIES]
        if job_days:
            rules.append({"ID": "jobs", "Status": "Enabled", "Filter": {"Prefix": "jobs/"},
                          "Expiration": {"Days": max(1, max(job_days))}})
        for top in ("templates", "shared"):
            if top in retention:
                rules.append({"ID": top, "Status": "Enabled", "Filter": {"Prefix": f"{top}/"},
                              "Expiration": {"Days": max(1, retention[top])}})
        self._call(f"lifecycle on {self.bucket}", "put_bucket_lifecycle_configuration",
                   Bucket=self.bucket, LifecycleConfiguration={"Rules": rules})


class _Body(io.RawIOBase):
    """A raw reader over a botocore StreamingBody that turns transport failures into storage errors."""

    def __init__(self, body: Any, store: ArtifactStore, key: str) -> None:
        self._body, self._store, self._key = body, store, key

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:  # noqa: D401 - io protocol
        try:
            data = self._body.read(len(buf))
        except (BotoCoreError, Urllib3Error, OSError) as e:
            raise self._store._translate(e, f"read {self._key}") from e
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _read_exactly(fileobj: IO[bytes], n: int) -> bytes:
    """n bytes, or fewer only at EOF: pipes return short reads, and R2 needs equal-sized parts."""
    chunks, have = [], 0
    while have < n:
        chunk = fileobj.read(n - have)
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _tell(fileobj: IO[bytes]) -> int | None:
    try:
        return fileobj.tell() if fileobj.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _check_size(key: str, expected: int | None, actual: int) -> None:
    if expected is not None and expected != actual:
        raise StorageError(f"put {key}: expected {expected} bytes but the source gave {actual}")


def _job_id_of(key: str) -> str | None:
    parts = key.split("/")
    return parts[1] if parts[0] == "jobs" and len(parts) > 2 else None
