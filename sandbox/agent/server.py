"""The agent's HTTP face: stdlib ThreadingHTTPServer, bearer-token auth on every route, bodies streamed.

Responses are HTTP/1.1: JSON with a Content-Length, files with a Content-Length, the exec stream
chunked (ndjson). A request the server did not read to its end closes the connection, so a
keep-alive client never sees the rest of a refused body as its next request.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import queue
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, Callable
from urllib.parse import parse_qs, urlsplit

from sandbox.agent.protocol import CHUNK, MAX_JSON_BODY_BYTES, NDJSON, token_matches
from sandbox.agent.service import Agent, Conflict
from sandbox.errors import JobRejected, RuntimeUnavailable, SandboxError
from sandbox.spec import JobSpec

log = logging.getLogger("sandbox.agent")


class BodyError(Exception):
    """The request body was malformed or ended early."""


class _Body:
    """The request body as a file: Content-Length or chunked, read in pieces, never whole."""

    def __init__(self, rfile: IO[bytes], length: int | None, chunked: bool) -> None:
        self.rfile, self.left, self.chunked = rfile, length or 0, chunked
        self.chunk_left = 0
        self.done = not chunked and not length

    def read(self, n: int = CHUNK) -> bytes:
        if self.done:
            return b""
        n = CHUNK if n is None or n < 0 else min(n, CHUNK)
        if self.chunked:
            return self._read_chunked(n)
        data = self.rfile.read(min(n, self.left))
        if not data:
            raise BodyError("body ended before its Content-Length")
        self.left -= len(data)
        self.done = self.left == 0
        return data

    def _read_chunked(self, n: int) -> bytes:
        if self.chunk_left == 0:
            line = self.rfile.readline(1026)
            try:
                self.chunk_left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise BodyError("bad chunk size line") from e
            if self.chunk_left < 0:
                raise BodyError("bad chunk size line")
            if self.chunk_left == 0:
                while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                    pass  # trailers: ignored
                self.done = True
                return b""
        data = self.rfile.read(min(n, self.chunk_left))
        if not data:
            raise BodyError("body ended inside a chunk")
        self.chunk_left -= len(data)
        if self.chunk_left == 0 and self.rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BodyError("chunk not followed by CRLF")
        return data

    def drain(self, limit: int) -> bool:
        """Read and drop what is left, up to `limit` bytes; True if the body was read to its end."""
        try:
            while not self.done and limit > 0:
                limit -= len(self.read(CHUNK))
        except (BodyError, OSError):
            return False
        return self.done


class Handler(BaseHTTPRequestHandler):
    """Routes one request to the Agent; every route needs the bearer token."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall
    timeout = 120  # seconds a connection may sit silent (headers, body, keep-alive) before it is dropped
    server_version = "sandbox-agent"
    sys_version = ""
    agent: Agent
    token_digest: str
    keepalive_s: float

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the base logs the raw request line; _dispatch logs a safe one

    # -- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True, encoding="utf-8",
                                                    errors="surrogateescape").items()}
        self.body = self._open_body()
        status = 500
        try:
            if not token_matches(self.headers.get("Authorization"), self.token_digest):
                # no detail: what was sent (or how it was wrong) is never echoed or logged
                status = self._error(401, "unauthorized", "missing or wrong bearer token",
                                     headers={"WWW-Authenticate": 'Bearer realm="sandbox-agent"'})
                return
            route = ROUTES.get((method, url.path))
            if route is None:
                status = self._error(404, "not_found", "no such route")
                return
            status = route(self)
        except JobRejected as e:
            status = self._error(400, "rejected", e.message, field=e.field, rule=e.rule)
        except Conflict as e:
            status = self._error(409, e.code, str(e), result=e.result)
        except BodyError as e:
            status = self._error(400, "bad_body", str(e))
        except RuntimeUnavailable as e:
            status = self._error(503, e.code, str(e)[:2000])
        except SandboxError as e:
            status = self._error(500, e.code, str(e)[:2000])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            status = 499
        except Exception as e:  # noqa: BLE001 - answer something rather than drop the connection
            log.exception("agent request failed")
            status = self._error(500, "internal", f"{type(e).__name__}: {e}"[:2000])
        finally:
            log.info("%s %s %s", method, url.path if url.path in SAFE_PATHS else "-", status)

    def _open_body(self) -> _Body:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        if length_text and length is None:
            self.close_connection = True
        return _Body(self.rfile, length, chunked)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> int:
        data = json.dumps(payload, separators=(",", ":")).encode()
        if not self.body.drain(1 << 20):
            self.close_connection = True  # the rest of an unread body must not become a request
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        return status

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
               **extra: Any) -> int:
        if status == 401:
            self.close_connection = True  # never read an unauthenticated body
            self.body.done = True
        payload = {"error": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
        return self._send(status, payload, headers)

    def _json_body(self) -> Any:
        chunks, size = [], 0
        while data := self.body.read(CHUNK):
            size += len(data)
            if size > MAX_JSON_BODY_BYTES:
                self.close_connection = True
                raise BodyError(f"JSON body over {MAX_JSON_BODY_BYTES} bytes")
            chunks.append(data)
        try:
            return json.loads(b"".join(chunks) or b"{}")
        except ValueError as e:
            raise BodyError("body is not JSON") from e

    def _stream_file(self, fh: IO[bytes], content_type: str = "application/octet-stream") -> int:
        with fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = self.request.sendfile(fh, 0, size) if size else 0  # zero-copy, at most `size`
            if sent != size:  # shrank under us: the length promised cannot be kept
                self.close_connection = True
        return 200

    # -- routes --------------------------------------------------------------------------------
    def _health(self) -> int:
        return self._send(200, self.agent.health())

    def _create(self) -> int:
        raw = self._json_body()
        try:
            spec = JobSpec.from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BodyError(f"not a job spec: {type(e).__name__}") from e
        return self._send(200, {"handle": self.agent.create(spec).to_dict()})

    def _put_file(self) -> int:
        relpath = self.query.get("path", "")
        mode_text = self.query.get("mode", "420")
        if not mode_text.isdigit() or int(mode_text) > 0o7777:
            raise BodyError("mode must be a decimal number up to 4095 (0o7777)")
        written = self.agent.put_file(relpath, self.body, int(mode_text))
        if not self.body.done:  # the runtime stopped early (it never does on success)
            raise BodyError("body not read to its end")
        return self._send(200, {"written": written})

    def _exec(self) -> int:
        body = self._json_body()  # a keep-alive connection needs it consumed whatever it holds
        # only a follower that asks gets event lines: an older client refuses unknown line types
        wants = isinstance(body, dict) and body.get("events") is True
        run = self.agent.start_setup(wants) if urlsplit(self.path).path == "/setup" else self.agent.start(wants)
        self.send_response(200)
        self.send_header("Content-Type", NDJSON)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self._chunk({"type": "start"})
            while True:
                try:
                    kind, value = run.events.get(timeout=self.keepalive_s)
                except queue.Empty:
                    self._chunk({"type": "keepalive"})
                    continue
                if kind == "data":
                    stream, data = value
                    self._chunk({"type": "data", "stream": stream, "data": base64.b64encode(data).decode()})
                elif kind == "event":
                    self._chunk({"type": "event", "event": value})
                else:
                    self._chunk({"type": "end", "result": value.to_dict()})
                    self.wfile.write(b"0\r\n\r\n")
                    run.delivered.set()
                    return 200
        except OSError:
            run.detach()  # the command keeps running; GET /result tells its ending later
            self.close_connection = True
            return 499

    def _chunk(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))

    def _result(self) -> int:
        wait_text = self.query.get("wait", "0")
        try:
            wait_s = min(max(float(wait_text), 0.0), 60.0)
        except ValueError as e:
            raise BodyError("wait must be a number of seconds") from e
        result = self.agent.result(wait_s)
        return self._send(200, {"result": result.to_dict() if result else None,
                                "state": self.agent.state})

    def _logs(self) -> int:
        stream = urlsplit(self.path).path[len("/logs/"):]
        files = self.agent.logs()
        for name, fh in files.items():
            if name != stream:
                fh.close()
        if stream not in files:  # setup logs exist only for a job whose setup ran
            return self._error(404, "not_found", "no such log")
        return self._stream_file(files[stream])

    def _outputs(self) -> int:
        dirs = tuple(d for d in self.query.get("dirs", "output,artifacts").split(",") if d)
        files, skipped, not_listed = self.agent.collect(dirs)
        return self._send(200, {"files": [{"relpath": f.relpath, "size": f.size} for f in files],
                                "skipped": skipped, "not_listed": not_listed})

    def _output_file(self) -> int:
        return self._stream_file(self.agent.open_output(self.query.get("path", "")))

    def _kill(self) -> int:
        self.agent.kill()
        return self._send(200, {"ok": True})

    def _destroy(self) -> int:
        self.agent.destroy()
        return self._send(200, {"ok": True})


