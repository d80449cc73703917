"""AgentClient: the worker's side of the agent protocol, on requests; every body streamed.

Errors are translated here, at the edge: unreachable, 502-504 or a stream cut short is
AgentUnavailable (transient, retried by the caller), a refused input is JobRejected as on the
local runtime, anything else (a 500 is the sandbox failing inside the machine) SandboxFailure.
The token is sent in a header and appears nowhere else. What the machine answers is checked and
bounded like any other input: the job ran in there.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import IO, Any, Callable, Iterator
from urllib.parse import quote

import requests
import requests.adapters

from sandbox.agent.protocol import CHUNK, MAX_EVENT_LINE_BYTES, STREAMS
from sandbox.errors import AgentConflict, AgentUnavailable, JobRejected, SandboxFailure
from sandbox.runtimes.base import ExecResult, OutputFile, OutputSink, SandboxHandle
from sandbox.runtimes.fsutil import MAX_SKIPPED, SKIPPED_PATH_CHARS
from sandbox.spec import JobSpec

RESULT_POLL_S = 20.0  # one long poll of GET /result; below any sane read timeout
MAX_ANSWER_BYTES = 8 << 20  # a JSON answer (the largest: /outputs, 1000 files and 1000 skipped)
_session: requests.Session | None = None
_session_lock = threading.Lock()


def shared_session() -> requests.Session:
    """One Session per process for every agent (a connection pool per machine), made on first use."""
    global _session
    with _session_lock:
        if _session is None:
            _session = requests.Session()
            # a pool per machine: keep many machines' pools (a node drives dozens of jobs at once)
            _session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=128, pool_maxsize=8))
        return _session


class OutputList(list):  # type: ignore[type-arg]
    """The collected files, with `.skipped` and `.not_listed` as LocalRuntime.collect has them."""

    skipped: list[dict[str, Any]]
    not_listed: int = 0


class AgentClient:
    """One job's agent at `base_url` (http://[6PN address]:8080), authenticated by `token`."""

    def __init__(self, base_url: str, token: str, session: requests.Session | None = None,
                 timeout: tuple[float, float] = (5.0, 30.0)) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self.session = session or shared_session()
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"AgentClient({self.base_url!r})"  # never the token

    # -- the protocol ----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """{"ok", "job_id", "state", "protocol", "setup"}."""
        return self._json("GET", "/health")

    def create(self, spec: JobSpec) -> SandboxHandle:
        """Make the inner sandbox (idempotent for the same job); inline files go by put_file."""
        body = {**spec.to_dict(), "files": []}
        raw = self._json("POST", "/sandbox", data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
        return _parse(lambda: SandboxHandle.from_dict(raw["handle"]), "handle")

    def put_file(self, relpath: str, fileobj: IO[bytes], mode: int) -> int:
        """Stream `fileobj` to workspace/`relpath` (chunked, CHUNK bytes at a time); bytes written."""
        body = iter(lambda: fileobj.read(CHUNK), b"")
        raw = self._json("PUT", f"/files?path={_q(relpath)}&mode={int(mode)}", data=body,
                         headers={"Content-Type": "application/octet-stream"})
        return _parse(lambda: int(raw["written"]), "written")

    def execute(self, sink: OutputSink, max_wait_s: float | None = None) -> ExecResult:
        """Run the command (at most once per machine), feeding live output to `sink`.

        A stream that breaks before its end raises AgentUnavailable; calling execute again then
        never re-runs the command: it waits (up to `max_wait_s`, default forever) for the result.
        """
        return self._run_once("exec", sink, lambda: self.wait_result(max_wait_s))

    def setup(self, sink: OutputSink) -> ExecResult:
        """Run the job's setup command (at most once per machine), feeding live output to `sink`."""
        return self._run_once("setup", sink, _setup_still_running)

    def _run_once(self, what: str, sink: OutputSink, still_running: Callable[[], ExecResult]) -> ExecResult:
        """POST /exec or /setup: follow the stream, or on 409 take the earlier run's result."""
        resp = self._request("POST", f"/{what}", ok=(200, 409), json={"events": True})
        with resp:
            if resp.status_code == 409:
                body = _json_of(resp)
                if body.get("error") != "already_started":
                    raise AgentConflict(str(body.get("error", ""))[:64], f"agent refused {what}: {_describe(body)}")
                if body.get("result"):
                    return _exec_result(body["result"])
                return still_running()
            return self._follow(resp, sink)

    def result(self, wait_s: float = 0.0) -> ExecResult | None:
        """The command's result if it has ended, waiting up to `wait_s` (at most 60) for it."""
        return self._result(wait_s)[0]

    def wait_result(self, max_wait_s: float | None = None) -> ExecResult:
        """Long-poll GET /result until the command ends; AgentUnavailable after `max_wait_s`.

        SandboxFailure when no command is running to wait for (it never started).
        """
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        while True:
            left = RESULT_POLL_S if deadline is None else min(RESULT_POLL_S, deadline - time.monotonic())
            result, state = self._result(max(0.0, left))
            if result is not None:
                return result
            if state != "running":  # nothing will ever end: never poll an idle agent in a loop
                raise SandboxFailure(f"no command to wait for: the agent is {str(state)[:20]}")
            if deadline is not None and time.monotonic() >= deadline:
                raise AgentUnavailable(f"no result from the agent within {max_wait_s} s")

    def _result(self, wait_s: float) -> tuple[ExecResult | None, Any]:
        raw = self._json("GET", f"/result?wait={float(wait_s)}", read_extra_s=wait_s)
        return (_exec_result(raw["result"]) if raw.get("result") else None), raw.get("state")

    def logs(self, setup: bool = False) -> dict[str, IO[bytes]]:
        """The captured (capped) stdout and stderr (and the setup's); each is fetched when first read."""
        streams = STREAMS + (("setup-stdout", "setup-stderr") if setup else ())
        return {stream: RemoteFile(self, f"/logs/{stream}") for stream in streams}

    def outputs(self, dirs: tuple[str, ...] | list[str]) -> OutputList:
        """The regular files under `dirs` (after killing what is left); each .open() streams it.

        AgentConflict with reason `running` while the command still runs (the agent never lists a
        workspace the command is still writing).
        """
        raw = self._json("GET", f"/outputs?dirs={_q(','.join(dirs))}")
        files = OutputList()
        for entry in raw.get("files", []):
            relpath, size = _parse(lambda e=entry: (str(e["relpath"]), int(e["size"])), "files")
            files.append(OutputFile(relpath, size, lambda r=relpath, s=size: RemoteFile(
                self, f"/outputs/file?path={_q(r)}", expected_size=s)))
        skipped = _parse(lambda: list(raw.get("skipped", [])), "skipped")
        keep = MAX_SKIPPED + 1  # the walk's own list: its stop entry and MAX_SKIPPED more
        files.skipped = _parse(lambda: [{"path": str(e["path"])[:SKIPPED_PATH_CHARS], "reason": str(e["reason"])[:200]}
                                        for e in skipped[:keep]], "skipped")
        not_listed = _parse(lambda: int(raw.get("not_listed", 0)), "not_listed")
        if not 0 <= not_listed < 1 << 53:
            raise SandboxFailure("agent sent a malformed not_listed")
        files.not_listed = not_listed + max(0, len(skipped) - keep)  # (what a list cut here left out)
        return files

    def kill(self) -> None:
        """Kill every process of the sandbox now (its cgroup); the sandbox stays."""
        self._json("POST", "/kill")

    def destroy(self) -> None:
        """Destroy the inner sandbox (the machine itself is the runtime's to delete)."""
        self._json("DELETE", "/sandbox")

    # -- plumbing --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, ok: tuple[int, ...] = (200,), read_extra_s: float = 0.0,
                 **kw: Any) -> requests.Response:
        """The answer, its body not read yet (every body is read in bounded pieces)."""
        headers = {**kw.pop("headers", {}), **self._auth}
        connect_s, read_s = self.timeout
        try:
            resp = self.session.request(method, self.base_url + path, headers=headers, stream=True,
                                        timeout=(connect_s, read_s + read_extra_s), **kw)
        except requests.RequestException as e:
            raise AgentUnavailable(f"agent {method} {_route(path)}: {type(e).__name__}") from e
        if resp.status_code in ok:
            return resp
        with resp:
            body = _json_of(resp)
        if resp.status_code == 400 and body.get("error") == "rejected":
            raise JobRejected(str(body.get("field") or "/files"), str(body.get("rule") or "agent"),
                              str(body.get("message") or "refused by the agent"))
        if resp.status_code in (429, 502, 503, 504):  # busy, or a proxy could not reach it: try again
            raise AgentUnavailable(f"agent {method} {_route(path)}: {resp.status_code} {_describe(body)}")
        if resp.status_code == 409:  # not an error of the sandbox: the caller may act on the state named
            raise AgentConflict(str(body.get("error", ""))[:64],
                                f"agent {method} {_route(path)}: 409 {_describe(body)}")
        raise SandboxFailure(f"agent {method} {_route(path)}: {resp.status_code} {_describe(body)}")

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        resp = self._request(method, path, **kw)
        with resp:
            try:
                data = resp.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
            except Exception as e:  # urllib3's ProtocolError/ReadTimeoutError and socket errors
                raise AgentUnavailable(f"agent {method} {_route(path)}: answer broke: {type(e).__name__}") from e
        if len(data) > MAX_ANSWER_BYTES:
            raise SandboxFailure(f"agent {method} {_route(path)}: answer over {MAX_ANSWER_BYTES} bytes")
        return _parse(lambda: _as_dict(json.loads(data)), "answer")

    def _follow(self, resp: requests.Response, sink: OutputSink) -> ExecResult:
        sink_ok = True
        try:
            for event in _events(resp):
                kind = event.get("type")
                if kind == "data":
                    stream, data = event.get("stream"), event.get("data")
                    if stream not in STREAMS or not isinstance(data, str):
                        raise SandboxFailure("agent sent a malformed data event")
                    chunk = _parse(lambda: base64.b64decode(data, validate=True), "data")
                    if sink_ok:
                        try:
                            sink(stream, chunk)
                        except Exception:  # noqa: BLE001 - as locally: a broken log feed never stops the job
                            sink_ok = False
                elif kind == "event":
                    entry, deliver = event.get("event"), getattr(sink, "event", None)
                    if not isinstance(entry, dict):
                        raise SandboxFailure("agent sent a malformed connection event")
                    if sink_ok and deliver is not None:
                        try:
                            deliver(entry)
                        except Exception:  # noqa: BLE001 - as locally: a broken event feed never stops the job
                            sink_ok = False
                elif kind == "end":
                    return _exec_result(event.get("result"))
                elif kind not in ("start", "keepalive"):
                    raise SandboxFailure("agent sent an unknown event")
        except requests.RequestException as e:
            raise AgentUnavailable(f"exec stream broke before its end: {type(e).__name__}") from e
        raise AgentUnavailable("exec stream ended before its end event")


