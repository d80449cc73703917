"""A hostile job against the egress proxy: refusal floods, stalled upstreams, cut responses.

Adapted from the session-7 review repros (real bwrap sandbox, real upstream namespace)."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

from sandbox.spec import parse_job
from tests.support.egress import Box, Sink, upstream  # noqa: F401
from tests.support.netns import Upstream


def run_script(box: Box, script: str, hosts: list[str], ports: list[int] | None = None,
               sink: Sink | None = None, **extra: Any):
    network: dict[str, Any] = {"outbound": True, "allowed_hosts": hosts}
    if ports is not None:
        network["allowed_ports"] = ports
    doc = {"command": "python3 s.py", "timeout": 60, "network": network,
           "files": [{"path": "s.py", "content": script},
                     {"path": "ca.pem", "content": box.up.ca_pem.decode()}], **extra}
    result, sink = box.run(parse_job(doc, box.settings), sink)
    got = None
    for line in bytes(sink.out["stdout"]).decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            got = json.loads(line[7:])
    return got, result, sink


# Four processes open and refuse-bait connections as fast as they can for 4 s.
FLOOD = r'''
import socket, time, json, os
for _ in range(2):
    if os.fork() == 0: break
n = refused = 0; t0 = time.time()
while time.time() - t0 < 4:
    try:
        s = socket.create_connection(("127.0.0.1", 3128))
        s.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n"); s.recv(1000); s.close(); n += 1
    except OSError:
        refused += 1
print("RESULT " + json.dumps({"opened": n, "refused": refused}), flush=True)
'''

VICTIM = r'''
import socket, ssl, json
ctx = ssl.create_default_context(cafile="/workspace/ca.pem")
ok = 0
for _ in range(10):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\n\r\n"); r = s.recv(1000); assert r.startswith(b"HTTP/1.1 200"), r
    t = ctx.wrap_socket(s, server_hostname="api.test")
    t.sendall(b"GET /hello HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
    ok += bool(t.recv(1000)); t.close()
print("RESULT " + json.dumps({"ok": ok}))
'''


class SlowSink(Sink):
    """A live-event sink costing 3 ms per event, as an XADD+PUBLISH to a busy Redis may."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def event(self, entry: dict[str, Any]) -> None:
        self.threads.add(threading.current_thread().name)  # who publishes: never DNS's executor
        time.sleep(0.003)
        super().event(entry)


@pytest.fixture(scope="module")
def flood_box(upstream: Upstream) -> Iterator[Box]:
    b = Box(upstream, SANDBOX_EGRESS_MAX_CONNECTIONS="100")
    yield b
    b.close()


def test_a_flood_past_the_connection_cap_costs_one_entry_and_leaves_other_jobs_alone(flood_box: Box) -> None:
    flood: dict = {}
    sink = SlowSink()
    t = threading.Thread(target=lambda: flood.update(zip(("got", "result", "sink"),
                                                         run_script(flood_box, FLOOD, ["api.test"], sink=sink))))
    t.start()
    time.sleep(2)
    victim, _, vsink = run_script(flood_box, VICTIM, ["api.test"])
    t.join()
    net = flood["result"].network
    limits = [e for e in net["connections"] if e["reason"] == "connection_limit"]
    assert victim == {"ok": 10}, bytes(vsink.out["stderr"])
    # Past the cap the listener is closed: the kernel refuses, the worker accepts nothing more.
    assert flood["got"] and flood["got"]["refused"] > 0, flood["got"]
    assert len(limits) == 1, limits
    assert net["totals"]["connections"] < 400 and len(net["connections"]) + net["connections_dropped"] < 400, net["totals"]
    # live events are published by their own thread, never on the loop's default executor, where
    # every job's getaddrinfo runs (a slow sink there queued other jobs' lookups for seconds)
    assert sink.threads == {"sandbox-egress-events"}, sink.threads


# Ask for a big response, never read it, and keep sending pipelined requests: the upstream,
# busy writing, stops reading, so the proxy's write buffer toward it fills.
STALL = r'''
import socket, time, json
socks = []
for _ in range(1):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.sendall(b"GET http://api.test/bytes/100000000 HTTP/1.1\r\nHost: api.test\r\n\r\n")
    s.setblocking(False)
    socks.append(s)
sent = 0; t0 = time.time()
while time.time() - t0 < 4:
    blocked = 0
    for s in socks:
        try:
            sent += s.send(b"GET http://api.test/hello HTTP/1.1\r\nHost: api.test\r\n\r\n" * 100)
        except (BlockingIOError, ConnectionError):
            blocked += 1
    if blocked == len(socks):
        time.sleep(0.05)
print("RESULT " + json.dumps({"sent": sent}), flush=True)
'''


@pytest.fixture(scope="module")
def box(upstream: Upstream) -> Iterator[Box]:
    b = Box(upstream, SANDBOX_EGRESS_MAX_BYTES="3Mi", SANDBOX_MAX_BANDWIDTH="10Gbps")
    yield b
    b.close()


def _established_to(box: Box, port: int) -> list[str]:
    out = subprocess.run(["ss", "-tnH", "state", "established", "dst", f"{box.up.address}:{port}"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_no_upstream_connection_outlives_its_stage_when_the_upstream_stops_reading(upstream: Upstream) -> None:
    b = Box(upstream)
    try:
        got, result, sink = run_script(b, STALL, ["api.test"], ports=[80], resources={"bandwidth": "1Gbps"})
        assert got and got["sent"] > 0, bytes(sink.out["stderr"])
        deadline = time.monotonic() + 5  # an abort is immediate; a flush that never comes never ends
        while _established_to(b, 80) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _established_to(b, 80) == []
    finally:
        b.close()


CUT = r'''
import socket, json
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"GET http://files.test/bytes/5000000 HTTP/1.1\r\nHost: files.test\r\n\r\n")
data = b""
while True:
    c = s.recv(65536)
    if not c: break
    data += c
head, body = data.split(b"\r\n\r\n", 1)
print("RESULT " + json.dumps({"status": head.split(b"\r\n")[0].decode(), "proxy_bytes": body.find(b"HTTP/1.1") >= 0}))
'''


def test_the_byte_cap_cuts_a_response_without_writing_into_it(box: Box) -> None:
    got, result, sink = run_script(box, CUT, ["files.test"], ports=[80], resources={"bandwidth": "1Gbps"})
    (entry,) = result.network["connections"]
    assert got and got["status"].startswith("HTTP/1.1 200") and not got["proxy_bytes"], got
    assert (entry["verdict"], entry["reason"]) == ("allowed", "bandwidth_exceeded"), entry
