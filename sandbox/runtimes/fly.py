"""FlyRuntime: every job in a fresh Fly Machine, driven over the Machines API, run by the agent inside.

The API is used for lifecycle only (look up, create, wait, destroy, list). Files, the command with
its live output, outputs and kill go to the agent (sandbox/agent) at the machine's private address,
authenticated by a per-machine token: HMAC-SHA256(SANDBOX_FLY_AGENT_SECRET, app/machine-name). Any
worker can derive it, so no token is stored anywhere (not in the record, not in Redis, not in the
machine, whose env holds its sha256); it travels only in the Authorization header of agent calls.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any, Iterator

from config.settings import Settings
from sandbox.agent.protocol import machine_env
from sandbox.errors import AgentConflict, SandboxError, SandboxFailure, TransientError
from sandbox.runtimes.base import ExecResult, OutputFile, OutputSink, SandboxHandle, SandboxInfo
from sandbox.runtimes.flyapi import FlyAPIError, MachinesAPI
from sandbox.spec import JobSpec

log = logging.getLogger("sandbox.fly")

SERVICE = "job-sandbox"  # metadata `sandbox_service`: the sweeps never touch a machine without it
EXPIRY_MARGIN_S = 900.0  # create + prepare + collect + cleanup around the job's own timeout
BACKSTOP_MARGIN_S = 30.0  # the agent enforces the timeout; the worker kills this long after it
AGENT_OVERHEAD_MIB = 256  # the VM's kernel, the agent and the job's sandbox setup beside the job
HEALTH_INTERVAL_S = 0.2
COLLECT_KILL_WAIT_S = 30.0
AGENT_TIMEOUT_S = (3.0, 30.0)  # the agent sends a keepalive every ~5 s while a command is silent
_NAME_SAFE = re.compile(r"[^a-z0-9-]+")
GUEST_CPUS = (1, 2, 4, 8, 16)
MIB = 1 << 20


def machine_name(job_id: str) -> str:
    """The job's machine name: deterministic (create looks it up), DNS-safe, unique per job id."""
    slug = _NAME_SAFE.sub("-", job_id.lower()).strip("-")[:30] or "job"
    return f"sbx-{slug}-{hashlib.sha256(job_id.encode()).hexdigest()[:12]}"


def agent_token(secret: str, app: str, name: str) -> str:
    """The per-machine agent token; any worker with the secret derives it, nothing stores it."""
    return hmac.new(secret.encode(), f"agent-token:{app}/{name}".encode(), hashlib.sha256).hexdigest()


def guest_for(cpu: float, memory_bytes: int, cpu_kind: str) -> tuple[dict[str, Any], str]:
    """Fly's guest size for a job's limits, and a sentence saying how it was rounded.

    Fly's sizes: whole CPUs (1, 2, 4, 8, 16); memory in 256 MiB steps, at most 2 GiB per shared
    CPU (8 GiB per performance CPU), at least 2 GiB per performance CPU. The VM gets the job's
    memory plus AGENT_OVERHEAD_MIB; the job itself stays limited to its own memory by its cgroup.
    """
    wanted_mib = math.ceil(memory_bytes / MIB) + AGENT_OVERHEAD_MIB
    memory_mib = math.ceil(wanted_mib / 256) * 256
    per_cpu_max, per_cpu_min = (2048, 256) if cpu_kind == "shared" else (8192, 2048)
    need = max(math.ceil(cpu), math.ceil(memory_mib / per_cpu_max), 1)
    cpus = next((n for n in GUEST_CPUS if n >= need), GUEST_CPUS[-1])
    memory_mib = max(memory_mib, per_cpu_min * cpus)
    note = (f"Fly guest {cpus}x{cpu_kind} CPU, {memory_mib} MiB: the job's {cpu:g} CPU rounded up to whole CPUs "
            f"and its {math.ceil(memory_bytes / MIB)} MiB plus {AGENT_OVERHEAD_MIB} MiB for the agent rounded up to "
            f"Fly's sizes; the job itself stays limited to {cpu:g} CPU and {math.ceil(memory_bytes / MIB)} MiB")
    return {"cpu_kind": cpu_kind, "cpus": cpus, "memory_mb": memory_mib}, note


def _agent_client(base_url: str, token: str) -> Any:
    from sandbox.agent.client import AgentClient  # the agent package also runs alone in the VM

    return AgentClient(base_url, token, timeout=AGENT_TIMEOUT_S)


