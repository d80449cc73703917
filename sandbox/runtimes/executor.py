"""One run of a job's argv inside bubblewrap: spawn into the cgroup, stream capped output,
enforce the wall clock, and decide the outcome from the cgroup's counters."""
from __future__ import annotations

import os
import selectors
import subprocess
import time
from typing import TYPE_CHECKING, Any

from sandbox.errors import SandboxFailure
from sandbox.runtimes import bwrap, fsutil, seccomp
from sandbox.runtimes.base import ExecResult, OutputSink, SandboxHandle
from sandbox.runtimes.gate import Gate
from sandbox.spec import JobSpec

if TYPE_CHECKING:
    from sandbox.runtimes.local import LocalRuntime
    from sandbox.runtimes.prestart import Held

CHUNK = 64 * 1024  # fixed read size: worker memory stays flat whatever the job prints
DISCARD = 1 << 20  # past the cap, up to a full pipe (F_SETPIPE_SZ's default max) per splice
DISCARD_PAUSE_S = 0.001  # at most ~1000 splices a second per run: 64+ MB/s of dropped output


SH = "/bin/sh"
SETPRIV = "/usr/bin/setpriv"
# Writes its own pid into each cgroup.procs file given before "--" (so it, and everything it
# becomes, is in the job's cgroups), says so with one byte on the pipe it got as stdin and puts
# /dev/null there instead (the job must not inherit the pipe; stdin because dash redirects only fds
# 0-9, and it is the one fd we choose), then execs the rest. No job-controlled text is in this
# script: the files are ours and the command is passed as arguments, never interpolated.
# `ulimit` sets hard limits too, whatever the worker's own were. -c 0: no core dumps, which a pipe
# core_pattern (systemd-coredump, apport) would hand to a root helper on the host. -n: the file table
# (fs.file-max) is one per host and no cgroup limits it; 20000 per process let one job of 128
# processes hold half of this host's handles; SANDBOX_MAX_OPEN_FILES (1024) bounds it by pids.max.
_JOIN_THEN_EXEC = ('ulimit -c 0; ulimit -n "$1"; shift; '
                   'for f do [ "$f" = -- ] && break; echo $$ > "$f"; shift; done; shift; '
                   'echo >&0; exec 0</dev/null; exec "$@"')


