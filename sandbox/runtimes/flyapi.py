"""A small client of Fly's Machines API on requests (one Session per process): timeouts on every
call, tenacity retries.

Retried: 429 (honouring Retry-After when Fly sends one, else exponential backoff with jitter), 5xx
and connection errors, for at most `retry_budget_s` in all. Never retried here: a POST that creates
something (the caller looks the machine up first, see FlyRuntime.create). The API token is sent in
a header and never appears in an exception message or a log line.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay

from sandbox.errors import RuntimeUnavailable, SandboxFailure

log = logging.getLogger("sandbox.fly")

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_WAIT_S = 60  # the API's own upper bound for GET …/wait
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
RETRY_AFTER_MAX_S = 30.0
POOL_SIZE = 64  # connections kept to the API: about the stages one worker process runs at once


class FlyAPIError(SandboxFailure):
    """Fly answered with an error that retrying the same request will not fix."""

    def __init__(self, status: int, what: str, error: str, fly_status: str = "") -> None:
        super().__init__(f"Fly API {what}: HTTP {status}: {error[:300]}" + (f" ({fly_status})" if fly_status else ""))
        self.status = status
        self.fly_status = fly_status

    @property
    def capacity(self) -> bool:
        """Fly's spec names one error status for this: ErrorResponse.status = insufficient_capacity."""
        return self.fly_status == "insufficient_capacity"


class _Retryable(Exception):
    """A 429, 5xx or broken connection: worth the same request again after a wait."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class Answer:
    """An HTTP answer the caller asked to see (its status was among `accept`)."""

    status: int
    body: Any


def auth_header(token: str) -> str:
    """Fly's rules (fly-go): `FlyV1 …` as is, macaroons get `FlyV1 ` in front, else Bearer."""
    token = token.strip()
    if token.startswith("FlyV1 "):
        return token
    if token.startswith(("fm1r_", "fm1a_", "fm2_", "m2.")):
        return f"FlyV1 {token}"
    return f"Bearer {token}"


def _retry_after(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After", "")
    try:
        return min(max(float(raw), 0.0), RETRY_AFTER_MAX_S)
    except ValueError:
        return None  # Fly documents none; an HTTP date here is not worth parsing


class MachinesAPI:
    """Calls to /apps/{app}/machines…; one instance (one requests.Session) per worker process, thread-safe."""

    def __init__(self, base_url: str, token: str, app: str, retry_budget_s: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep, read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.read_timeout_s = read_timeout_s
        self.app = app
        self.retry_budget_s = retry_budget_s
        self._sleep = sleep
        # One Session per process, shared by the worker's threads: nothing on it changes after this
        # (headers fixed here, Fly sets no cookies), and urllib3's pool is thread-safe; the pool is
        # sized so that dozens of concurrent stages each keep a connection instead of reopening.
        self._session = requests.Session()
        self._session.headers.update({"Authorization": auth_header(token), "User-Agent": "job-sandbox"})
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)

    # -- the endpoints this service uses ---------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /machines once (no retry: a lost answer may mean the machine exists)."""
        return self._call("POST", "/machines", json=body, retry=False).body

    def get(self, machine_id: str) -> dict[str, Any] | None:
        """The machine, or None when Fly does not know it (404)."""
        answer = self._call("GET", f"/machines/{machine_id}", accept=(404,))
        return None if answer.status == 404 else answer.body

    def list(self) -> list[dict[str, Any]]:
        """Every machine of the app (not deleted ones)."""
        return self._call("GET", "/machines").body

    def wait_started(self, machine_id: str, timeout_s: int) -> bool:
        """True once the machine is started; False when Fly answered 408 (not yet)."""
        timeout_s = max(1, min(MAX_WAIT_S, int(timeout_s)))
        answer = self._call("GET", f"/machines/{machine_id}/wait", params={"state": "started", "timeout": timeout_s},
                            accept=(408,), read_timeout_s=timeout_s + self.read_timeout_s)
        return answer.status != 408

    def destroy(self, machine_id: str) -> bool:
        """DELETE …?force=true; False when it was already gone (404)."""
        answer = self._call("DELETE", f"/machines/{machine_id}", params={"force": "true"}, accept=(404,))
        return answer.status != 404

    # -- the mechanics ---------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
              accept: tuple[int, ...] = (), retry: bool = True, read_timeout_s: float | None = None) -> Answer:
        what = f"{method} /apps/{self.app}{path}"
        read_timeout_s = read_timeout_s or self.read_timeout_s
        if not retry:
            try:
                return self._once(method, path, params, json, accept, read_timeout_s, what)
            except _Retryable as e:
                raise RuntimeUnavailable(f"Fly API {what}: {e.reason}") from e
        retrying = Retrying(stop=stop_after_delay(self.retry_budget_s), wait=self._wait,
                            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                            sleep=self._sleep, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    return self._once(method, path, params, json, accept, read_timeout_s, what)
        except _Retryable as e:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise RuntimeUnavailable(f"Fly API {what}: gave up after {attempts} attempts in "
                                     f"{self.retry_budget_s:g} s: {e.reason}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after_s is not None:
            return exc.retry_after_s
        ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (state.attempt_number - 1))
        return random.uniform(0, ceiling)  # full jitter: many workers throttled at once spread out

    def _once(self, method: str, path: str, params: dict[str, Any] | None, body: Any, accept: tuple[int, ...],
              read_timeout_s: float, what: str) -> Answer:
        url = f"{self.base_url}/apps/{self.app}{path}"
        try:
            response = self._session.request(method, url, params=params, json=body,
                                               timeout=(CONNECT_TIMEOUT_S, read_timeout_s))
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _Retryable(f"{type(e).__name__}: connection failed or timed out") from e
        except requests.RequestException as e:
            raise RuntimeUnavailable(f"Fly API {what}: {type(e).__name__}") from e
        status = response.status_code
        parsed = _json(response)
        if 200 <= status < 300 or status in accept:
            return Answer(status, parsed)
        error, fly_status = _error_of(parsed, response)
        if status == 429:
            raise _Retryable(f"HTTP 429 rate limited: {error}", _retry_after(response))
        if status >= 500:
            raise _Retryable(f"HTTP {status}: {error}", _retry_after(response))
        raise FlyAPIError(status, what, error, fly_status)


def _json(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _error_of(parsed: Any, response: requests.Response) -> tuple[str, str]:
    if isinstance(parsed, dict):
        return str(parsed.get("error") or response.reason or ""), str(parsed.get("status") or "")
    return (response.text[:300] if response.text else str(response.reason or "")), ""
