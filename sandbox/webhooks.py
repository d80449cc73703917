"""Signed webhook deliveries of job records to an operator-allowed callback URL.

Header format (Stripe-style, so receivers can reuse known verification code):
    X-Sandbox-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>
    X-Sandbox-Delivery:  <uuid>, derived from job id, event type and sequence: the same on every
                         retry and every redelivery of one event
    X-Sandbox-Event:     job.terminal | job.status
Body: {"delivery_id": <the same uuid>, "event": <type>, "data": <job record or status event>}.
The id and type sit inside the signed body because headers are not signed: a replayer could
change X-Sandbox-Delivery, never the body. A receiver recomputes v1 over the raw body bytes,
compares in constant time, refuses a `t` outside its tolerance window, and drops a body
delivery_id it has already accepted (answering 2xx, so the sender stops retrying).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import requests
import tenacity
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from sandbox.errors import ConfigError, JobRejected

EVENT_TYPES = ("job.terminal", "job.status")
SIGNATURE_HEADER = "X-Sandbox-Signature"
DELIVERY_HEADER = "X-Sandbox-Delivery"
EVENT_HEADER = "X-Sandbox-Event"
DEFAULT_TOLERANCE_S = 300
MAX_URL_LENGTH = 2048
USER_AGENT = "sandbox-webhooks/1"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 hex over "<timestamp>." + body."""
    return hmac.new(secret, str(int(timestamp)).encode() + b"." + body, hashlib.sha256).hexdigest()


def headers(secret: bytes, event_type: str, body: bytes, delivery_id: str,
            timestamp: int | None = None) -> dict[str, str]:
    """The request headers of one delivery attempt, signed at `timestamp` (now by default)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {EVENT_TYPES}")
    ts = int(time.time() if timestamp is None else timestamp)
    return {
        SIGNATURE_HEADER: f"t={ts},v1={sign(secret, ts, body)}",
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: event_type,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }


def verify(secret: bytes, signature_header: str, body: bytes, tolerance_s: int = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> int:
    """The signed timestamp if the header is valid and fresh; ValueError otherwise."""
    parts: dict[str, list[str]] = {}
    for item in (signature_header or "").split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        (ts_text,) = parts["t"]
        ts = int(ts_text)
    except (KeyError, ValueError) as e:
        raise ValueError("signature header has no single integer t=") from e
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise ValueError("signature timestamp outside the tolerance window")
    expected = sign(secret, ts, body)
    # Several v1 values allow a secret rotation: sign with both, accept either.
    if not any(hmac.compare_digest(expected, v) for v in parts.get("v1", [])):
        raise ValueError("signature mismatch")
    return ts


def _normal_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _host_allowed(host: str, port: int | None, allowed_hosts: Iterable[str]) -> bool:
    for entry in allowed_hosts:
        entry = _normal_host(entry)
        if not entry:
            continue
        want_port: int | None = None
        if entry.startswith("["):  # [::1]:8080
            addr, _, rest = entry[1:].partition("]")
            if rest and not (rest.startswith(":") and rest[1:].isdigit()):
                continue
            entry, want_port = addr, int(rest[1:]) if rest else None
        elif entry.count(":") == 1:
            entry, port_text = entry.split(":")
            if not port_text.isdigit():
                continue  # a malformed operator entry allows nothing
            want_port = int(port_text)
        if want_port is not None and want_port != port:
            continue
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_callback_url(url: str, allowed_hosts: Iterable[str]) -> None:
    """Raise JobRejected unless `url` is a plain http(s) URL whose host the operator allows."""
    def reject(rule: str, message: str) -> JobRejected:
        return JobRejected(field="/callback_url", rule=rule, message=message)

    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise reject("invalid_url", f"must be a URL of at most {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in url):
        raise reject("invalid_url", "must be ASCII without spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise reject("invalid_url", f"cannot be parsed: {e}") from e
    host = _normal_host(parts.hostname or "")
    if parts.scheme not in ("https", "http") or not host:
        raise reject("invalid_url", "must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise reject("userinfo", "must not carry a user name or password")
    if parts.fragment:
        raise reject("invalid_url", "must not carry a fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not _host_allowed(host, port, allowed_hosts):
        raise reject("host_not_allowed", f"host {host!r} is not on the operator's webhook allow-list")
    # The signed body carries presigned URLs: plain http only for a loopback receiver (tests, a
    # sidecar), which the operator must still have listed explicitly.
    if parts.scheme == "http" and not _is_loopback(host):
        raise reject("insecure_scheme", "must use https")


class _Retryable(Exception):
    """An attempt failed in a way that a later attempt may not."""


def delivery_id_for(job_id: str, event_type: str, sequence: int | str) -> str:
    """The id of one event's delivery: the same on every retry and every redelivery of the task."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{job_id}\n{event_type}\n{sequence}"))


