"""The agent's one job, over the same LocalRuntime the workers use: no HTTP here, only state.

One agent serves one job: create binds it to the job, the command runs at most once (in a thread
of its own, so it outlives a client that went away), and every answer comes from the runtime.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import IO, Any

from sandbox.agent.protocol import PROTOCOL
from sandbox.errors import SandboxError, SandboxFailure
from sandbox.runtimes.base import ExecResult, OutputFile, Runtime, SandboxHandle
from sandbox.spec import JobSpec

log = logging.getLogger("sandbox.agent")


class Conflict(SandboxError):
    """A request that does not fit the agent's state (answered 409 with `error` = the code)."""

    def __init__(self, code: str, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.result = result


class ExecRun:
    """The one run of the job's command: events for a live follower, then the result."""

    def __init__(self) -> None:
        # Unbounded, but the sink only ever sees what the capped log keeps (SANDBOX_MAX_LOG_BYTES
        # per stream), so this holds at most the two logs' caps; a follower that leaves drops it.
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.followed = True
        self.done = threading.Event()
        self.delivered = threading.Event()  # the follower got the end event, or left
        self.result: ExecResult | None = None
        self.want_events = False  # set by a follower that understands event lines (protocol 2)

    def sink(self, stream: str, data: bytes) -> None:
        """The runtime's OutputSink; never blocks, so the runtime's timer is never held up."""
        if self.followed:
            self.events.put(("data", (stream, data)))

    __call__ = sink  # the run is the runtime's sink: output by call, connection events by .event

    def event(self, entry: dict[str, Any]) -> None:
        """A live egress connection event (LogSink.event's shape); never blocks, as sink."""
        if self.followed and self.want_events:
            self.events.put(("event", entry))

    def detach(self) -> None:
        """The follower went away: stop queueing output and free what was queued."""
        self.followed = False
        self.delivered.set()
        while True:
            try:
                self.events.get_nowait()
            except queue.Empty:
                return

    def finish(self, result: ExecResult) -> None:
        self.result = result
        self.done.set()
        if self.followed:
            self.events.put(("end", result))
        else:
            self.delivered.set()


class Agent:
    """Create, files, one exec, logs, outputs, kill, destroy: for one job, on a LocalRuntime."""

    def __init__(self, runtime: Runtime, host: str, job_id: str = "") -> None:
        self.runtime = runtime
        self.host = host
        self.bound_job_id = job_id  # SANDBOX_AGENT_JOB_ID: the only job this machine may run
        self.lock = threading.Lock()
        self.spec: JobSpec | None = None
        self.handle: SandboxHandle | None = None
        self.run: ExecRun | None = None
        self.setup_run: ExecRun | None = None  # the job's setup command (prepare), at most once too
        self.destroyed = False
        self.stopping = ""  # why the agent is going away, when it is (a signal, an expiry)
        self.outputs: dict[str, OutputFile] = {}
        self.started_at = time.time()

    @property
    def state(self) -> str:
        """idle, created, running, finished or destroyed."""
        if self.destroyed:
            return "destroyed"
        if self.handle is None:
            return "idle"
        if self.run is None:
            return "created"
        return "finished" if self.run.done.is_set() else "running"

    def health(self) -> dict[str, Any]:
        return {"ok": True, "job_id": self.spec.id if self.spec else (self.bound_job_id or None),
                "state": self.state, "protocol": PROTOCOL, "setup": self.setup_run is not None}

    def create(self, spec: JobSpec) -> SandboxHandle:
        """Make the inner sandbox; the same job again gets the same handle, another job a Conflict."""
        with self.lock:
            if self.bound_job_id and spec.id != self.bound_job_id:
                raise Conflict("other_job", "this machine was made for another job")
            if self.spec is not None and spec.id != self.spec.id:
                raise Conflict("other_job", "this agent already serves another job")
            if self.destroyed:
                raise Conflict("destroyed", "the sandbox was destroyed")
            if self.handle is None:
                self.handle = self.runtime.create(spec, self.host)
                self.spec = spec
                self.runtime.prestart(self.handle, spec)  # its execute's bwrap, set up in the background
            return self.handle

    def _handle(self) -> SandboxHandle:
        if self.destroyed:
            raise Conflict("destroyed", "the sandbox was destroyed")
        if self.handle is None:
            raise Conflict("no_sandbox", "no sandbox yet: POST /sandbox first")
        return self.handle

    def put_file(self, relpath: str, src: IO[bytes], mode: int) -> int:
        handle = self._handle()
        if self.run is not None:
            raise Conflict("already_started", "files cannot change once the command has started")
        return self.runtime.put_file(handle, relpath, src, mode)

    def start(self, want_events: bool = False) -> ExecRun:
        """Start the command in a thread of its own; a second start (or one during the setup) is a Conflict."""
        with self.lock:
            handle = self._handle()
            if self.run is not None:
                result = self.run.result.to_dict() if self.run.result else None
                raise Conflict("already_started", "the command runs at most once per machine", result)
            if self.setup_run is not None and not self.setup_run.done.is_set():
                # LocalRuntime runs one command per sandbox at a time: started now, it would end `error`
                raise Conflict("setup_running", "the setup command is still running: the command starts after it")
            run = self.run = ExecRun()
            run.want_events = want_events
        assert self.spec is not None
        threading.Thread(target=self._execute, args=(handle, self.spec, run), name="exec", daemon=True).start()
        return run

    def start_setup(self, want_events: bool = False) -> ExecRun:
        """Start the job's setup command (LocalRuntime.setup: its own network policy), at most once."""
        with self.lock:
            handle = self._handle()
            if self.run is not None:
                raise Conflict("command_started", "setup runs before the command, never after")
            if self.setup_run is not None:
                result = self.setup_run.result.to_dict() if self.setup_run.result else None
                raise Conflict("already_started", "the setup runs at most once per machine", result)
            run = self.setup_run = ExecRun()
            run.want_events = want_events
        assert self.spec is not None
        threading.Thread(target=self._execute, args=(handle, self.spec, run, "setup"), name="setup",
                         daemon=True).start()
        return run

    def _execute(self, handle: SandboxHandle, spec: JobSpec, run: ExecRun, kind: str = "execute") -> None:
        try:
            step = self.runtime.setup if kind == "setup" else self.runtime.execute  # type: ignore[attr-defined]
            result = step(handle, spec, run)
        except Exception as e:  # noqa: BLE001 - the run must end with a result whatever happened
            log.exception("execute failed")
            result = ExecResult("error", None, None, 0.0, reason=f"agent: {type(e).__name__}: {e}"[:2000])
        if self.stopping and result.outcome == "cancelled":  # our own kill on the way out, not a cancel
            result.outcome, result.reason = "error", f"the machine stopped while the command ran: {self.stopping}"
        run.finish(result)

    def result(self, wait_s: float = 0.0) -> ExecResult | None:
        """The command's result, waiting up to `wait_s` for it; None if it has not ended (or started)."""
        run = self.run
        if run is None:
            return None
        run.done.wait(max(0.0, wait_s))
        return run.result

    def logs(self) -> dict[str, IO[bytes]]:
        return self.runtime.logs(self._handle())

    def collect(self, dirs: tuple[str, ...]) -> tuple[list[OutputFile], list[dict[str, Any]], int]:
        """The files under `dirs` (after the command ended), what was skipped and how many more were
        left out than that lists (the walk's `not_listed`); the files are remembered for open."""
        handle = self._handle()
        if self.state == "running":
            raise Conflict("running", "outputs are collected after the command has ended")
        collected = self.runtime.collect(handle, dirs)
        files = list(collected)
        with self.lock:
            self.outputs = {f.relpath: f for f in files}
        return files, list(getattr(collected, "skipped", [])), int(getattr(collected, "not_listed", 0))

    def open_output(self, relpath: str) -> IO[bytes]:
        """A file the last collect listed, opened without following links; others are not served."""
        self._handle()
        entry = self.outputs.get(relpath)
        if entry is None:
            raise Conflict("not_collected", "only files listed by GET /outputs can be read")
        return entry.open()

    def kill(self) -> None:
        if self.handle is not None and not self.destroyed:
            self.runtime.kill(self.handle)

    def shut_down(self, reason: str) -> None:
        """The agent is going away (signal, expiry): end the command as an error, destroy the sandbox."""
        self.stopping = reason
        self.destroy()
        for run in (self.setup_run, self.run):  # let a follower read how it ended before the process exits
            if run is not None:
                run.delivered.wait(2.0)

    def destroy(self, wait_s: float = 10.0) -> None:
        """Kill, let the exec thread record its ending, then remove the sandbox; idempotent."""
        with self.lock:
            handle, runs = self.handle, [r for r in (self.setup_run, self.run) if r is not None]
            if handle is None or self.destroyed:
                self.destroyed = self.destroyed or handle is not None
                return
        self.runtime.kill(handle)
        if not all(run.done.wait(wait_s) for run in runs):  # a setup still running is killed the same way
            raise SandboxFailure("the command did not end after its cgroup was killed")
        self.runtime.destroy(handle)
        with self.lock:
            self.destroyed = True
            self.outputs = {}
