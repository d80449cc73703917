"""The process's object-store clients: settings checked, one per process, fork-safe.

Split out of sandbox.storage (ArtifactStore, the object operations) along its seam: building and
caching the boto3 client and the DirectS3 signer+pool beside it (sandbox.s3direct), and keeping
presigned URLs' signatures out of botocore's debug log.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

from config.settings import WORKER_HEADROOM_THREADS
from sandbox.errors import ConfigError

if TYPE_CHECKING:
    from sandbox.s3direct import DirectS3

# One boto3 client (and one DirectS3) per process: neither is fork-safe (pooled sockets), so the
# cache is emptied in every child and each worker process builds its own on first use.
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


class _NoSecrets(logging.Filter):
    """Drops botocore's debug lines that carry a secret: a signature (a presigned URL's is a bearer
    token; a request's Authorization header could be replayed within its window) or the SSE-C key, which botocore shows in a request's params and canonical request.

    Only ever called for a record at an enabled level, so it costs nothing at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if text.startswith(("Signature:", "StringToSign:")):
            return False
        text = record.getMessage().lower()
        # "signature=": an Authorization header's, which botocore.endpoint shows for every boto3 call
        return not ("x-amz-signature" in text or "signature=" in text or "customer-key" in text
                    or "ssecustomerkey" in text)


# auth: the canonical request and signature; endpoint: each request's params and prepared headers
for _name in ("botocore.auth", "botocore.endpoint"):
    logging.getLogger(_name).addFilter(_NoSecrets())


def sse_c_key(settings: Any) -> bytes | None:
    """The SSE-C key from SANDBOX_R2_SSE_C_KEY (base64 of 32 bytes); None when it is not set."""
    raw = getattr(settings, "r2_sse_c_key", "") or ""
    if not raw:
        return None
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError("SANDBOX_R2_SSE_C_KEY", "must be base64 of 32 random bytes") from e
    if len(key) != 32:
        raise ConfigError("SANDBOX_R2_SSE_C_KEY", f"must decode to 32 bytes, not {len(key)}")
    return key


def sse_headers(sse_key: bytes | None) -> dict[str, str]:
    """The SSE-C request headers for a 32-byte key, as botocore's handlers build them; {} without one."""
    if sse_key is None:
        return {}
    return {"x-amz-server-side-encryption-customer-algorithm": "AES256",
            "x-amz-server-side-encryption-customer-key": base64.b64encode(sse_key).decode(),
            "x-amz-server-side-encryption-customer-key-MD5": base64.b64encode(hashlib.md5(sse_key).digest()).decode()}


def checked_endpoint(settings: Any) -> str:
    """The object store's endpoint, once it is https (or loopback) and credentials are set."""
    endpoint = settings.s3_endpoint
    if not settings.r2_endpoint and not settings.cloudflare_account_id:
        raise ConfigError("SANDBOX_CLOUDFLARE_ACCOUNT_ID", "set it (or SANDBOX_R2_ENDPOINT) to reach object storage")
    parsed = urlparse(endpoint)
    if parsed.scheme != "https" and not _is_loopback(parsed.hostname or ""):
        raise ConfigError("SANDBOX_R2_ENDPOINT", "must be https:// (plain http only on loopback)")
    if not (settings.cloudflare_access_key and settings.cloudflare_secret_key):
        raise ConfigError("SANDBOX_CLOUDFLARE_ACCESS_KEY", "object storage needs an access key and a secret key")
    return endpoint


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_for(settings: Any, endpoint: str, max_attempts: int, timeout_s: float) -> Any:
    """This process's boto3 client for these settings, created on first use (after any fork)."""
    return _cached(("boto3", *_ident(settings, endpoint), max_attempts, timeout_s),
                   lambda: _new_client(settings, endpoint, max_attempts, timeout_s))


def direct_for(settings: Any, endpoint: str, timeout_s: float) -> DirectS3:
    """This process's DirectS3 (small PUTs, presigns) for these settings, created on first use."""
    from sandbox.s3direct import DirectS3  # late, like boto3: importing the domain never pays for it

    # one pooled socket per worker thread (celeryconfig's worker_concurrency): every thread may PUT
    threads = getattr(settings, "node_max_sandboxes", 64) + WORKER_HEADROOM_THREADS
    return _cached(("direct", *_ident(settings, endpoint), timeout_s), lambda: DirectS3(
        endpoint, settings.cloudflare_access_key, settings.cloudflare_secret_key, timeout_s, threads))


def _ident(settings: Any, endpoint: str) -> tuple[str, str, str]:
    # the secret only as a hash: the cache's keys may show up in a debugger or a traceback
    secret = hashlib.sha256(settings.cloudflare_secret_key.encode()).hexdigest()
    return endpoint, settings.cloudflare_access_key, secret


def _cached(ident: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            client = _clients[ident] = build()
        return client


def _new_client(settings: Any, endpoint: str, max_attempts: int, timeout_s: float) -> Any:
    import boto3  # imported late so that importing the domain never pays for it
    from botocore.config import Config

    config = Config(
        region_name="auto", signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=min(timeout_s, 10.0), read_timeout=timeout_s,
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        s3={"addressing_style": "path"}, tcp_keepalive=True,
        # every parameter is built here, never by a caller: botocore re-checking them against
        # the service model costs CPU per request (keys are checked by check_key first)
        parameter_validation=False,
    )
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=config,
        aws_access_key_id=settings.cloudflare_access_key,
        aws_secret_access_key=settings.cloudflare_secret_key,
    )
    return client

