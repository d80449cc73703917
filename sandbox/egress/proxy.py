"""One job's egress session: every connection from its sandbox, checked, pinned, relayed, logged."""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sandbox.egress import http, tls
from sandbox.egress.bucket import TokenBucket
from sandbox.egress.rules import (EgressPolicy, IPAddress, Refused, Resolver, check_host, check_port,
                                  normalise_target, resolve_checked)

audit = logging.getLogger("sandbox.audit")
CHUNK = 64 * 1024
HEAD_TIMEOUT_S = 30.0  # a client that connects and says nothing holds a slot this long at most
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_IDLE_S = 120.0
_STATUS = {"bad_request": 400, "connect_failed": 502, "dns_failed": 502}


@dataclass
class Flow:
    """One connection from the job, as its log entry will show it."""

    at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    kind: str = ""  # "connect" | "http"
    host: str | None = None
    port: int | None = None
    address: str | None = None
    sni: str | None = None
    verdict: str = "allowed"
    reason: str = ""
    detail: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    responded: bool = False  # the client has had an answer: a refusal can no longer be a 403
    relaying: bool = False
    upstream: asyncio.StreamWriter | None = None  # closed however the flow ends

    def entry(self) -> dict[str, Any]:
        return {"at": round(self.at, 6), "kind": self.kind, "host": self.host, "port": self.port,
                "address": self.address, "sni": self.sni, "verdict": self.verdict, "reason": self.reason,
                "detail": self.detail, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "requests": self.requests, "duration_s": round(time.monotonic() - self.started, 6)}


