"""A fake Fly Machines API, strict to Fly's OpenAPI spec, whose machines run the real agent.

Every request is checked against the spec (tests/support/flyspec.py) and kept in `requests`
(never with its Authorization header). "Starting" a machine starts `python -m sandbox.agent` with
the machine's env on a loopback address of its own (127.0.x.y, reported as `private_ip`), its own
work dir and host uid range; destroying it stops that process and tears down whatever its
sandbox left (as a VM's end would). Faults are injected with `fail(...)`, `no_capacity` and
`start_delay_s`.
"""
from __future__ import annotations

import json
import atexit
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sandbox.runtimes.flyapi import auth_header
from tests.support.flyspec import SpecViolation, validate_request
from tests.support.services import ROOT, remove_work_dir, stop_process


@dataclass
class Fault:
    """`times` answers to requests matching `method` and a path ending in `path_suffix`."""

    method: str
    path_suffix: str
    kind: str  # "status" (answer `status` before acting), "reset_before", "reset_after", "slow"
    times: int = 1
    status: int = 500
    retry_after: str | None = None
    body: dict[str, Any] | None = None
    delay_s: float = 0.0


@dataclass
class FakeMachine:
    id: str
    name: str
    region: str
    config: dict[str, Any]
    private_ip: str
    state: str = "created"
    created_at: str = ""
    proc: subprocess.Popen | None = None
    work_dir: str = ""
    log_path: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "region": self.region,
                "instance_id": self.id.upper() + "0" * 12, "private_ip": self.private_ip,
                "config": self.config, "created_at": self.created_at, "updated_at": self.created_at, "events": []}


