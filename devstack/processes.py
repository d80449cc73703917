"""Processes of the local stack (and the tests): a Redis server and Celery workers, on free loopback ports."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
from kombu.exceptions import OperationalError

ROOT = Path(__file__).resolve().parents[1]


class ServiceUnavailable(RuntimeError):
    """A program the stack needs is not installed (make installs it)."""


def find_binary(binary: str) -> str:
    """Path of `binary`: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / binary
    path = str(beside) if beside.exists() else shutil.which(binary)
    if not path:
        raise ServiceUnavailable(f"{binary} is not installed (make installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """TERM the process group, then KILL whatever is left."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class RedisServer:
    """redis-server on 127.0.0.1, in its own process group, durable as production's must be: every
    write in the append-only file (fsynced every second), and no eviction of queued work."""

    def __init__(self, base_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.base_dir = base_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = find_binary("redis-server")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--dir", str(self.base_dir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def restart(self) -> None:
        """Stop with SIGTERM and start again on the same port and append-only file."""
        self.stop()
        self.start()


class Worker:
    """A real `celery worker` process consuming the service's queues under a given node name."""

    def __init__(self, env: dict[str, str], node: str, log_path: Path, concurrency: int | None = None,
                 queue: str = "sandbox") -> None:
        self.env = env
        self.queue = queue
        self.node = node
        self.log_path = log_path
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self.extra_args: list[str] = []
        # each worker its own metrics port: several run on one host in tests
        self.metrics_port = int(env.get("SANDBOX_METRICS_PORT") or free_port())

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, app, timeout_s: float = 60.0) -> None:  # noqa: ANN001
        env = {**os.environ, **self.env, "SANDBOX_NODE_NAME": self.node, "SANDBOX_METRICS_PORT": str(self.metrics_port)}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            # the production pool (threads, one process per node); its size from celeryconfig unless given
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", self.node, "--pool=threads",
             *(["-c", str(self.concurrency)] if self.concurrency else []),
             "-l", "INFO", "--without-mingle", "--without-gossip", "-Q", self.queue, *self.extra_args],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.node} exited: {self.tail()}")
            try:
                replies = app.control.ping(destination=[self.node], timeout=0.5) or []
            except (redis.ConnectionError, OperationalError):
                # a connection of kombu's process-wide pool that Redis closed when it restarted (a
                # fresh app shares that pool): the next ping takes another
                time.sleep(0.1)
                continue
            if replies:
                return
        raise RuntimeError(f"worker {self.node} did not answer ping: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool), as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, timeout_s=30)
        if getattr(self, "log", None):
            self.log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
