"""The egress proxy: a sandbox's only way out, run by the worker outside the sandbox.

A job with `network.outbound` gets a listener on 127.0.0.1:3128 inside its own network namespace
(bound there by a short-lived worker thread that setns()-es into it while bwrap waits on its
--block-fd); one asyncio loop thread per worker process serves every sandbox's listener. The job
sees only loopback: no host interface, no resolver. See docs/network.md.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import threading
from typing import Any, Callable

from config.settings import Settings
from sandbox.egress.proxy import Session
from sandbox.egress.rules import EgressPolicy, Refused, Resolver
from sandbox.errors import SandboxFailure
from sandbox.spec import JobSpec

__all__ = ["EgressService", "EgressPolicy", "Refused", "Resolver", "Session", "PROXY_PORT", "proxy_env"]

PROXY_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15  # lo may not be up yet when we bind: bwrap brings it up in the child a moment later
_libc = ctypes.CDLL(None, use_errno=True)


def proxy_env() -> dict[str, str]:
    """Variables that make curl, pip, git, requests, urllib and Node find the proxy by themselves."""
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = PROXY_URL  # curl reads only lower-case http_proxy
    env["NO_PROXY"] = env["no_proxy"] = ""
    env["NODE_USE_ENV_PROXY"] = "1"
    return env


class _Loop:
    """The worker process's one egress event loop, in a daemon thread, started on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="sandbox-egress", daemon=True).start()
                cls._loop = loop
            return cls._loop


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in_netns(pid: int, port: int = PROXY_PORT) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` in the network namespace of process `pid`.

    setns() changes only the calling thread's namespace, so a throw-away thread does it; the
    socket stays in the namespace it was created in after the thread is gone.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/proc/{int(pid)}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen(256)
                sock.setblocking(False)
                box["sock"] = sock
            finally:
                _setns(own)  # never hand the thread back in the job's namespace
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=work, name=f"egress-setns-{pid}")
    thread.start()
    thread.join()
    if "error" in box:
        raise SandboxFailure(f"could not bind the egress proxy inside the sandbox: {box['error']}")
    return box["sock"]


class EgressService:
    """Opens and closes egress sessions for sandboxes on this worker; thread-safe."""

    def __init__(self, settings: Settings, resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.resolver = resolver or Resolver(dict(settings.egress_hosts))

    def policy_for(self, spec: JobSpec) -> EgressPolicy:
        """The job's network policy with the operator's ceilings and caps."""
        s, net = self.settings, spec.network
        return EgressPolicy(
            allowed_hosts=net.allowed_hosts, allowed_ports=net.allowed_ports,
            blocked_ports=frozenset(net.blocked_ports) | frozenset(s.blocked_ports),
            allow_cidrs=s.egress_allow_cidrs, rate_bytes_per_s=spec.resources.bandwidth_bps / 8,
            max_bytes=s.egress_max_bytes, max_connections=s.egress_max_connections,
            max_concurrent=s.egress_max_concurrent, max_log_entries=s.egress_log_entries)

    def open(self, job_id: str, policy: EgressPolicy, pid: int,
             on_entry: Callable[[dict[str, Any]], None] | None = None) -> "OpenSession":
        """Bind the proxy inside `pid`'s network namespace and start serving it."""
        listener = listen_in_netns(pid)
        loop = _Loop.get()
        session = Session(job_id, policy, self.resolver, on_entry)
        try:
            asyncio.run_coroutine_threadsafe(session.serve(listener), loop).result(timeout=10)
        except BaseException:
            listener.close()
            raise
        return OpenSession(session, loop)


class OpenSession:
    """A session being served; close() ends every flow and returns the record's network section."""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        self.session, self.loop = session, loop

    def close(self, timeout_s: float = 10.0) -> dict[str, Any]:
        future = asyncio.run_coroutine_threadsafe(self.session.close(), self.loop)
        try:
            return future.result(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a stuck loop must not fail the job's stage; the log says so
            logging.getLogger("sandbox.egress").exception("closing the egress session of %s", self.session.job_id)
            summary = self.session.summary()
            summary["incomplete"] = True  # flows still open when the stage ended are not in the log
            return summary
