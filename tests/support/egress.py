"""Fixtures for egress tests: the upstream namespace, and a LocalRuntime whose jobs may reach it."""
from __future__ import annotations

import io
import os
import shlex
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import json
import pytest

from config.settings import load_settings
from sandbox.runtimes.base import ExecResult, SandboxHandle
from sandbox.runtimes.local import LocalRuntime
from sandbox.spec import JobSpec, parse_job
from tests.support.netns import HOSTS, Upstream, start_upstream
from tests.support.services import remove_work_dir, unavailable

PROBE = (Path(__file__).parent / "egress_probe.py").read_text()
# Names the operator maps to addresses no job may reach (each on the allow-lists, so the address
# rule is what refuses them).
BAD_ADDRESSES = {
    "loop.test": "127.0.0.1", "meta.test": "169.254.169.254", "private.test": "10.1.2.3",
    "cgnat.test": "100.64.0.1", "mapped.test": "::ffff:127.0.0.1", "compat.test": "::127.0.0.1",
    "nat64.test": "64:ff9b::7f00:1", "sixtofour.test": "2002:7f00:1::1", "linklocal.test": "fe80::1",
    "multicast.test": "224.0.0.1", "metav6.test": "fd00:ec2::254", "zero.test": "0.0.0.0",
}
DNS_ONLY = ("flip.test",)  # resolved by the injected resolver, not the static map


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from start_upstream()


class Sink:
    """An OutputSink that keeps output and the live connection-log events."""

    def __init__(self) -> None:
        self.out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, stream: str, chunk: bytes) -> None:
        with self.lock:
            self.out[stream] += chunk

    def event(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(entry)

    def result(self) -> dict[str, Any]:
        """The probe's RESULT line."""
        for line in bytes(self.out["stdout"]).decode(errors="replace").splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise AssertionError(f"no RESULT: stdout={bytes(self.out['stdout'])[-500:]!r} "
                             f"stderr={bytes(self.out['stderr'])[-1500:]!r}")


class Box:
    """A LocalRuntime with egress settings pointing at the test upstream."""

    def __init__(self, up: Upstream, **env: str) -> None:
        if os.geteuid() != 0 or not os.path.exists("/usr/bin/bwrap"):
            unavailable("egress tests need root and bubblewrap")
        self.up = up
        self.work = tempfile.mkdtemp(prefix="sbx-egress-", dir="/tmp")
        os.chmod(self.work, 0o711)
        names = ",".join((*HOSTS, *BAD_ADDRESSES, *DNS_ONLY))
        mapped = ",".join(f"{k}={v}" for k, v in BAD_ADDRESSES.items())
        self.settings = load_settings({
            "SANDBOX_WORK_DIR": self.work, "SANDBOX_ALLOWED_HOSTS": names,
            "SANDBOX_EGRESS_HOSTS": up.host_map() + "," + mapped, "SANDBOX_EGRESS_ALLOW_CIDRS": f"{up.cidr},{up.cidr6}",
            "SANDBOX_ALLOWED_COMMANDS": "curl,python3,git", "SANDBOX_MAX_LOG_BYTES": "256Ki", **env})
        self.rt = LocalRuntime(self.settings)

    def job(self, command: str, hosts: list[str] | None = None, ports: list[int] | None = None,
            env: dict[str, str] | None = None, **extra: Any) -> JobSpec:
        network: dict[str, Any] = {"outbound": True}
        if hosts is not None:
            network["allowed_hosts"] = hosts
        if ports is not None:
            network["allowed_ports"] = ports
        doc = {"command": command, "timeout": 60, "network": network,
               "environment": {"SSL_CERT_FILE": "/workspace/ca.pem", "REQUESTS_CA_BUNDLE": "/workspace/ca.pem",
                               "CURL_CA_BUNDLE": "/workspace/ca.pem", **(env or {})},
               "files": [{"path": "probe.py", "content": PROBE},
                         {"path": "ca.pem", "content": self.up.ca_pem.decode()}], **extra}
        return parse_job(doc, self.settings)

    def run(self, spec: JobSpec, sink: Sink | None = None) -> tuple[ExecResult, Sink]:
        sink = sink or Sink()
        handle = self.rt.create(spec, "test-host")
        try:
            for f in spec.files:
                self.rt.put_file(handle, f.path, io.BytesIO(f.content or b""), f.mode)
            result = self.rt.execute(handle, spec, sink)
        finally:
            self.rt.destroy(handle)
        return result, sink

    def probe(self, *args: str, hosts: list[str] | None = None, ports: list[int] | None = None,
              **extra: Any) -> tuple[dict[str, Any], ExecResult, Sink]:
        command = "python3 probe.py " + " ".join(shlex.quote(a) for a in args)
        result, sink = self.run(self.job(command, hosts, ports, **extra))
        return sink.result(), result, sink

    def close(self) -> None:
        for info in self.rt.list_sandboxes():
            self.rt.destroy(SandboxHandle(info.sandbox_id, info.job_id, "local", info.host, 0, 0))
        remove_work_dir(self.work)


def entries(result: ExecResult) -> list[dict[str, Any]]:
    """The connection log on the result (what the record's network section holds)."""
    assert result.network is not None, "no network section"
    return result.network["connections"]
