"""The one spawn path (executor.spawn_sandbox) and its --block-fd gate, against the real bwrap + cgroups:
a worker that dies while the gate is shut never lets the command run, and a spawn that fails leaks
no descriptor, whichever caller (execute, the egress gate, the pre-start) it failed for."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from sandbox.errors import SandboxFailure
from sandbox.runtimes import bwrap, executor, gate, prestart, seccomp
from sandbox.runtimes.base import SandboxHandle
from sandbox.runtimes.gate import Gate
from sandbox.runtimes.local import LocalRuntime
from sandbox.spec import NetworkPolicy, SetupSpec
from tests.conftest import wait_for
from tests.integration.test_local_runtime import REPO, make_spec
from tests.integration.test_prestart import _settle_spares, _ws, _zombies

OUTBOUND = NetworkPolicy(outbound=True, allowed_hosts=("api.test",))

# A worker process that creates the sandbox and executes it, and is SIGKILLed while it would bind the
# egress proxy: after bwrap gave its child's pid on --info-fd, before the go-ahead on --block-fd.
_DIE_IN_THE_GATE = (
    "import json,os,sys\nfrom config.settings import load_settings\n"
    "from sandbox.runtimes.local import LocalRuntime\nfrom sandbox.spec import JobSpec\n"
    "rt = LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[2]}))\n"
    "s = JobSpec.from_dict(json.loads(sys.argv[1])); h = rt.create(s, 'h')\n"
    "def die(job_id, policy, pid, on_entry):\n"
    "    print(json.dumps({'handle': h.to_dict(), 'child_pid': pid}), flush=True)\n"
    "    os.kill(os.getpid(), 9)\n"
    "rt.egress.open = die\n"
    "rt.execute(h, s, lambda stream, chunk: None)\n")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_worker_dying_while_the_egress_gate_is_shut_never_lets_the_command_run(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Given an outbound job whose worker was SIGKILLed after the spawn, before the go-ahead,
    spec = replace(make_spec(["/bin/sh", "-c", "echo ran > ran"]), network=OUTBOUND)
    done = subprocess.run([sys.executable, "-c", _DIE_IN_THE_GATE, json.dumps(spec.to_dict()), settings.work_dir],
                          cwd=REPO, capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    got = json.loads(done.stdout)
    handle = SandboxHandle.from_dict(got["handle"])
    sid = handle.sandbox_id
    # then bwrap's child never takes the worker's death (EOF on a plain pipe) as the go-ahead: the
    # command does not start with no proxy, no timeout and nobody reading its output;
    time.sleep(1.0)
    assert not os.path.exists(_ws(runtime, sid, "ran")), "the command ran after its worker died"
    # the outer bwrap died with the worker (--die-with-parent), but its child, still before its read
    # of --block-fd, has no parent-death signal yet: it stays in the job's cgroup, blocked.
    wait_for(lambda: runtime.cgroups.pids(sid) == [got["child_pid"]], timeout_s=10)
    # The redelivered execute does not run it either, and kills what is left;
    result = runtime.execute(handle, spec, lambda stream, chunk: None)
    assert result.outcome == "error" and "not re-run" in result.reason
    assert runtime.cgroups.pids(sid) == [] and not os.path.exists(_ws(runtime, sid, "ran"))
    # the teardown (destroy, as the cleanup or the orphan sweep runs it) leaves nothing behind.
    runtime.destroy(handle)
    assert runtime.cgroups.pids(sid) == [] and runtime.list_sandboxes() == []


@pytest.mark.parametrize("kill_fails", [False, True], ids=["kill works", "kill fails too"])
def test_an_egress_proxy_that_cannot_start_never_lets_the_command_run(runtime, monkeypatch, kill_fails) -> None:  # type: ignore[no-untyped-def]
    # Given an outbound job whose proxy cannot be bound (and, worse, whose cgroup kill fails as well),
    spec = replace(make_spec(["/bin/sh", "-c", "echo ran > ran"]), network=OUTBOUND)
    handle = runtime.create(spec, "h")
    sid = handle.sandbox_id
    seccomp.filter_fd()  # compiled once per process, not per spawn: not a leak
    if runtime.spares is not None:
        runtime.spares.settle()
    before = _fds()
    spawned = []
    real_spawn = executor.spawn_sandbox

    def spy_spawn(*args, **kwargs):  # type: ignore[no-untyped-def]
        proc, joined_r = real_spawn(*args, **kwargs)
        spawned.append(proc)
        return proc, joined_r

    def no_proxy(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("no proxy today")

    def no_kill(sid):  # type: ignore[no-untyped-def]
        raise OSError("cgroup.kill refused")

    monkeypatch.setattr(executor, "spawn_sandbox", spy_spawn)
    monkeypatch.setattr(runtime.egress, "open", no_proxy)
    if kill_fails:
        monkeypatch.setattr(runtime.cgroups, "kill", no_kill)
        # when execute runs it, the error reaches the caller, and what was spawned is reaped;
        with pytest.raises(OSError, match="cgroup.kill refused"):
            runtime.execute(handle, spec, lambda stream, chunk: None)
        assert spawned and spawned[0].returncode is not None
    else:
        # when execute runs it, the job ends `error`, saying why;
        result = runtime.execute(handle, spec, lambda stream, chunk: None)
        assert result.outcome == "error" and "egress proxy could not start" in result.reason
    # then the gate was never opened: the command did not start, with or without a working kill,
    time.sleep(0.5)
    assert not os.path.exists(_ws(runtime, sid, "ran")), "the command ran without its proxy"
    assert _fds() == before  # and no descriptor is left open
    monkeypatch.undo()
    runtime.destroy(handle)
    assert runtime.list_sandboxes() == []


# A worker process that creates the sandbox and runs the job's setup or execute with nothing held for
# it (the ordinary spawn), and is SIGKILLed before the go-ahead: the moment the spawn returns (before
# the launcher even joined the cgroups), or once the gate is ready (just before the byte).
_DIE_BEFORE_THE_GO_AHEAD = (
    "import json,os,sys\nfrom config.settings import load_settings\n"
    "from sandbox.runtimes import executor\nfrom sandbox.runtimes.local import LocalRuntime\n"
    "from sandbox.spec import JobSpec\n"
    "rt = LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[2]}))\n"
    "s = JobSpec.from_dict(json.loads(sys.argv[1])); h = rt.create(s, 'h')\n"
    "def die():\n"
    "    print(json.dumps(h.to_dict()), flush=True)\n"
    "    os.kill(os.getpid(), 9)\n"
    "if sys.argv[4] == 'spawned':\n"
    "    real = executor.spawn_sandbox\n"
    "    executor.spawn_sandbox = lambda *a, **k: (real(*a, **k), die())\n"
    "else:\n"
    "    from sandbox.runtimes.gate import Gate\n"
    "    ready = Gate.wait_ready\n"
    "    Gate.wait_ready = lambda self, *a, **k: (ready(self, *a, **k), die())\n"
    "getattr(rt, sys.argv[3])(h, s, lambda stream, chunk: None)\n")


def _processes(pids: list[int]) -> list[str]:
    """Each process's pid, parent, state and command line, for a failure's message."""
    described = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")[:300]
            with open(f"/proc/{pid}/wchan", "rb") as f:
                wchan = f.read()
            described.append(f"{pid} ppid={fields[1].decode()} state={fields[0].decode()} wchan={wchan.decode()} {cmdline!r}")
        except OSError as e:
            described.append(f"{pid}: {e}")
    return described


def _with_setup(spec, argv: list[str]):  # type: ignore[no-untyped-def]
    return replace(spec, setup=SetupSpec(command=argv[0], argv=tuple(argv), timeout_s=20))


@pytest.mark.parametrize("when", ["spawned", "ready"])
@pytest.mark.parametrize("kind", ["execute", "setup"])
def test_a_worker_dying_before_the_go_ahead_of_an_ordinary_spawn_never_lets_the_command_run(
        runtime, settings, kind, when) -> None:  # type: ignore[no-untyped-def]
    # Given a job run with nothing pre-started for it (a setup command, or an execute in a worker
    # that did not create it), whose worker was SIGKILLed after the spawn, before the go-ahead,
    spec = make_spec(["/bin/sh", "-c", "echo ran > ran"])
    if kind == "setup":
        spec = _with_setup(spec, ["/bin/sh", "-c", "echo ran > ran"])
    done = subprocess.run([sys.executable, "-c", _DIE_BEFORE_THE_GO_AHEAD, json.dumps(spec.to_dict()),
                           settings.work_dir, kind, when],
                          cwd=REPO, capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    handle = SandboxHandle.from_dict(json.loads(done.stdout))
    sid = handle.sandbox_id
    # then the command never starts (it used to as soon as bwrap was set up, if the worker died
    # before bwrap armed --die-with-parent: nobody reading its output, no timeout);
    time.sleep(1.0)
    assert not os.path.exists(_ws(runtime, sid, "ran")), "the command ran after its worker died"
    # what is left is at most bwrap's child, blocked on a gate that never sees EOF, in the job's
    # cgroup (none when the worker died before the launcher's "joined" byte: its write to a pipe
    # nobody reads kills it with SIGPIPE before bwrap, which a loaded host makes common);
    deadline = time.monotonic() + 10
    while len(runtime.cgroups.pids(sid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(left := runtime.cgroups.pids(sid)) <= 1, _processes(left)  # (what they are, if not)
    # the redelivered run does not run it either (never twice), and kills what is left;
    result = getattr(runtime, kind)(handle, spec, lambda stream, chunk: None)
    assert result.outcome == "error" and "not re-run" in result.reason
    assert runtime.cgroups.pids(sid) == [] and not os.path.exists(_ws(runtime, sid, "ran"))
    runtime.destroy(handle)
    assert runtime.list_sandboxes() == []


def test_setup_and_a_fresh_runtimes_execute_run_through_the_gate(runtime, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Given a job with a setup command, executed by a runtime that holds nothing for it,
    spec = _with_setup(make_spec(["/bin/sh", "-c", "cat dep"]), ["/bin/sh", "-c", "echo set > dep"])
    handle = runtime.create(spec, "h")
    fresh = LocalRuntime(settings)
    argvs: list[list[str]] = []
    released: list[int] = []
    real_argv, real_release = bwrap.job_argv, Gate.release

    def spy_argv(*args):  # type: ignore[no-untyped-def]
        argv = real_argv(*args)
        argvs.append(argv)
        return argv

    def spy_release(self: Gate) -> None:
        released.append(self.pid or 0)
        real_release(self)

    monkeypatch.setattr(bwrap, "job_argv", spy_argv)
    monkeypatch.setattr(Gate, "release", spy_release)
    # when the setup and then the execute run,
    setup = runtime.setup(handle, spec, lambda stream, chunk: None)
    result = fresh.execute(handle, spec, lambda stream, chunk: None)
    # then both ran as before,
    assert setup.outcome == "succeeded" and result.outcome == "succeeded", (setup.reason, result.reason)
    out = fresh.logs(handle)["stdout"].read().split()
    assert out == [b"set"]
    # each bwrap held on a --block-fd and let go once, after it had said its child's pid.
    assert len(argvs) == 2 and all("--block-fd" in a and "--info-fd" in a for a in argvs)
    assert len(released) == 2 and all(pid > 0 for pid in released)
    monkeypatch.undo()
    runtime.destroy(handle)


def _never_joins(runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # the launcher's `sh -e` exits when it cannot write a cgroup.procs file, before bwrap starts
    monkeypatch.setattr(runtime.cgroups, "procs_files", lambda sid: ["/nonexistent/cgroup.procs"])


def _no_child_pid(runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = bwrap.job_argv

    def bad_option(*args):  # type: ignore[no-untyped-def]
        argv = real(*args)
        return [argv[0], "--no-such-option", *argv[1:]]  # bwrap stops at parsing, before its clone
    monkeypatch.setattr(bwrap, "job_argv", bad_option)


@pytest.mark.parametrize("failure", [_never_joins, _no_child_pid], ids=["never joins", "no child pid"])
@pytest.mark.parametrize("network", [NetworkPolicy(), OUTBOUND], ids=["offline", "outbound"])
def test_a_sandbox_that_never_gets_ready_ends_error_and_leaves_nothing(runtime, monkeypatch, failure, network) -> None:  # type: ignore[no-untyped-def]
    # Given a spawn whose launcher never joins its cgroups, or whose bwrap never says its child's pid,
    spec = replace(make_spec(["/bin/sh", "-c", "echo ran > ran"]), network=network)
    handle = runtime.create(spec, "h")
    seccomp.filter_fd()
    _settle_spares(runtime)
    before = _fds()
    failure(runtime, monkeypatch)
    # when execute runs it, the run ends `error`, saying why (not `failed`: no command ran),
    result = runtime.execute(handle, spec, lambda stream, chunk: None)
    assert result.outcome == "error" and "the sandbox did not start" in result.reason, result.reason
    # with no go-ahead, nothing left running, reaped, and no descriptor left open.
    assert not os.path.exists(_ws(runtime, handle.sandbox_id, "ran"))
    assert runtime.cgroups.pids(handle.sandbox_id) == [] and _zombies() == []
    assert _fds() == before
    monkeypatch.undo()
    runtime.destroy(handle)


# A worker process that executes a job and is SIGKILLed once the command runs, from another thread.
_DIE_WHILE_IT_RUNS = (
    "import json,os,sys,threading,time\nfrom config.settings import load_settings\n"
    "from sandbox.runtimes.local import LocalRuntime\nfrom sandbox.spec import JobSpec\n"
    "rt = LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[2]}))\n"
    "s = JobSpec.from_dict(json.loads(sys.argv[1])); h = rt.create(s, 'h')\n"
    "marker = os.path.join(rt.run_dir, h.sandbox_id, 'mnt', 'workspace', 'started')\n"
    "def die():\n"
    "    while not os.path.exists(marker): time.sleep(0.01)\n"
    "    print(json.dumps(h.to_dict()), flush=True)\n"
    "    os.kill(os.getpid(), 9)\n"
    "threading.Thread(target=die, daemon=True).start()\n"
    "rt.execute(h, s, lambda stream, chunk: None)\n")


@pytest.mark.parametrize("network", [NetworkPolicy(), OUTBOUND], ids=["offline", "outbound"])
def test_a_worker_dying_after_the_go_ahead_takes_the_whole_sandbox_with_it(runtime, settings, network) -> None:  # type: ignore[no-untyped-def]
    # Given a running job with a daemon of its own (setsid, out of the command's process group),
    spec = replace(make_spec(["/bin/sh", "-c", "setsid sleep 300 & echo > started; sleep 300"], timeout_s=600),
                   network=network)
    # when its worker is SIGKILLed,
    done = subprocess.run([sys.executable, "-c", _DIE_WHILE_IT_RUNS, json.dumps(spec.to_dict()), settings.work_dir],
                          cwd=REPO, capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    handle = SandboxHandle.from_dict(json.loads(done.stdout))
    # then with no teardown at all every process of the sandbox ends: the outer bwrap dies with the
    # worker (--die-with-parent), bwrap's pid 1 with it, and the kernel kills the rest of the pid namespace.
    wait_for(lambda: runtime.cgroups.pids(handle.sandbox_id) == [], timeout_s=10)
    runtime.destroy(handle)


def _fail_seccomp(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def boom() -> int:
        raise OSError("no memfd")
    monkeypatch.setattr(seccomp, "filter_fd", boom)


def _fail_argv(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def boom(*args: object) -> list[str]:
        raise OSError("no cgroup")
    monkeypatch.setattr(bwrap, "job_argv", boom)


def _fail_exec(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(executor, "SH", "/nonexistent/sh")


FAILURES = {"seccomp": _fail_seccomp, "argv": _fail_argv, "exec": _fail_exec}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("network", [NetworkPolicy(), OUTBOUND], ids=["offline", "outbound"])
def test_an_execute_whose_spawn_fails_leaks_no_descriptor(runtime, monkeypatch, failure, network) -> None:  # type: ignore[no-untyped-def]
    # Given a sandbox whose spawn fails at `failure` (before the launcher, building its argv, at exec),
    spec = replace(make_spec(["/bin/true"]), network=network)
    handle = runtime.create(spec, "h")
    seccomp.filter_fd()  # compiled once per process, not per spawn: not a leak
    if runtime.spares is not None:
        runtime.spares.settle()  # its background clone's descriptors come and go: not the spawn's
    before = _fds()
    FAILURES[failure](monkeypatch)
    # when execute runs it, the error reaches the caller
    with pytest.raises(OSError):
        runtime.execute(handle, spec, lambda stream, chunk: None)
    # and no descriptor is left open: not its pipes, its log files, the seccomp memfd or the gate's ends.
    assert _fds() == before
    monkeypatch.undo()
    runtime.destroy(handle)
    assert runtime.cgroups.pids(handle.sandbox_id) == []


@pytest.mark.parametrize("failure", FAILURES)
def test_a_prestart_whose_spawn_fails_leaks_no_descriptor(runtime, monkeypatch, failure) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/true"])
    handle = runtime.create(spec, "h")
    d, meta = runtime._require(handle)
    seccomp.filter_fd()
    if runtime.spares is not None:
        runtime.spares.settle()  # its background clone's descriptors come and go: not the spawn's
    before = _fds()
    FAILURES[failure](monkeypatch)
    with pytest.raises(OSError):
        prestart.spawn(runtime, d, meta, handle.sandbox_id, spec)
    assert _fds() == before


def test_the_gate_handed_to_bwrap_is_a_writer_of_its_own_pipe() -> None:
    # bwrap reads EOF as the go-ahead: its fd must hold the pipe open for writing itself, so that
    # closing every end of ours (a worker's death) is no EOF, while our byte still reaches it.
    block_fd, gate_w = gate.held_gate()
    try:
        assert fcntl.fcntl(block_fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert os.get_inheritable(block_fd) is False and os.get_inheritable(gate_w) is False
        gate.open_gate(gate_w)
        assert os.read(block_fd, 1) == b"g"
        os.set_blocking(block_fd, False)
        with pytest.raises(BlockingIOError):  # our end is closed, and still no EOF
            os.read(block_fd, 1)
    finally:
        os.close(block_fd)


def test_a_gate_gives_no_go_ahead_before_it_is_ready_or_once_shut() -> None:
    # Given a gate whose bwrap never ran (its ends closed as spawn_sandbox would),
    g = Gate()
    os.close(g.info_w)
    os.close(g.block_fd)
    before = _fds()
    # then a go-ahead before wait_ready answered is refused and shuts the gate (no byte, even under -O),
    with pytest.raises(SandboxFailure, match="before the sandbox was ready; the gate stays shut"):
        g.release()
    # and once shut (again is fine) it never gets ready, and every end of ours is closed.
    g.shut()
    g.shut()
    with pytest.raises(SandboxFailure, match="closed before the sandbox was ready"):
        g.wait_ready()
    assert len(before - _fds()) == 2 and g.gate_w == g.info_r == -1


@pytest.mark.parametrize("path", ["outbound", "prestarted"])
def test_the_job_never_holds_a_gate_descriptor(runtime, path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # bwrap closes --block-fd (and --info-fd) before the command: a job holding its own gate's
    # writer could not open it (bwrap has read it), but it must hold nothing of the worker's at all.
    spec = make_spec(["/bin/sh", "-c", "ls /proc/self/fd"])
    if path == "outbound":
        spec = replace(spec, network=OUTBOUND)
    handle = runtime.create(spec, "h")
    if path == "prestarted":
        runtime.prestart(handle, spec)
        wait_for(lambda: len(runtime.cgroups.pids(handle.sandbox_id)) >= 2)  # held: bwrap and its child

        def no_second_spawn(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise AssertionError("execute spawned anew instead of releasing the held sandbox")

        # what runs must be the held sandbox: a fall-back spawn would pass the check below unheld
        monkeypatch.setattr(executor, "spawn_sandbox", no_second_spawn)
    result = runtime.execute(handle, spec, lambda stream, chunk: None)
    logs = runtime.logs(handle)
    out = logs["stdout"].read()
    for f in logs.values():
        f.close()
    assert result.outcome == "succeeded", result.reason
    assert sorted(out.decode().split(), key=int) == ["0", "1", "2", "3"]  # 3 is ls's own directory handle