class FlyRuntime:
    """The Runtime protocol over Fly Machines; any worker may drive any job's machine."""

    name = "fly"
    pinned = False

    def __init__(self, settings: Settings, api: MachinesAPI | None = None) -> None:
        self.settings = settings
        self.api = api or MachinesAPI(settings.fly_api_url, settings.fly_api_token, settings.fly_app,
                                      retry_budget_s=settings.fly_retry_budget_s)

    # -- create ----------------------------------------------------------------------------------
    def create(self, spec: JobSpec, host: str) -> SandboxHandle:
        """Find or make the job's machine, wait until it is started and its agent answers."""
        name = machine_name(spec.id)
        guest, sizing = guest_for(spec.resources.cpu, spec.resources.memory_bytes, self.settings.fly_cpu_kind)
        now = time.time()
        expires_at = now + spec.timeout_s + EXPIRY_MARGIN_S
        machine = self._find(name) or self._launch(spec, name, guest, now, expires_at)
        handle = SandboxHandle(
            sandbox_id=machine["id"], job_id=spec.id, runtime=self.name, host=host, created_at=now,
            expires_at=expires_at,
            data={"machine_name": name, "region": machine.get("region", ""), "private_ip": machine.get("private_ip", ""),
                  "guest": guest, "sizing": sizing})
        deadline = now + self.settings.fly_start_timeout_s
        try:
            self._wait_started(machine["id"], deadline)
            self._healthy(handle, deadline)
            self._agent(handle).create(spec)
        except TransientError:
            raise  # the stage's retry finds this machine by its name and carries on with it
        except Exception:
            self._destroy_quietly(machine["id"])
            raise
        return handle

    def _find(self, name: str) -> dict[str, Any] | None:
        for machine in self.api.list():
            if machine.get("name") == name and machine.get("state") not in ("destroying", "destroyed"):
                return machine
        return None

    def _launch(self, spec: JobSpec, name: str, guest: dict[str, Any], now: float, expires_at: float) -> dict[str, Any]:
        reasons = []
        for region in self.settings.fly_regions:
            body = {"name": name, "region": region, "config": self._config(spec, name, guest, now, expires_at)}
            try:
                return self.api.create(body)
            except FlyAPIError as e:
                if e.status == 409:  # the name is taken: a concurrent create of the same job won
                    found = self._find(name)
                    if found:
                        return found
                if not e.capacity:
                    raise
                reasons.append(f"{region}: {e}")
                log.warning("no capacity for job %s in %s; trying the next region", spec.id, region)
            except TransientError:
                # The answer was lost or Fly failed: the machine may exist. Look before any retry.
                found = self._find(name)
                if found:
                    return found
                raise
        raise SandboxFailure("no Fly region had capacity for the machine: " + "; ".join(reasons))

    def _config(self, spec: JobSpec, name: str, guest: dict[str, Any], now: float, expires_at: float) -> dict[str, Any]:
        s = self.settings
        # The operator's limits and caps, the one job id, and only the token's digest: Fly shows
        # config.env to anyone holding an API token, and a digest checks a token, it cannot be one.
        env = machine_env(s, agent_token(s.fly_agent_secret, s.fly_app, name), spec.id,
                          listen=f"fly-local-6pn:{s.fly_agent_port}")
        config: dict[str, Any] = {
            "image": s.fly_image, "guest": guest, "auto_destroy": True, "restart": {"policy": "no"}, "env": env,
            "metadata": {"sandbox_service": SERVICE, "sandbox_job": spec.id, "sandbox_created_at": f"{now:.3f}",
                         "sandbox_expires_at": f"{expires_at:.3f}"},
        }
        disk_gb = math.ceil(spec.resources.disk_bytes / (1 << 30)) + 2  # the workspace image plus the rootfs
        if disk_gb > 8:  # Fly's default root filesystem is about 8 GB
            config["rootfs"] = {"size_gb": disk_gb}
        return config

    def _wait_started(self, machine_id: str, deadline: float) -> None:
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise SandboxFailure(f"machine {machine_id} did not start within "
                                     f"{self.settings.fly_start_timeout_s:g} s (SANDBOX_FLY_START_TIMEOUT); destroyed")
            if self.api.wait_started(machine_id, math.ceil(remaining)):
                return

    def _agent(self, handle: SandboxHandle) -> Any:
        ip = handle.data.get("private_ip") or ""
        host = f"[{ip}]" if ":" in ip else ip
        token = agent_token(self.settings.fly_agent_secret, self.settings.fly_app, handle.data["machine_name"])
        return _agent_client(f"http://{host}:{self.settings.fly_agent_port}", token)

    def _healthy(self, handle: SandboxHandle, deadline: float) -> None:
        client, last = self._agent(handle), ""
        while time.time() < deadline:
            try:
                client.health()
                return
            except TransientError as e:  # not listening yet; a refused token is no reason to wait
                last = f"{type(e).__name__}: {e}"
                time.sleep(HEALTH_INTERVAL_S)
        raise SandboxFailure(f"the agent of machine {handle.sandbox_id} did not answer: {last[:300]}")

    # -- the stages ------------------------------------------------------------------------------
    def put_file(self, handle: SandboxHandle, relpath: str, src: IO[bytes], mode: int) -> int:
        """Stream one input file to the agent, which writes it as LocalRuntime.put_file does."""
        with self._unless_gone(handle):
            return self._agent(handle).put_file(relpath, src, mode)

    def setup(self, handle: SandboxHandle, spec: JobSpec, sink: OutputSink) -> ExecResult:
        """Run the job's setup command through the agent, which runs LocalRuntime.setup."""
        with self._unless_gone(handle):
            return self._agent(handle).setup(sink)

    def execute(self, handle: SandboxHandle, spec: JobSpec, sink: OutputSink) -> ExecResult:
        """Run the command through the agent; past the job's timeout the worker kills, then destroys."""
        agent = self._agent(handle)
        ended = threading.Event()

        def backstop() -> None:
            if ended.wait(spec.timeout_s + BACKSTOP_MARGIN_S):
                return
            log.warning("job %s outlived its timeout on machine %s: killing it", spec.id, handle.sandbox_id)
            try:
                agent.kill()
            except Exception:  # noqa: BLE001 - the agent is gone or stuck: the machine goes instead
                self._destroy_quietly(handle.sandbox_id)

        threading.Thread(target=backstop, name=f"fly-backstop-{spec.id}", daemon=True).start()
        started = time.monotonic()
        deadline = started + spec.timeout_s + 2 * BACKSTOP_MARGIN_S
        try:
            return agent.execute(sink, max_wait_s=spec.timeout_s + 2 * BACKSTOP_MARGIN_S)
        except TransientError as e:
            # The stream broke; the command goes on in the machine and the agent keeps its outcome.
            try:
                return agent.wait_result(max(1.0, deadline - time.monotonic()))
            except SandboxError as again:
                return ExecResult("error", None, None, time.monotonic() - started,
                                  reason=f"the agent of machine {handle.sandbox_id} stopped answering while the "
                                         f"command ran ({e}; then {again})")
        finally:
            ended.set()

    def logs(self, handle: SandboxHandle) -> dict[str, IO[bytes]]:
        """The captured, capped stdout and stderr, streamed from the agent."""
        agent = self._agent(handle)
        with self._unless_gone(handle):
            # the logs are read lazily: find out now whether the machine is still there (and ran a setup)
            return agent.logs(setup=agent.health().get("setup") is True)

    def collect(self, handle: SandboxHandle, dirs: tuple[str, ...]) -> Iterator[OutputFile]:
        """The agent's output files (each opened as a stream), after killing anything left, as locally."""
        agent = self._agent(handle)
        with self._unless_gone(handle):
            try:
                return agent.outputs(dirs)  # one request: the agent itself refuses while the command runs
            except AgentConflict as e:
                if e.reason != "running":
                    raise
            # its worker was lost and the command ran on alone: end it as locally, then list
            agent.kill()
            agent.wait_result(COLLECT_KILL_WAIT_S)
            return agent.outputs(dirs)

    @contextmanager
    def _unless_gone(self, handle: SandboxHandle) -> Iterator[None]:
        """An unreachable agent is retried (transient) unless its machine is gone: then it never comes back."""
        try:
            yield
        except TransientError as e:
            machine = self.api.get(handle.sandbox_id)
            state = machine.get("state") if machine else "destroyed"
            if state in ("destroying", "destroyed", "stopping", "stopped", "failed"):
                raise SandboxFailure(f"machine {handle.sandbox_id} is {state}: its agent and workspace are gone "
                                     f"({str(e)[:200]})") from e
            raise

    def kill(self, handle: SandboxHandle) -> None:
        """Kill the command through the agent; if the agent does not answer, destroy the machine."""
        try:
            self._agent(handle).kill()
        except Exception as e:  # noqa: BLE001
            log.warning("agent of machine %s did not take the kill (%s); destroying the machine",
                        handle.sandbox_id, type(e).__name__)
            self.api.destroy(handle.sandbox_id)

    def destroy(self, handle: SandboxHandle) -> None:
        """The agent tears its sandbox down (best effort), then the machine goes; 404 = already gone."""
        if handle.data.get("private_ip"):
            try:
                self._agent(handle).destroy()
            except Exception:  # noqa: BLE001 - the machine's own destroy below is what counts
                pass
        self.api.destroy(handle.sandbox_id)

    def _destroy_quietly(self, machine_id: str) -> None:
        try:
            self.api.destroy(machine_id)
        except Exception:  # noqa: BLE001 - the orphan sweep finds it by its metadata
            log.exception("could not destroy machine %s; the orphan sweep will", machine_id)

    # -- sweeps ----------------------------------------------------------------------------------
    def list_sandboxes(self) -> list[SandboxInfo]:
        """Machines carrying this service's metadata; any other machine of the app is invisible here."""
        found = []
        for machine in self.api.list():
            meta = (machine.get("config") or {}).get("metadata") or {}
            if meta.get("sandbox_service") != SERVICE or not meta.get("sandbox_job"):
                continue
            created = _float(meta.get("sandbox_created_at")) or _iso(machine.get("created_at")) or 0.0
            found.append(SandboxInfo(sandbox_id=machine["id"], job_id=meta["sandbox_job"], host="",
                                     created_at=created, expires_at=_float(meta.get("sandbox_expires_at")) or created))
        return found

    def reap_incomplete(self, older_than: float) -> list[str]:
        """Nothing to do: a half-created machine already carries its metadata, so list_sandboxes sees it."""
        return []


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _iso(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