class Session:
    """The proxy for one sandbox run; lives on the shared egress loop, closed when the stage ends."""

    def __init__(self, job_id: str, policy: EgressPolicy, resolver: Resolver,
                 on_entry: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.job_id, self.policy, self.resolver, self.on_entry = job_id, policy, resolver, on_entry
        self.bucket = TokenBucket(policy.rate_bytes_per_s)
        self.entries: list[dict[str, Any]] = []
        self.dropped = 0
        self.totals = {"connections": 0, "allowed": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0}
        self.bytes_total = 0
        self.cap_reached = False
        self.active = 0
        self.tasks: set[asyncio.Task] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.closing = False
        self.limit_hit = False  # past max_connections: one entry logged, listener closed
        self.lingering: set[asyncio.WriteTransport] = set()  # job-side transports still flushing

    async def serve(self, listener: Any) -> None:
        """Accept connections on a listening socket (bound inside the sandbox's network namespace)."""
        self.servers.append(await asyncio.start_server(self.handle, sock=listener, limit=http.MAX_HEAD_BYTES))

    async def close(self) -> dict[str, Any]:
        """Stop listening, end every open flow, and return the network section for the record."""
        self.closing = True
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()
        for transport in list(self.lingering):  # every flow ends with the stage, flushed or not
            transport.abort()
        self.lingering.clear()
        return self.summary()

    def _stop_accepting(self) -> None:
        """Close the listener: later connects are refused by the kernel inside the job's namespace,
        at no cost to the worker (no accept, no parse, no audit line, no live event)."""
        for server in self.servers:
            server.close()

    def summary(self) -> dict[str, Any]:
        return {"policy": {"allowed_hosts": list(self.policy.allowed_hosts),
                           "allowed_ports": list(self.policy.allowed_ports),
                           "rate_bytes_per_s": self.policy.rate_bytes_per_s,
                           "max_bytes": self.policy.max_bytes},
                "totals": dict(self.totals), "connections": list(self.entries),
                "connections_dropped": self.dropped}

    # -- one connection ----------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        flow = Flow()
        if self.limit_hit:  # already in the backlog when the listener closed: drop, count nothing
            writer.transport.abort()
            self.tasks.discard(task)
            return
        self.active += 1
        self.totals["connections"] += 1
        try:
            self._admit()
            head = http.parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S))
            if head.method == "CONNECT":
                flow.kind = "connect"
                await self._tunnel(head, reader, writer, flow)
            else:
                flow.kind = "http"
                await self._plain(head, reader, writer, flow)
        except Refused as refused:
            # A cap that cuts a flow already relaying upstream bytes ends an allowed connection.
            cut = refused.reason == "bandwidth_exceeded" and (flow.relaying or flow.responded)
            flow.verdict = "allowed" if cut else "refused"
            flow.reason, flow.detail = refused.reason, refused.detail[:200]
            self._answer_refusal(writer, flow, refused)
        except asyncio.CancelledError:
            flow.reason = flow.reason or "stage_ended"
        except asyncio.LimitOverrunError:
            flow.verdict, flow.reason = "refused", "bad_request"
            self._answer_refusal(writer, flow, Refused("bad_request", "request head too large"))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError) as e:
            flow.reason = flow.reason or ("timeout" if isinstance(e, asyncio.TimeoutError) else "closed")
        except Exception:  # noqa: BLE001 - a bug here ends one flow, never the loop serving every job
            logging.getLogger("sandbox.egress").exception("egress flow of %s failed", self.job_id)
            flow.verdict, flow.reason = "refused", "proxy_error"
        finally:
            self.active -= 1
            self._end_transports(flow, writer)
            self._log(flow)
            self.tasks.discard(task)

    def _end_transports(self, flow: Flow, writer: asyncio.StreamWriter) -> None:
        """Close both sides of a flow so that neither outlives it (nor the stage).

        close() on a transport with unsent data keeps the socket open until the peer reads it,
        forever if it never does. The upstream's unsent bytes have no one left to answer: abort.
        The job's side may still be reading a response's tail: let it flush, but only until the
        stage ends (close() aborts what is left)."""
        if flow.upstream is not None:
            up = flow.upstream.transport
            if self.closing or up.get_write_buffer_size():
                up.abort()
            else:
                up.close()
        down = writer.transport
        if self.closing:
            down.abort()
        else:
            buffered = down.get_write_buffer_size() > 0
            down.close()
            if buffered:
                self.lingering.add(down)

    def _admit(self) -> None:
        p = self.policy
        if self.closing:
            raise Refused("stage_ended", "the stage that allowed network has ended")
        if self.totals["connections"] > p.max_connections:
            self.limit_hit = True
            self._stop_accepting()
            raise Refused("connection_limit", f"the job may open {p.max_connections} connections")
        if self.active > p.max_concurrent:
            raise Refused("too_many_connections", f"the job may hold {p.max_concurrent} connections at once")
        if self.cap_reached or self.bytes_total >= p.max_bytes:
            raise Refused("bandwidth_exceeded", f"the job's byte cap of {p.max_bytes} is used up")

    def _answer_refusal(self, writer: asyncio.StreamWriter, flow: Flow, refused: Refused) -> None:
        try:
            if not flow.responded:  # once upstream bytes went back, a 403 would land inside them
                writer.write(http.refusal(_STATUS.get(refused.reason, 403), refused.reason, refused.detail))
            elif flow.kind == "connect" and not flow.relaying:
                writer.write(tls.ACCESS_DENIED_ALERT)  # inside the tunnel a 403 would be read as TLS
        except (ConnectionError, RuntimeError):
            pass

    async def _check(self, host: str, port: int, flow: Flow) -> list[IPAddress]:
        flow.port = port
        flow.host = host[:253]
        host = normalise_target(host)
        flow.host = host
        check_port(self.policy, port)
        check_host(self.policy, host)  # before any lookup: a refused name never reaches DNS
        return await resolve_checked(self.policy, self.resolver, host, port)

    async def _open(self, addresses: list[IPAddress], port: int, flow: Flow):
        last: Exception | None = None
        for ip in addresses:  # every one was checked; connect to exactly these, no second lookup
            flow.address = str(ip)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(str(ip), port, limit=CHUNK),
                                                        CONNECT_TIMEOUT_S)
                flow.upstream = writer
                return reader, writer
            except (OSError, asyncio.TimeoutError) as e:
                last = e
        raise Refused("connect_failed", f"{flow.host}:{port} did not accept ({type(last).__name__})")

    async def _tunnel(self, head: http.RequestHead, reader, writer, flow: Flow):
        host, port = http.split_authority(head.target, None)
        addresses = await self._check(host, port, flow)
        up_reader, up_writer = await self._open(addresses, port, flow)
        flow.requests = 1
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        flow.responded = True
        try:
            hello, sni = await asyncio.wait_for(tls.read_client_hello(reader), HELLO_TIMEOUT_S)
        except tls.NotTLS as e:
            raise Refused("tls_required", f"a CONNECT tunnel must carry TLS ({e})") from e
        flow.sni = sni or ""
        if sni != flow.host:
            raise Refused("sni_mismatch", f"TLS server name {sni!r} is not the CONNECT host {flow.host}")
        flow.relaying = True
        await self._send(up_writer, hello, flow, up=True)
        await self._relay_both(self._pump(reader, up_writer, flow, up=True),
                               self._pump(up_reader, writer, flow, up=False))

    async def _plain(self, head: http.RequestHead, reader, writer, flow: Flow):
        authority, path = http.split_absolute(head.target)
        host, port = http.split_authority(authority, 80)
        addresses = await self._check(host, port, flow)
        self._check_request(head, authority, flow)  # a bad first request never reaches the upstream
        up_reader, up_writer = await self._open(addresses, port, flow)
        await self._relay_both(self._requests(head, reader, up_writer, flow, authority),
                               self._pump(up_reader, writer, flow, up=False))

    async def _requests(self, head: http.RequestHead, reader, up_writer, flow: Flow, first: str) -> None:
        """Forward requests one by one, checking each one's target and Host against the first."""
        while True:
            path, framing, length = self._check_request(head, first, flow)
            flow.requests += 1
            await self._send(up_writer, head.origin_form(path), flow, up=True)
            await http.copy_body(reader, lambda data: self._send(up_writer, data, flow, up=True), framing, length, CHUNK)
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), KEEPALIVE_IDLE_S)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                if up_writer.can_write_eof():
                    up_writer.write_eof()  # the client is done; let the last response finish
                return
            head = http.parse_head(raw)

    def _check_request(self, head: http.RequestHead, first: str, flow: Flow) -> tuple[str, str, int]:
        """(path, framing, length) of a request on a connection to `first`, or Refused."""
        authority, path = http.split_absolute(head.target)
        if authority.lower() != first.lower():
            raise Refused("host_mismatch", f"request for {authority[:100]!r} on a connection to {first}")
        hosts = head.values(b"host")
        if len(hosts) != 1 or _host_key(hosts[0].decode("latin-1"), flow.port) != _host_key(first, flow.port):
            raise Refused("host_mismatch", "the Host header must name the request's own host, once")
        framing, length = http.body_framing(head)
        return path, framing, length

    async def _relay_both(self, up, down) -> None:
        tasks = [asyncio.ensure_future(up), asyncio.ensure_future(down)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, flow: Flow, up: bool) -> None:
        while True:
            data = await src.read(CHUNK)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            await self._send(dst, data, flow, up)

    async def _send(self, dst: asyncio.StreamWriter, data: bytes, flow: Flow, up: bool) -> None:
        """Charge the job's byte cap and token bucket, then write with back-pressure."""
        n = len(data)
        if self.bytes_total + n > self.policy.max_bytes:
            self.cap_reached = True  # what is left would cut the next connection short, too
            raise Refused("bandwidth_exceeded", f"the job's byte cap of {self.policy.max_bytes} was reached")
        self.bytes_total += n
        await self.bucket.take(n)
        dst.write(data)
        if not up:
            flow.responded = True  # from here on a refusal can only close the connection
        await dst.drain()  # a job that never reads stops us reading upstream: memory stays flat
        if up:
            flow.bytes_up += n
        else:
            flow.bytes_down += n

    def _log(self, flow: Flow) -> None:
        entry = flow.entry()
        self.totals[flow.verdict] = self.totals.get(flow.verdict, 0) + 1
        self.totals["bytes_up"] += flow.bytes_up
        self.totals["bytes_down"] += flow.bytes_down
        if len(self.entries) < self.policy.max_log_entries:
            self.entries.append(entry)
        else:
            self.dropped += 1
        audit.info(json.dumps({"op": "egress", "job_id": self.job_id, **entry}, sort_keys=True))
        if self.on_entry is not None:
            _publisher.put(self.on_entry, entry)  # a Redis write off the loop, never on DNS's executor


def _host_key(authority: str, default_port: int | None) -> tuple[str, int | None]:
    try:
        host, port = http.split_authority(authority.strip(), default_port)
        return normalise_target(host), port
    except Refused:
        return ("", None)


class _Publisher:
    """Live connection-log events, published by one thread of their own from a bounded queue.

    Not the loop's default executor: getaddrinfo for every job's lookups runs there, and a job
    that makes many connections must not queue other jobs' DNS behind its events. When the queue
    is full the event is dropped (the record's log keeps the entry)."""

    MAX_QUEUED = 5000  # a few jobs' worth at the default connection cap; entries are ~0.5 KiB

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.MAX_QUEUED)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def put(self, fn: Callable[[dict[str, Any]], None], entry: dict[str, Any]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sandbox-egress-events", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((fn, entry))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            fn, entry = self._queue.get()
            try:
                fn(entry)
            except Exception:  # noqa: BLE001 - a lost live event must not break the flow; the record keeps it
                logging.getLogger("sandbox.egress").exception("publishing a connection log entry failed")


_publisher = _Publisher()