class FakeFly(ThreadingHTTPServer):
    """The fake API on 127.0.0.1:<free port>; `url` is what SANDBOX_FLY_API_URL takes."""

    daemon_threads = True

    def __init__(self, token: str, app: str, base_dir: Path, agent_port: int, agent_env: dict[str, str] | None = None,
                 start_agents: bool = True, wait_cap_s: float = 10.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token, self.app, self.base_dir, self.agent_port = token, app, base_dir, agent_port
        self.agent_env = agent_env or {}
        self.start_agents = start_agents
        self.wait_cap_s = wait_cap_s  # the real API blocks up to `timeout`; tests need not wait that long
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.machines: dict[str, FakeMachine] = {}
        self.destroyed: dict[str, FakeMachine] = {}
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.no_capacity: set[str] = set()
        self.start_delay_s = 0.0  # float("inf"): the machine never starts
        self.changed = threading.Condition()
        self._next = 0
        # loopback addresses of their own: two fakes (or two test sessions) never share one
        self._net = f"127.{random.randint(16, 250)}.{random.randint(0, 255)}"
        self._lock = threading.Lock()
        self.uid_base = 3_000_000 + random.randint(0, 1000) * 20_000  # host uids apart from other fakes
        self._thread = threading.Thread(target=self.serve_forever, name="fakefly", daemon=True)

    # -- test-side API ---------------------------------------------------------------------------
    def start(self) -> "FakeFly":
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o711)
        self._thread.start()
        atexit.register(self._kill_agents)  # a test run that dies leaves no agent behind
        return self

    def _kill_agents(self) -> None:
        for machine in list(self.machines.values()):
            if machine.proc is not None and machine.proc.poll() is None:
                os.killpg(machine.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        for machine in list(self.machines.values()):
            self._destroy(machine)
        self.shutdown()
        self.server_close()

    def fail(self, method: str, path_suffix: str, kind: str = "status", **kw: Any) -> Fault:
        fault = Fault(method, path_suffix, kind, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset(self) -> None:
        """Forget faults and recorded requests (machines stay)."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
        self.no_capacity.clear()
        self.start_delay_s = 0.0

    def live(self) -> list[FakeMachine]:
        """Machines not destroyed (their agent may still run)."""
        return [m for m in list(self.machines.values()) if m.state != "destroyed"]

    def machine_of(self, job_id: str) -> list[FakeMachine]:
        everything = list(self.machines.values()) + list(self.destroyed.values())
        return [m for m in everything if (m.config.get("metadata") or {}).get("sandbox_job") == job_id]

    def add_foreign_machine(self, metadata: dict[str, str]) -> FakeMachine:
        """A machine this service did not make (another team's, in the same app): sweeps leave it."""
        return self._create({"name": f"foreign-{secrets.token_hex(3)}", "region": "ams",
                             "config": {"image": "other", "metadata": metadata}}, start=False)

    # -- machines --------------------------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and path.endswith(fault.path_suffix):
                    fault.times -= 1
                    return fault
        return None

    def _create(self, body: dict[str, Any], start: bool = True) -> FakeMachine:
        with self._lock:
            self._next += 1
            n = self._next
        machine = FakeMachine(id=secrets.token_hex(7), name=body.get("name") or f"m{n}", region=body.get("region", "ams"),
                              config=body["config"], private_ip=f"{self._net}.{2 + n % 250}",
                              created_at=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))
        self.machines[machine.id] = machine
        if start and not body.get("skip_launch"):
            threading.Thread(target=self._boot, args=(machine,), daemon=True).start()
        return machine

    def _boot(self, machine: FakeMachine) -> None:
        if self.start_delay_s == float("inf"):
            return
        time.sleep(self.start_delay_s)
        with machine.lock:
            if machine.state != "created":
                return
            if self.start_agents:
                self._spawn_agent(machine)
            self._set_state(machine, "started")
        if machine.proc is not None:
            threading.Thread(target=self._auto_destroy, args=(machine,), daemon=True).start()

    def _spawn_agent(self, machine: FakeMachine) -> None:
        work = self.base_dir / machine.id
        work.mkdir(mode=0o711)
        machine.work_dir, machine.log_path = str(work), str(self.base_dir / f"agent-{machine.id}.log")
        n = int(machine.private_ip.rsplit(".", 1)[-1])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               **(machine.config.get("env") or {}), **self.agent_env,
               # what a VM would differ in: its address, its disk, its own uids
               "SANDBOX_AGENT_LISTEN": f"{machine.private_ip}:{self.agent_port}", "SANDBOX_WORK_DIR": str(work),
               "SANDBOX_UID": str(self.uid_base + n * 64), "SANDBOX_UID_COUNT": "64",
               "FLY_MACHINE_ID": machine.id, "FLY_APP_NAME": self.app, "FLY_REGION": machine.region,
               "FLY_PRIVATE_IP": machine.private_ip}
        with open(machine.log_path, "ab") as log:
            machine.proc = subprocess.Popen([sys.executable, "-m", "sandbox.agent"], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _auto_destroy(self, machine: FakeMachine) -> None:
        machine.proc.wait()  # auto_destroy: true - the main process ended, so does the machine
        if machine.config.get("auto_destroy"):
            self._destroy(machine)

    def _set_state(self, machine: FakeMachine, state: str) -> None:
        with self.changed:
            machine.state = state
            self.changed.notify_all()

    def _destroy(self, machine: FakeMachine) -> None:
        with machine.lock:
            if machine.state == "destroyed":
                return
            self._set_state(machine, "destroying")
            if machine.proc is not None:
                stop_process(machine.proc, timeout_s=5)
            if machine.work_dir:
                _teardown_sandboxes(machine.work_dir)
                remove_work_dir(machine.work_dir)
            self._set_state(machine, "destroyed")
            self.machines.pop(machine.id, None)
            self.destroyed[machine.id] = machine

    def _wait(self, machine: FakeMachine, state: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + min(timeout_s, self.wait_cap_s)
        with self.changed:
            while machine.state != state:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (state == "started" and machine.state == "destroyed"):
                    return False
                self.changed.wait(remaining)
        return True


def _teardown_sandboxes(work_dir: str) -> None:
    """What a VM's end does to the sandbox inside: kill its cgroup, drop its mounts (here, the host's)."""
    from config.settings import load_settings
    from sandbox.runtimes.base import SandboxHandle
    from sandbox.runtimes.local import LocalRuntime

    try:
        rt = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": work_dir}))
        for info in rt.list_sandboxes():
            rt.destroy(SandboxHandle(info.sandbox_id, info.job_id, "local", info.host, 0, 0))
        rt.reap_incomplete(older_than=float("inf"))
    except Exception as e:  # noqa: BLE001 - a test's own teardown reports what is left
        print(f"fakefly: teardown of {work_dir} failed: {e}", file=sys.stderr)


def _error(status: int, message: str, fly_status: str | None = None) -> tuple[int, dict[str, Any]]:
    return status, ({"error": message, "status": fly_status} if fly_status else {"error": message})


class _Handler(BaseHTTPRequestHandler):
    server: FakeFly
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        return None

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        fly = self.server
        url = urlsplit(self.path)
        path = url.path[3:] if url.path.startswith("/v1/") else url.path
        query = parse_qs(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry: dict[str, Any] = {"method": method, "path": path, "query": query, "body": None, "at": time.time()}
        with fly._lock:
            fly.requests.append(entry)
        status, body, headers = self._answer(method, path, query, raw, entry)
        entry["status"] = status
        if status == 0:  # a connection reset: no answer at all
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, method: str, path: str, query: dict[str, list[str]], raw: bytes,
                entry: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        fly = self.server
        if self.headers.get("Authorization") != auth_header(fly.token):  # Fly's rule, as fly-go applies it
            return (*_error(401, "You must be authenticated to view this."), {})
        try:
            entry["body"] = json.loads(raw) if raw else None
        except ValueError:
            return (*_error(400, "invalid JSON body"), {})
        try:
            entry["op"] = validate_request(method, path, query, entry["body"])
        except SpecViolation as e:
            entry["violation"] = str(e)
            return (*_error(400, str(e)), {})
        if not path.startswith(f"/apps/{fly.app}/"):
            return (*_error(404, "app not found"), {})
        fault = fly._take_fault(method, path)
        if fault and fault.kind == "slow":
            time.sleep(fault.delay_s)
        elif fault and fault.kind == "reset_before":
            return 0, None, {}
        elif fault and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return fault.status, fault.body or {"error": f"injected {fault.status}"}, headers
        status, body = self._act(entry["op"], path, query, entry["body"])
        if fault and fault.kind == "reset_after":
            return 0, None, {}
        return status, body, {}

    def _act(self, op: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        fly = self.server
        parts = path.split("/")  # ['', 'apps', app, 'machines', id?, action?]
        machine = fly.machines.get(parts[4]) if len(parts) > 4 else None
        q = {k: v[0] for k, v in query.items()}
        if op == "Machines_create":
            config = body.get("config") or {}
            if not config.get("image"):
                return _error(400, "invalid config.image: image is required")
            if body.get("name") and any(m.name == body["name"] for m in fly.live()):
                return _error(409, f"a machine named {body['name']!r} already exists")
            if body.get("region") in fly.no_capacity:
                return _error(422, "insufficient resources to create new machine with existing volume",
                              "insufficient_capacity")
            return 200, fly._create(body).view()
        if op == "Machines_list":
            found = [m.view() for m in fly.live() if not q.get("region") or m.region == q["region"]]
            return 200, found
        if machine is None:
            return _error(404, "machine not found")
        if op == "Machines_show":
            return 200, machine.view()
        if op == "Machines_wait":
            timeout_s = int(q.get("timeout", "60"))
            if not 1 <= timeout_s <= 60:
                return _error(400, "timeout must be between 1 and 60 seconds")
            state = q.get("state", "started")
            if fly._wait(machine, state, timeout_s):
                return 200, {"ok": True}
            return _error(408, f"deadline_exceeded: machine did not reach {state}")
        if op == "Machines_delete":
            if machine.state == "started" and q.get("force") != "true":
                return _error(412, "failed_precondition: machine still active, refusing to delete")
            fly._destroy(machine)
            return 200, {"ok": True}
        return _error(404, f"{op} is not implemented by the fake")


def agent_processes_alive(fly: FakeFly) -> list[str]:
    """Ids of machines, destroyed or not, whose agent process still runs."""
    everything = list(fly.machines.values()) + list(fly.destroyed.values())
    return [m.id for m in everything if m.proc is not None and m.proc.poll() is None]


AGENT_REQUEST = re.compile(r" INFO sandbox\.agent (GET|POST|PUT|DELETE) (\S+) (\d+)$")


def agent_requests(machine: FakeMachine) -> list[str]:
    """"METHOD /route status" of every request the machine's agent answered, in order (from its log)."""
    if not machine.log_path:
        return []
    with open(machine.log_path, errors="replace") as log:
        return [" ".join(m.groups()) for line in log if (m := AGENT_REQUEST.search(line.rstrip("\n")))]


def kill_agent(machine: FakeMachine) -> None:
    """SIGKILL a machine's agent, as if it crashed (auto_destroy then destroys the machine)."""
    if machine.proc is not None and machine.proc.poll() is None:
        os.killpg(machine.proc.pid, signal.SIGKILL)