ROUTES: dict[tuple[str, str], Callable[[Handler], int]] = {
    ("GET", "/health"): Handler._health,
    ("POST", "/sandbox"): Handler._create,
    ("DELETE", "/sandbox"): Handler._destroy,
    ("PUT", "/files"): Handler._put_file,
    ("POST", "/exec"): Handler._exec,
    ("POST", "/setup"): Handler._exec,  # the same stream, for the setup command (protocol 2)
    ("GET", "/result"): Handler._result,
    ("GET", "/logs/stdout"): Handler._logs,
    ("GET", "/logs/stderr"): Handler._logs,
    ("GET", "/logs/setup-stdout"): Handler._logs,  # protocol 2
    ("GET", "/logs/setup-stderr"): Handler._logs,
    ("GET", "/outputs"): Handler._outputs,
    ("GET", "/outputs/file"): Handler._output_file,
    ("POST", "/kill"): Handler._kill,
}
SAFE_PATHS = {path for _, path in ROUTES}  # logged as they are; any other path as "-"


class AgentServer(ThreadingHTTPServer):
    """A threading HTTP server on one address (IPv4 or IPv6), serving one Agent."""

    daemon_threads = True

    def __init__(self, host: str, port: int, agent: Agent, token_digest: str, keepalive_s: float) -> None:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.address_family = family
        handler = type("BoundHandler", (Handler,), {"agent": agent, "token_digest": token_digest,
                                                    "keepalive_s": keepalive_s})
        super().__init__(address[:2], handler)
