"""Test upstreams in a network namespace of their own: a veth pair in a /30 that only the test opens
(SANDBOX_EGRESS_ALLOW_CIDRS), an HTTP + TLS server inside, a test CA. Nothing leaves the machine."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

from tests.support.services import ROOT, require_module, unavailable

HOSTS = ("api.test", "other.test", "files.test", "v6.test")


@dataclass
class Upstream:
    """Where the test upstream lives and how a job trusts it."""

    netns: str
    host_address: str  # the worker's side of the veth
    address: str  # the upstream's address inside its namespace
    cidr: str
    address6: str  # the same upstream over IPv6 (a ULA /64, also opened only by the test)
    cidr6: str
    ca_pem: bytes
    ca_file: str
    server: subprocess.Popen

    def host_map(self, **extra: str) -> str:
        """SANDBOX_EGRESS_HOSTS naming the upstream (plus `extra` name=address pairs)."""
        pairs = [f"{h}={self.address6 if h == 'v6.test' else self.address}" for h in HOSTS]
        pairs += [f"{k.replace('_', '.')}={v}" for k, v in extra.items()]
        return ",".join(pairs)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def start_upstream() -> Iterator[Upstream]:
    """Create the namespace, veth and server; everything is removed again, even after a failure."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        unavailable("egress tests need root and iproute2 (`ip`) to make a network namespace")
    trustme = require_module("trustme", "egress tests")
    tag = f"{os.getpid() % 10000}{random.randrange(100, 999)}"
    netns, veth_host, veth_ns = f"sbxeg{tag}", f"veh{tag}", f"ven{tag}"
    third = random.randrange(0, 64) * 4  # a fresh /30 per run: parallel runs never share a route
    octet = random.randrange(1, 250)
    base = f"10.203.{octet}.{third}"
    host_address, address, cidr = f"10.203.{octet}.{third + 1}", f"10.203.{octet}.{third + 2}", f"{base}/30"
    prefix6 = f"fd20:203:{octet:x}:{third:x}"
    address6, cidr6 = f"{prefix6}::2", f"{prefix6}::/64"
    tmp = tempfile.mkdtemp(prefix="egress-ca-")
    server: subprocess.Popen | None = None
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", veth_host, "type", "veth", "peer", "name", veth_ns)
        _ip("link", "set", veth_ns, "netns", netns)
        _ip("addr", "add", f"{host_address}/30", "dev", veth_host)
        _ip("link", "set", veth_host, "up")
        _ip("-n", netns, "addr", "add", f"{address}/30", "dev", veth_ns)
        _ip("-n", netns, "link", "set", veth_ns, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-6", "addr", "add", f"{prefix6}::1/64", "dev", veth_host, "nodad")
        _ip("-n", netns, "-6", "addr", "add", f"{address6}/64", "dev", veth_ns, "nodad")
        ca = trustme.CA()
        cert = ca.issue_cert(*HOSTS)
        cert.private_key_and_cert_chain_pem.write_to_path(os.path.join(tmp, "server.pem"))
        ca.cert_pem.write_to_path(os.path.join(tmp, "ca.pem"))
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.upstream",
             os.path.join(tmp, "server.pem"), os.path.join(tmp, "server.pem")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"upstream did not start: {line!r} {server.stderr.read() if server.stderr else b''!r}")
        with open(os.path.join(tmp, "ca.pem"), "rb") as f:
            ca_pem = f.read()
        yield Upstream(netns, host_address, address, cidr, address6, cidr6, ca_pem, os.path.join(tmp, "ca.pem"), server)
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        subprocess.run(["ip", "link", "del", veth_host], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