class RemoteFile(io.RawIOBase):
    """A file served by the agent, fetched on first read, read as a stream of its body."""

    def __init__(self, client: AgentClient, path: str, expected_size: int | None = None) -> None:
        super().__init__()
        self.client, self.path, self.expected_size = client, path, expected_size
        self._resp: requests.Response | None = None
        self._got = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> requests.Response:
        if self._resp is None:
            self._resp = self.client._request("GET", self.path)
            length = self._resp.headers.get("Content-Length")
            if self.expected_size is not None and length != str(self.expected_size):
                self._resp.close()
                raise SandboxFailure(f"agent {_route(self.path)}: size changed since it was listed")
        return self._resp

    def readinto(self, buffer: Any) -> int:
        resp = self._open()
        try:
            data = resp.raw.read(min(len(buffer), CHUNK), decode_content=True)
        except Exception as e:  # urllib3's ProtocolError/ReadTimeoutError and socket errors
            raise AgentUnavailable(f"agent {_route(self.path)}: stream broke: {type(e).__name__}") from e
        n = len(data)
        buffer[:n] = data
        self._got += n
        return n

    def read(self, size: int = -1) -> bytes:
        """`size` bytes, fewer only at the end (as a buffered file): callers cut equal-sized parts."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        chunks, have = [], 0
        while have < size:
            buf = bytearray(min(size - have, CHUNK))
            n = self.readinto(buf)
            if not n:
                break
            chunks.append(bytes(buf[:n]))
            have += n
        return b"".join(chunks)

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        super().close()


def _events(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """ndjson events, each line capped: a misbehaving agent cannot grow the worker's memory."""
    pending = b""
    for piece in resp.iter_content(CHUNK):
        pending += piece
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield _parse(lambda: _as_dict(json.loads(line)), "event")
        if len(pending) > MAX_EVENT_LINE_BYTES:
            raise SandboxFailure("agent sent an event line over the size limit")


def _as_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def _exec_result(raw: Any) -> ExecResult:
    return _parse(lambda: ExecResult(**_as_dict(raw)), "result")


def _parse(build: Callable[[], Any], what: str) -> Any:
    try:
        return build()
    except (KeyError, TypeError, ValueError) as e:
        raise SandboxFailure(f"agent sent a malformed {what}") from e


def _json_of(resp: requests.Response) -> dict[str, Any]:
    """An error answer's JSON object, read up to 64 KiB; {} when it is not one."""
    try:
        return _as_dict(json.loads(resp.raw.read(64 << 10, decode_content=True)))
    except ValueError:
        return {}
    except Exception as e:  # urllib3's ProtocolError/ReadTimeoutError and socket errors
        raise AgentUnavailable(f"agent answer broke: {type(e).__name__}") from e


def _describe(body: dict[str, Any]) -> str:
    return f"{str(body.get('error', 'error'))[:64]}: {str(body.get('message', ''))[:500]}"


def _route(path: str) -> str:
    return path.split("?", 1)[0]


def _q(text: str) -> str:
    return quote(text.encode("utf-8", "surrogateescape"), safe="")


def _setup_still_running() -> ExecResult:
    raise AgentUnavailable("the setup is still running on the machine")  # a retry finds its end
