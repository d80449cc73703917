"""Egress proxy cost beside a direct connection, in one run: connect + 1 KiB latency, bulk throughput
(no rate limit), and the set-up cost it adds to a sandbox run.

Run as root:  .venv/bin/python bench/egress.py [iterations]

The upstream is an asyncio server on 127.0.0.1 (opened for the bench with allow_cidrs, as an
operator's SANDBOX_EGRESS_ALLOW_CIDRS would); the proxy session runs on the worker's shared
egress loop exactly as in production, listening on host loopback instead of inside a sandbox.
Goal (issue 11): <= 2 ms added per connection at p50, >= 100 MB/s relayed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.settings import load_settings  # noqa: E402
from sandbox.egress import EgressPolicy, OpenSession, Resolver, Session, _Loop  # noqa: E402
from sandbox.runtimes.local import LocalRuntime  # noqa: E402
from sandbox.spec import parse_job  # noqa: E402
from tests.support.services import remove_work_dir  # noqa: E402

KIB = b"x" * 1024
BULK_BYTES = 200 * 1000 * 1000


async def _serve_upstream() -> int:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        size = BULK_BYTES if b"/bulk" in head.split(b"\r\n")[0] else len(KIB)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        block = b"x" * 262144
        sent = 0
        while sent < size:
            writer.write(block[:size - sent])
            sent += min(len(block), size - sent)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
    return server.sockets[0].getsockname()[1]


def _fetch(addr: tuple[str, int], request: bytes) -> int:
    s = socket.create_connection(addr)
    try:
        s.sendall(request)
        n = 0
        while True:
            chunk = s.recv(262144)
            if not chunk:
                return n
            n += len(chunk)
    finally:
        s.close()


def _pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]


def proxy_figures(n: int) -> None:
    loop = _Loop.get()
    port = asyncio.run_coroutine_threadsafe(_serve_upstream(), loop).result()
    policy = EgressPolicy(allowed_hosts=("bench.test",), allowed_ports=(port,),
                          allow_cidrs=(ipaddress.ip_network("127.0.0.0/8"),), rate_bytes_per_s=0,
                          max_bytes=1 << 40, max_connections=10**9, max_concurrent=1000, max_log_entries=10)
    session = Session("bench", policy, Resolver({"bench.test": ("127.0.0.1",)}))
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    listener.setblocking(False)
    asyncio.run_coroutine_threadsafe(session.serve(listener), loop).result()
    proxy = listener.getsockname()
    direct_req = b"GET /small HTTP/1.1\r\nHost: bench.test\r\n\r\n"
    proxied_req = f"GET http://bench.test:{port}/small HTTP/1.1\r\nHost: bench.test:{port}\r\n\r\n".encode()
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(20):
        _fetch(("127.0.0.1", port), direct_req), _fetch(proxy, proxied_req)
    for _ in range(n):  # interleaved: host load falls on both alike
        for name, addr, req in (("direct", ("127.0.0.1", port), direct_req), ("proxy", proxy, proxied_req)):
            t = time.perf_counter()
            assert _fetch(addr, req) > 1024
            times[name].append((time.perf_counter() - t) * 1000)
    print(f"connect + 1 KiB, {n} rounds     p50      p95")
    for name, xs in times.items():
        print(f"  {name:<28} {statistics.median(xs):6.3f} ms {_pct(xs, 0.95):6.3f} ms")
    print(f"  added by the proxy (p50)     {statistics.median(times['proxy']) - statistics.median(times['direct']):6.3f} ms")
    rates = {}
    for name, addr, req in (("direct", ("127.0.0.1", port), direct_req.replace(b"/small", b"/bulk")),
                            ("proxy", proxy, proxied_req.replace(b"/small", b"/bulk"))):
        t = time.perf_counter()
        got = _fetch(addr, req)
        rates[name] = got / (time.perf_counter() - t) / 1e6
    print(f"bulk {BULK_BYTES // 10**6} MB: direct {rates['direct']:.0f} MB/s, proxy {rates['proxy']:.0f} MB/s "
          f"({rates['proxy'] / rates['direct']:.2f}x)")
    OpenSession(session, loop).close()


def setup_figures(n: int) -> None:
    work = tempfile.mkdtemp(prefix="sandbox-bench-", dir=os.environ.get("SANDBOX_BENCH_DIR", "/var/lib"))
    os.chmod(work, 0o711)
    try:
        settings = load_settings({"SANDBOX_WORK_DIR": work, "SANDBOX_ALLOWED_HOSTS": "bench.test",
                                  "SANDBOX_ALLOWED_COMMANDS": "ls"})
        rt = LocalRuntime(settings)
        times: dict[str, list[float]] = {"no network": [], "outbound (proxy bound)": []}
        opening: list[float] = []
        real_open = rt.egress.open

        def timed_open(*args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return real_open(*args, **kwargs)
            finally:
                opening.append((time.perf_counter() - t) * 1000)

        rt.egress.open = timed_open  # type: ignore[method-assign]
        for i in range(n + 2):
            for name, network in (("no network", {}), ("outbound (proxy bound)", {"outbound": True})):
                spec = parse_job({"id": f"b{uuid.uuid4().hex[:10]}", "command": "ls", "network": network}, settings)
                handle = rt.create(spec, "bench")
                t = time.perf_counter()
                rt.execute(handle, spec, lambda s, c: None)
                if i >= 2:
                    times[name].append((time.perf_counter() - t) * 1000)
                rt.destroy(handle)
        print(f"sandbox execute of `ls`, {n} rounds    p50      min")
        for name, xs in times.items():
            print(f"  {name:<28} {statistics.median(xs):6.2f} ms {min(xs):6.2f} ms")
        added = statistics.median(times["outbound (proxy bound)"]) - statistics.median(times["no network"])
        print(f"  setns + bind + serve, alone  {statistics.median(opening):6.2f} ms {min(opening):6.2f} ms")
        added_min = min(times["outbound (proxy bound)"]) - min(times["no network"])
        print(f"  added by the proxy set-up    {added:6.2f} ms (p50), {added_min:6.2f} ms (min)")
    finally:
        remove_work_dir(work)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    proxy_figures(n)
    if os.geteuid() == 0:
        setup_figures(max(10, n // 10))
    else:
        print("sandbox set-up cost: skipped (needs root)")


if __name__ == "__main__":
    main()