def launcher(procs_files: list[str], uid: int, max_open_files: int) -> list[str]:
    """argv prefix: join the job's cgroups as root, write a byte to stdin (the write end of a pipe)
    and replace it with /dev/null, drop to `uid` for good (setpriv), then exec bwrap.

    A chain of execs rather than a preexec_fn so that subprocess can vfork: forking a ~100 MB
    worker process to run a Python hook cost 15-30 ms per job, spawning this costs about 1 ms.
    """
    return [SH, "-ec", _JOIN_THEN_EXEC, "sandbox-launch", str(int(max_open_files)),
            *procs_files, "--", SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--nnp", "--"]


def _event(kind: str, detail: str) -> dict[str, Any]:
    return {"type": kind, "detail": detail, "at": time.time()}


class _Capture:
    """One output stream: a capped log file outside the workspace, plus the caller's sink."""

    def __init__(self, name: str, path: str, cap: int, sink: OutputSink) -> None:
        self.name, self.cap, self.sink = name, cap, sink
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.kept = 0
        self.seen = 0
        self.sink_failed = False

    def feed(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        room = self.cap - self.kept
        if room <= 0:
            return  # keep draining the pipe so the job does not block, but store nothing more
        part = chunk[:room]
        os.write(self.fd, part)
        self.kept += len(part)
        if not self.sink_failed:
            try:
                self.sink(self.name, part)
            except Exception:  # noqa: BLE001 - a broken log feed must not break the job's run
                self.sink_failed = True

    @property
    def full(self) -> bool:
        """Over its cap: what the job writes now is only counted, never copied into the worker."""
        return self.kept >= self.cap

    def discard(self, fd: int, devnull: int) -> bool:
        """Move what the pipe holds into /dev/null in the kernel; False at EOF.

        Reading and dropping it cost the worker a core against a job writing with vmsplice (its
        pages cost the job nothing): splice moves page references, no copy into Python."""
        try:
            n = os.splice(fd, devnull, DISCARD, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return True
        self.seen += n
        return n > 0

    @property
    def truncated(self) -> bool:
        return self.seen > self.kept

    def close(self) -> None:
        if self.truncated:
            marker = f"\n[sandbox: {self.name} truncated: kept {self.kept} of {self.seen} bytes]\n".encode()
            os.write(self.fd, marker)
            if not self.sink_failed:
                try:
                    self.sink(self.name, marker)
                except Exception:  # noqa: BLE001
                    pass
        os.close(self.fd)


def run_job(rt: "LocalRuntime", d: str, meta: dict, handle: SandboxHandle, spec: JobSpec,
            sink: OutputSink, log_prefix: str = "", held: "Held | None" = None) -> ExecResult:
    """Run spec.argv in the sandbox at `d` and return how it ended.

    `held`: the sandbox pre-started for this run at create (prestart.py), released here instead
    of spawning one; it is disposed of whenever it is not the one that runs.
    """
    sid = handle.sandbox_id
    if os.path.exists(os.path.join(d, "cancelled")):
        if held is not None:
            held.dispose(lambda: rt.cgroups.kill(sid))
        return ExecResult("cancelled", None, None, 0.0, reason="cancelled before it started")
    if held is not None and not held.usable(spec):
        held.dispose(lambda: rt.cgroups.kill(sid))
        held = None
    captures = {s: _Capture(s, os.path.join(d, log_prefix + s), rt.settings.max_log_bytes, sink)
                for s in ("stdout", "stderr")}
    egress, egress_error = None, ""
    if held is not None:
        start = time.monotonic()  # the job's clock, its timeout included, starts at the go-ahead
        proc = held.proc
        held.release()
    else:
        try:
            start, proc, egress, egress_error = _spawn(rt, d, meta, sid, spec, sink)
        except BaseException:
            for c in captures.values():
                c.close()  # a failed spawn must not leak the log files: the error goes to the stage
            raise
    if os.path.exists(os.path.join(d, "cancelled")):  # kill() raced our spawn
        rt.cgroups.kill(sid)
    try:
        timed_out = _pump(rt, sid, proc, captures, start + spec.timeout_s)
        returncode = proc.wait()
    finally:
        network = egress.close() if egress else None  # every flow ends with the stage
    duration = time.monotonic() - start
    rt.cgroups.kill(sid)  # nothing may outlive the run (bwrap's pid namespace should already see to it)
    for c in captures.values():
        c.close()
    result = _result(rt, d, meta, sid, returncode, duration, timed_out, captures)
    result.network = network
    if network and network["totals"].get("refused"):
        result.security_events.append(_event("egress_refused", f"{network['totals']['refused']} connection(s) "
                                             "refused by the egress policy; reasons in network.connections"))
    if egress_error:
        result.outcome, result.reason, result.exit_code, result.signal = "error", egress_error, None, None
    return result


def _spawn(rt: "LocalRuntime", d: str, meta: dict, sid: str, spec: JobSpec,
           sink: OutputSink) -> tuple[float, subprocess.Popen, Any, str]:
    """Spawn the run now (nothing was held for it): its start time, process, egress proxy, error.

    Every spawn is held on its gate until it is safe to let go (Gate.wait_ready); an outbound job
    also waits while its proxy is bound inside bwrap's child's network namespace. On any failure
    the gate stays shut and the sandbox is killed: the run ends `error`, saying why.
    """
    start = time.monotonic()
    proc, gate = spawn_gated(rt, d, meta, sid, spec)
    try:
        child_pid = gate.wait_ready()
    except SandboxFailure as e:
        return start, _fail_closed(rt, sid, proc, gate), None, f"the sandbox did not start: {e}"
    except BaseException:
        gate.shut()
        _abandon(rt, sid, proc)
        raise
    egress = None
    if spec.network.outbound:
        try:
            egress = rt.egress.open(spec.id, rt.egress.policy_for(spec), child_pid, getattr(sink, "event", None))
        except Exception as e:  # noqa: BLE001 - the job must not run without its proxy; say why
            return start, _fail_closed(rt, sid, proc, gate), None, f"the egress proxy could not start: {e}"
        except BaseException:
            gate.shut()
            _abandon(rt, sid, proc)
            raise
    gate.release()
    return start, proc, egress, ""


def _fail_closed(rt: "LocalRuntime", sid: str, proc: subprocess.Popen, gate: Gate) -> subprocess.Popen:
    """The command must not start: the gate stays shut (no byte; bwrap never sees EOF on it), the
    cgroup kill ends what joined it and the launcher is killed too (one that never joined is out of
    the kill's reach). The pump then drains what bwrap said on its way out. Were the cgroup kill to
    fail, the sandbox is abandoned and the error raised; bwrap's child stays blocked."""
    gate.shut()
    try:
        rt.cgroups.kill(sid)
    except BaseException:
        _abandon(rt, sid, proc)
        raise
    proc.kill()
    return proc


def _abandon(rt: "LocalRuntime", sid: str, proc: subprocess.Popen) -> None:
    """A run given up before its command may start: kill what was spawned and reap it (best effort;
    destroy, or the orphan sweep, kills the cgroup again)."""
    try:
        rt.cgroups.kill(sid)
    except Exception:  # noqa: BLE001 - the error on its way out is the one to report
        pass
    proc.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def spawn_gated(rt: "LocalRuntime", d: str, meta: dict, sid: str, spec: JobSpec) -> tuple[subprocess.Popen, Gate]:
    """Spawn `spec`'s sandbox held on a shut gate: its process and the gate, the caller's to
    `wait_ready` and then `release` or `shut` (execute, the egress path and the pre-start alike)."""
    gate = Gate()
    try:
        proc, gate.joined_r = spawn_sandbox(rt, d, meta, sid, spec, gate)
    except BaseException:
        gate.shut()  # closes our ends too: nothing leaks when the spawn itself failed
        raise
    return proc, gate


def spawn_sandbox(rt: "LocalRuntime", d: str, meta: dict, sid: str, spec: JobSpec,
                  gate: Gate) -> tuple[subprocess.Popen, int]:
    """Start the launcher + bwrap for `spec` in sandbox `d`, held on `gate`: its process, and the
    read end of the launcher's "joined its cgroups" pipe (the caller's to wait on and close).

    The one place a job's sandbox is spawned: what every job runs under is built here, and the
    gate is not optional. bwrap's ends of the gate are closed here whatever happens, so once this
    returns only the sandbox holds them (its exit shows as EOF on our --info-fd end).
    """
    owned = list(gate.child_fds())  # closed on every path: ours to close, and the child has its copies
    joined_r = -1
    try:
        seccomp_fd = seccomp.filter_fd()
        owned.append(seccomp_fd)
        joined_r, joined_w = os.pipe2(os.O_CLOEXEC)
        owned.append(joined_w)  # only the launcher holds it once started: its exit shows as EOF
        argv = (launcher(rt.cgroups.procs_files(sid), rt.host_uid(meta), rt.settings.max_open_files)
                + bwrap.job_argv(d, meta, spec, seccomp_fd, gate.bwrap_args()))
        # stdin is the launcher's "joined" pipe; the job itself gets /dev/null (see _JOIN_THEN_EXEC)
        proc = subprocess.Popen(argv, env={}, cwd="/", stdin=joined_w, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, close_fds=True, pass_fds=(seccomp_fd, *gate.child_fds()))
    except BaseException:
        if joined_r >= 0:
            os.close(joined_r)
        raise
    finally:
        for fd in owned:
            os.close(fd)
    return proc, joined_r


def _pump(rt: "LocalRuntime", sid: str, proc: subprocess.Popen, captures: dict[str, _Capture],
          deadline: float) -> bool:
    """Copy output until both pipes close; kill the cgroup at the deadline. True if it timed out."""
    # poll(2), not epoll: for two pipes, epoll's create, add, remove and close cost six syscalls a
    # run (each a GIL hand-off under the threads pool) that poll's in-memory registrations do not
    sel = selectors.PollSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, captures["stdout"])
    sel.register(proc.stderr, selectors.EVENT_READ, captures["stderr"])
    timed_out = False
    devnull = -1  # opened only for a job past its log cap: two syscalls less for every other run
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not timed_out:
                timed_out = True
                rt.cgroups.kill(sid)  # every writer dies, so the pipes reach EOF
                continue
            only_discarded = True
            for key, _ in sel.select(timeout=max(0.0, min(remaining, 0.5)) if not timed_out else 0.5):
                if key.data.full:
                    if devnull < 0:
                        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                    if not key.data.discard(key.fd, devnull):
                        sel.unregister(key.fileobj)
                    continue
                only_discarded = False
                chunk = os.read(key.fd, CHUNK)
                if chunk:
                    key.data.feed(chunk)
                else:
                    sel.unregister(key.fileobj)
            if only_discarded and sel.get_map():
                # Output nobody keeps: pace it (the job waits on its full pipe meanwhile) so that a
                # writer spinning on vmsplice cannot turn this loop into a core of syscalls.
                time.sleep(DISCARD_PAUSE_S)
            if proc.poll() is not None and sel.get_map():
                rt.cgroups.kill(sid)  # bwrap is gone; a stray holder of the pipe must not keep us here
    finally:
        sel.close()
        if devnull >= 0:
            os.close(devnull)
        proc.stdout.close()
        proc.stderr.close()
    return timed_out


def _result(rt: "LocalRuntime", d: str, meta: dict, sid: str, returncode: int, duration: float,
            timed_out: bool, captures: dict[str, _Capture]) -> ExecResult:
    usage = rt.cgroups.usage(sid)
    mnt = os.path.join(d, "mnt")
    events: list[dict[str, Any]] = []
    oom_kills = int(usage.pop("oom_kills") or 0)
    pids_hits = int(usage.pop("pids_max_hits") or 0)
    disk = fsutil.disk_usage(mnt)  # one statvfs for the three figures
    usage["bytes_written"] = max(0, disk.used_bytes - int(meta.get("disk_baseline_bytes", 0)))
    # Cancelled only if the kill is what ended it: a command that exited on its own before the
    # kill landed is recorded as it ended (bwrap dies of the signal, or relays it as 128+n).
    killed = returncode < 0 or returncode > 128
    cancelled = (killed or timed_out) and os.path.exists(os.path.join(d, "cancelled"))  # (no stat for an exit)
    if timed_out:
        events.append(_event("timeout", f"wall clock limit reached after {duration:.1f}s; killed the cgroup"))
    if oom_kills:
        events.append(_event("oom", f"memory limit reached: the kernel killed {oom_kills} process(es)"))
    if pids_hits:
        events.append(_event("pids_limit", f"process limit reached {pids_hits} time(s): fork refused"))
    disk_bytes = int(meta.get("disk_bytes", 0))
    # ext4 holds back min(2%, 16 MiB) for delayed allocation, so "full" means within that reserve
    if disk.free_bytes < min(disk_bytes // 50, 16 << 20) + (256 << 10):
        events.append(_event("disk_full", f"workspace disk full (limit {disk_bytes} bytes)"))
    elif disk.free_inodes == 0:  # ENOSPC from many small files, with bytes to spare
        events.append(_event("disk_full", f"workspace disk out of inodes (limit {disk_bytes} bytes)"))
    for c in captures.values():
        if c.truncated:
            events.append(_event("output_truncated", f"{c.name}: kept {c.kept} of {c.seen} bytes"))
    exit_code: int | None = returncode if returncode >= 0 else None
    sig: int | None = -returncode if returncode < 0 else None
    if cancelled:
        outcome, reason = "cancelled", "cancelled by request"
    elif timed_out:
        outcome, reason = "timed_out", "wall clock timeout"
    elif oom_kills:
        outcome, reason = "oom_killed", "memory limit exceeded"
        if exit_code is not None and exit_code > 128:  # bwrap relays a signal death as 128+n
            exit_code, sig = None, exit_code - 128
    elif returncode == 0:
        outcome, reason = "succeeded", ""
    else:
        outcome, reason = "failed", f"exited with status {returncode}" if sig is None else f"killed by signal {sig}"
    return ExecResult(
        outcome=outcome, exit_code=exit_code, signal=sig, duration_s=duration,
        stdout_bytes=captures["stdout"].seen, stderr_bytes=captures["stderr"].seen,
        stdout_truncated=captures["stdout"].truncated, stderr_truncated=captures["stderr"].truncated,
        resources_used=usage, security_events=events, reason=reason,
    )
