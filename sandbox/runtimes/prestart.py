"""Pre-started sandboxes: the execute's bwrap spawned at create and held on --block-fd.

bwrap reads its --block-fd after every namespace, mount, pivot_root and privilege drop, just
before seccomp and exec. So create spawns the job's sandbox (the same argv execute would build)
and leaves it blocked; execute only writes the go-ahead. The set-up runs on another core during
the create -> prepare -> execute hops instead of on execute's critical path.

Nothing depends on a held sandbox for correctness: an execute that finds none (another process,
a restarted worker, a held one that died) kills whatever is left in the cgroup and spawns as
before. The registry lives in one process and in memory only.
"""
from __future__ import annotations

import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from sandbox.errors import SandboxFailure
from sandbox.runtimes import executor
from sandbox.runtimes.gate import Gate
from sandbox.spec import JobSpec

if TYPE_CHECKING:
    from sandbox.runtimes.local import LocalRuntime

READY_WAIT_S = 5.0  # joined and --info-fd written within a few ms; past this it is treated as dead


def eligible(spec: JobSpec) -> bool:
    """Whether the job's execute may be pre-started at create.

    Not with a setup command: prepare runs it in the same cgroup and kills the cgroup after it,
    which would take the held sandbox too. Not with outbound network: the egress proxy is bound
    inside bwrap's network namespace at execute, while that spawn is held on its gate.
    """
    return spec.setup is None and not spec.network.outbound


@dataclass
class Held:
    """One held sandbox: the launcher's process, its output pipes and the gate it is held on."""

    proc: subprocess.Popen
    gate: Gate  # its byte lets bwrap go on to seccomp and exec the command
    spec: JobSpec  # what it was built from: execute runs it only for the same spec
    ready: bool | None = None

    def wait_ready(self) -> bool:
        """True once the go-ahead is safe (Gate.wait_ready): in the job's cgroups, where a cgroup
        kill reaches it, and bwrap bound to its parent's life. Read at execute, when it is long
        since in the pipes, rather than making the one pre-start thread wait for it."""
        if self.ready is None:
            try:
                self.gate.wait_ready(READY_WAIT_S)
                self.ready = True
            except SandboxFailure:
                self.ready = False
        return self.ready

    def usable(self, spec: JobSpec) -> bool:
        """Ready, still alive, and built from this very spec."""
        return self.spec == spec and self.wait_ready() and self.proc.poll() is None

    def release(self) -> None:
        """Let the command start; our ends close (if bwrap already died, the pump sees its exit)."""
        self.gate.release()

    def dispose(self, kill_cgroup: Callable[[], None] | None) -> None:
        """Kill it (everything in the cgroup, then the launcher itself), reap it, close every fd.

        Without `kill_cgroup` only for one already dead: the cgroup may by then hold another
        process's run of the job (an execute elsewhere that found nothing held).
        """
        # bwrap's child blocks in its own pid namespace with no parent-death signal yet, so the
        # launcher's death alone would not end it: the cgroup kill does. A launcher that never
        # joined has not exec'd bwrap, so it is the only process there is.
        try:
            self.wait_ready()
            if kill_cgroup is not None:
                kill_cgroup()
        finally:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()
            self.gate.shut()


def spawn(rt: "LocalRuntime", d: str, meta: dict, sid: str, spec: JobSpec) -> Held:
    """Start the launcher + bwrap for `spec` in sandbox `d`, blocked before the command.

    The same gated spawn as execute's own (executor.spawn_gated): only execute's byte opens the
    gate, so a worker dying before execute never lets the command run."""
    proc, gate = executor.spawn_gated(rt, d, meta, sid, spec)
    return Held(proc, gate, spec)


class Prestarts:
    """The held sandboxes of one runtime instance, by sandbox id; thread-safe.

    Spawned from one long-lived thread: bwrap's --die-with-parent fires when the *thread* that
    spawned it ends, and a per-request thread (the Fly agent's HTTP server) ends right after create.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Future[Held]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def start(self, sid: str, build: Callable[[], Held]) -> None:
        """Spawn `build()` in the background for `sid`, after reaping held sandboxes that died."""
        self._sweep()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="sandbox-prestart")
            if sid not in self._held:
                self._held[sid] = self._pool.submit(build)

    def take(self, sid: str) -> Held | None:
        """The held sandbox of `sid`, now this caller's to release or dispose; None if there is none."""
        with self._lock:
            fut = self._held.pop(sid, None)
        if fut is None or fut.cancel():
            return None
        try:
            return fut.result(timeout=30)
        except TimeoutError:  # a spawn stuck this long is given up; reaped whenever it ends
            fut.add_done_callback(lambda f: f.exception() is None and f.result().dispose(None))
            return None
        except Exception:  # noqa: BLE001 - a failed pre-start only means execute spawns as before
            return None

    def discard(self, sid: str, kill_cgroup: Callable[[str], None]) -> None:
        """Kill and reap the held sandbox of `sid`, if any (destroy, a cancel, a failed stage)."""
        held = self.take(sid)
        if held is not None:
            held.dispose(lambda: kill_cgroup(sid))

    def held_ids(self) -> list[str]:
        """Sandbox ids with a held (or still spawning) sandbox in this process."""
        with self._lock:
            return list(self._held)

    def _sweep(self) -> None:
        """Reap held sandboxes that died meanwhile: a cancel, a destroy or an execute elsewhere
        killed their cgroup. Never kills: a live one may still be released here."""
        with self._lock:
            done = [sid for sid, fut in self._held.items() if fut.done()]
        for sid in done:
            with self._lock:
                fut = self._held.get(sid)
                dead = fut is not None and (fut.exception() is not None or fut.result().proc.poll() is not None)
                if dead:
                    del self._held[sid]
            if dead and fut is not None and fut.exception() is None:
                fut.result().dispose(None)
