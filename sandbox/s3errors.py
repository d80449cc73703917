"""The object store's failures sorted into the service's error tree: which botocore, urllib3 and
socket errors are transient (StorageUnavailable, retried) and which permanent (StorageError).

Separate from storage.py: it is the one rule both of ArtifactStore's paths share (the boto3 client's
calls and DirectS3's single-request PUTs and presigns), and it must track botocore's own retry
classification, so it is kept where it can be read and checked against botocore on its own.
"""
from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from botocore.exceptions import ParamValidationError, ResponseStreamingError
from urllib3.exceptions import HTTPError as Urllib3Error

from sandbox.errors import StorageError, StorageUnavailable

# What botocore 1.44.5's standard mode re-sends (retries/standard.py: its transient and throttled
# checkers), so a DirectS3 PUT is retried exactly as a boto3 call is, and only these become
# StorageUnavailable. Not 501 (NotImplemented is permanent) nor RequestTimeTooSkewed (re-signing
# with the same clock cannot help).
_RETRIED_STATUSES = {500, 502, 503, 504, 429}
_RETRIED_CODES = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
                  "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
                  "TooManyRequestsException", "ProvisionedThroughputExceededException",
                  "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                  "LimitExceededException", "RequestThrottled", "SlowDown", "EC2ThrottledException"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_TRANSPORT_ERRORS = (BotoConnectionError, ResponseStreamingError, Urllib3Error, ConnectionError, TimeoutError)
EDGE = (ClientError, BotoCoreError, Urllib3Error, OSError)  # what a store call may raise: caught, then translated


def translate(e: Exception, what: str, sse_c: bool) -> Exception:
    """A StorageUnavailable (transient) or StorageError (permanent) for a botocore failure;
    `sse_c`: the store sends an SSE-C key (a refusal may then mean the key does not match)."""
    if isinstance(e, ClientError):
        err, code = e.response.get("Error", {}), error_code(e)
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status in _RETRIED_STATUSES or code in _RETRIED_CODES:
            return StorageUnavailable(f"{what}: object store unavailable ({code or status})")
        if code in _MISSING_CODES:
            return StorageError(f"{what}: no such object or bucket ({code})")
        if sse_c and (status in (400, 403) or code in _DENIED_CODES):
            return StorageError(f"{what}: refused ({code or status}); the SSE-C key may not match "
                                "the key the object was written with, or the credentials lack access")
        if code in _DENIED_CODES or status == 403:
            return StorageError(f"{what}: access denied ({code}); check the access key, secret and bucket")
        if code == "InvalidArgument" and "customer key" in str(err.get("Message", "")).lower():
            return StorageError(f"{what}: the object is SSE-C encrypted and no SANDBOX_R2_SSE_C_KEY is set")
        return StorageError(f"{what}: refused ({code or status}: {err.get('Message', '')})")
    if isinstance(e, _TRANSPORT_ERRORS):
        return StorageUnavailable(f"{what}: object store unreachable ({type(e).__name__})")
    if isinstance(e, ParamValidationError):
        return StorageError(f"{what}: invalid request ({e})")
    return StorageUnavailable(f"{what}: {type(e).__name__}: {e}")


def error_code(e: Exception) -> str:
    """The S3 error code of a ClientError ("" for anything else)."""
    return str(e.response.get("Error", {}).get("Code", "")) if isinstance(e, ClientError) else ""