_DELIVERY_NAMESPACE = uuid.UUID("6f1c4d5e-2b0a-4c8e-9d3f-5a7b8c9d0e1f")
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")
Resolve = Callable[[str, int], list[str]]


def _getaddrinfo(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(i[4][0] for i in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


@dataclass
class Pinned:
    """A callback URL rewritten to the one address that was checked; Host and TLS name stay the host's."""

    url: str
    host: str
    host_header: str
    address: str
    https: bool


def pin(url: str, allow_cidrs: Iterable[Any] = (), resolve: Resolve | None = None,
        timeout_s: float = 5.0) -> Pinned:
    """Resolve once and check every address (the egress rule); an IP literal is the operator's own listing.

    Raises egress Refused for a non-global answer, OSError/TimeoutError when resolution fails.
    """
    from sandbox.egress.rules import check_address  # late: the egress rules import the policy, which imports us

    parts = urlsplit(url)
    host = _normal_host(parts.hostname or "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        # on the allow-list verbatim (check_callback_url): the operator chose this address
        addresses = [str(check_address(host, [ipaddress.ip_network(f"{literal}/{literal.max_prefixlen}")]))]
    else:
        answers = _LOOKUPS.submit(resolve or _getaddrinfo, host, port).result(timeout=timeout_s)
        if not answers:
            raise OSError(f"{host} has no address")
        addresses = [str(check_address(a, tuple(allow_cidrs))) for a in answers]
    ip = ipaddress.ip_address(addresses[0])
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{shown}:{parts.port}" if parts.port else shown
    return Pinned(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host,
                  parts.netloc, str(ip), parts.scheme == "https")


class _PinnedAdapter(HTTPAdapter):
    """Connects to the pinned address while TLS checks the certificate for the host's name; keeps
    the raw sockets so the attempt's deadline can shut them whatever the receiver is doing."""

    def __init__(self, pinned: Pinned) -> None:
        self.pinned = pinned
        self.sockets: list[socket.socket] = []
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        if self.pinned.https:
            kw.update(server_hostname=self.pinned.host, assert_hostname=self.pinned.host)
        super().init_poolmanager(connections, maxsize, block=block, **kw)
        sockets = self.sockets

        def recording(conn_cls: type) -> type:
            class Recording(conn_cls):  # type: ignore[misc, valid-type]
                def _new_conn(self) -> socket.socket:
                    sock = super()._new_conn()
                    sockets.append(sock)
                    return sock
            return Recording

        self.poolmanager.pool_classes_by_scheme = {
            "http": type("Pool", (HTTPConnectionPool,), {"ConnectionCls": recording(HTTPConnection)}),
            "https": type("Pool", (HTTPSConnectionPool,), {"ConnectionCls": recording(HTTPSConnection)}),
        }

    def shut(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv: the deadline is total
            except OSError:
                pass


def deliver(url: str, event_type: str, payload: dict[str, Any], secret: bytes | str, *,
            delivery_id: str | None = None, allowed_hosts: Iterable[str] | None = None,
            allow_cidrs: Iterable[Any] = (), resolve: Resolve | None = None, ca_bundle: str = "",
            timeout_s: float = 5.0, max_attempts: int = 5,
            backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
            session: requests.Session | None = None,
            sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """POST `payload` signed, retrying 5xx/408/429/connection errors; returns the delivery log.

    Every attempt resolves the host once, refuses non-global addresses (as the egress proxy does),
    connects to exactly the checked address, ignores proxy environment variables, and ends after
    `timeout_s` in total, however slowly the receiver answers.
    """
    from sandbox.egress.rules import Refused

    if not secret:
        raise ConfigError("SANDBOX_WEBHOOK_SECRET", "is empty: webhooks cannot be signed")
    if allowed_hosts is not None:
        check_callback_url(url, allowed_hosts)
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {EVENT_TYPES}")
    key = secret.encode() if isinstance(secret, str) else secret
    delivery_id = delivery_id or str(uuid.uuid4())
    envelope = {"delivery_id": delivery_id, "event": event_type, "data": payload}
    body = json.dumps(envelope, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    log: list[dict[str, Any]] = []

    def attempt() -> None:
        entry: dict[str, Any] = {"delivery_id": delivery_id, "event": event_type,
                                 "attempt": len(log) + 1, "at": time.time(),
                                 "status_code": None, "error": None}
        log.append(entry)
        started = time.monotonic()
        try:
            target = pin(url, allow_cidrs, resolve, timeout_s)
        except Refused as e:  # the name points somewhere no delivery may go: never retried
            entry["error"] = f"{e.reason}: {e.detail}"
            return
        except (OSError, FutureTimeout) as e:
            entry["error"] = f"dns: {type(e).__name__}: {str(e)[:200]}"
            raise _Retryable() from e
        entry["address"] = target.address
        remaining = max(0.05, timeout_s - (time.monotonic() - started))
        adapter = _PinnedAdapter(target)
        http = session or requests.Session()
        if session is None:
            http.trust_env = False  # HTTP(S)_PROXY in the worker's environment must not reroute it
            http.mount(f"{urlsplit(target.url).scheme}://", adapter)
        timer = threading.Timer(remaining, adapter.shut)
        timer.start()
        try:
            # Signed per attempt: a retry an hour later must still be inside the receiver's window.
            response = http.post(target.url, data=body,
                                 headers={**headers(key, event_type, body, delivery_id), "Host": target.host_header},
                                 timeout=remaining, allow_redirects=False, stream=True,
                                 **({"verify": ca_bundle} if ca_bundle else {}))
            response.close()  # the body is never read: a receiver cannot make us buffer anything
        except requests.RequestException as e:  # connection refused, reset, timeout, TLS, deadline
            expired = time.monotonic() - started >= timeout_s
            entry["error"] = ("deadline: " if expired else "") + f"{type(e).__name__}: {str(e)[:200]}"
            raise _Retryable() from e
        finally:
            timer.cancel()
            if session is None:
                http.close()
        entry["status_code"] = code = response.status_code
        if 200 <= code < 300:
            return
        entry["error"] = f"HTTP {code}"
        if code >= 500 or code in (408, 429):
            raise _Retryable()

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Retryable),
        stop=tenacity.stop_after_attempt(max_attempts),
        wait=tenacity.wait_exponential_jitter(multiplier=backoff_initial_s, max=backoff_max_s,
                                                jitter=backoff_initial_s),
        sleep=sleep,
        reraise=True,
    )
    try:
        retrying(attempt)
    except _Retryable:
        pass  # the log says how every attempt ended; a dead receiver is not the job's failure
    return log


def options_from(settings: Any) -> dict[str, Any]:
    """deliver() keyword arguments from Settings (the webhook settings read with defaults)."""
    hosts = getattr(settings, "webhook_allowed_hosts", ())
    if isinstance(hosts, str):
        hosts = tuple(h.strip() for h in hosts.split(",") if h.strip())
    return {
        "allowed_hosts": tuple(hosts),
        "timeout_s": float(getattr(settings, "webhook_timeout_s", 5.0)),
        "max_attempts": int(getattr(settings, "webhook_max_attempts", 5)),
        "backoff_max_s": float(getattr(settings, "webhook_backoff_max_s", 30.0)),
        "allow_cidrs": tuple(getattr(settings, "webhook_allow_cidrs", ())),
        "ca_bundle": str(getattr(settings, "webhook_ca_bundle", "")),
    }


def secret_from(settings: Any) -> bytes:
    """SANDBOX_WEBHOOK_SECRET as bytes; ConfigError if it is unset."""
    secret = getattr(settings, "webhook_secret", "")
    if not secret:
        raise ConfigError("SANDBOX_WEBHOOK_SECRET", "must be set to deliver webhooks")
    return secret.encode() if isinstance(secret, str) else secret
