"""Pre-started sandboxes (runtimes/prestart.py) against the real bwrap + cgroups: the held sandbox
is used when it can be, never runs the command early, and leaves nothing behind when it is not."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sandbox.runtimes import bwrap
from sandbox.runtimes.local import LocalRuntime
from tests.integration.test_local_runtime import REPO, make_spec


def _wait_held(rt: LocalRuntime, sid: str) -> list[int]:
    """The cgroup's pids once the held sandbox has cloned into its namespaces (bwrap + its child)."""
    for _ in range(500):
        pids = rt.cgroups.pids(sid)
        if len(pids) >= 2:
            return pids
        time.sleep(0.01)
    raise AssertionError(f"no held sandbox in {sid}: {rt.cgroups.pids(sid)}")


def create(rt: LocalRuntime, spec):  # type: ignore[no-untyped-def]
    """create, then the pre-start lifecycle.create asks for once the stage is recorded."""
    handle = rt.create(spec, "h")
    rt.prestart(handle, spec)
    return handle


def _ws(rt: LocalRuntime, sid: str, name: str) -> str:
    """`name` in the sandbox's workspace as the host sees it. The workspace must be there: a check
    that a file is absent must not pass because the path is wrong (sandboxes moved to the run dir)."""
    workspace = os.path.join(rt.run_dir, sid, "mnt", "workspace")
    assert os.path.isdir(workspace), workspace
    return os.path.join(workspace, name)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _settle_spares(runtime) -> None:  # type: ignore[no-untyped-def]
    """The spare images' background clone after create opens descriptors of its own for a moment."""
    if runtime.spares is not None:
        runtime.spares.settle()


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a killed bwrap child is a zombie until the host's init reaps it)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return alive


def _zombies() -> list[str]:
    """Children of this process that ended but were never reaped."""
    me, found = str(os.getpid()), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] == "Z" and fields[1] == me:
            found.append(pid)
    return found


def test_create_holds_the_sandbox_and_execute_releases_it_with_live_inputs_and_env(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "touch ran; cat in/data.txt; echo \" $GREETING\""],
                     env={"GREETING": "hello"})
    handle = create(runtime, spec)
    sid = handle.sandbox_id
    assert runtime.prestarts.held_ids() == [sid]
    pids = _wait_held(runtime, sid)
    assert all(open(f"/proc/{p}/comm").read().strip() == "bwrap" for p in pids)
    # prepare writes after the sandbox's mounts were made: the bind mount shows it anyway
    runtime.put_file(handle, "in/data.txt", io.BytesIO(b"input"), 0o644)
    time.sleep(0.2)
    assert not os.path.exists(_ws(runtime, sid, "ran"))  # held: the command has not started
    result = runtime.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "succeeded", result
    assert runtime.logs(handle)["stdout"].read() == b"input hello\n"
    assert runtime.prestarts.held_ids() == [] and _zombies() == []


def test_destroy_without_execute_leaves_no_process_fd_or_zombie(runtime) -> None:  # type: ignore[no-untyped-def]
    before = _fds()
    spec = make_spec(["/bin/sh", "-c", "touch ran"])
    handle = create(runtime, spec)
    pids = _wait_held(runtime, handle.sandbox_id)
    runtime.destroy(handle)
    _settle_spares(runtime)
    assert runtime.prestarts.held_ids() == []
    assert _alive(pids) == []
    assert _zombies() == []
    assert _fds() - before == set()


def test_a_failed_prepare_then_destroy_reaps_the_held_sandbox(runtime) -> None:  # type: ignore[no-untyped-def]
    from sandbox.errors import JobRejected

    before = _fds()
    spec = make_spec(["/bin/true"], disk=8 << 20)
    handle = create(runtime, spec)
    with pytest.raises(JobRejected):  # an input bigger than the disk: the stage fails for good
        runtime.put_file(handle, "big", io.BytesIO(b"x" * (16 << 20)), 0o644)
    runtime.destroy(handle)
    _settle_spares(runtime)
    assert runtime.prestarts.held_ids() == [] and _zombies() == [] and _fds() - before == set()


def test_cancel_between_create_and_execute_kills_the_held_sandbox(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "echo ran; touch ran"])
    handle = create(runtime, spec)
    _wait_held(runtime, handle.sandbox_id)
    runtime.kill(handle)
    assert runtime.cgroups.pids(handle.sandbox_id) == [] and runtime.prestarts.held_ids() == []
    assert runtime.execute(handle, spec, lambda s, c: None).outcome == "cancelled"
    assert not os.path.exists(_ws(runtime, handle.sandbox_id, "ran")) and _zombies() == []


def test_a_cancel_from_another_process_is_seen_and_the_dead_held_one_reaped(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "touch ran"])
    handle = create(runtime, spec)
    _wait_held(runtime, handle.sandbox_id)
    code = ("import json,sys\nfrom config.settings import load_settings\n"
            "from sandbox.runtimes.local import LocalRuntime\nfrom sandbox.runtimes.base import SandboxHandle\n"
            "LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[2]})).kill(SandboxHandle.from_dict(json.loads(sys.argv[1])))\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(handle.to_dict()), settings.work_dir],
                   cwd=REPO, check=True, env={"PATH": "/usr/bin:/bin"})
    assert runtime.execute(handle, spec, lambda s, c: None).outcome == "cancelled"
    assert not os.path.exists(_ws(runtime, handle.sandbox_id, "ran")) and _zombies() == []


def test_an_execute_in_a_fresh_runtime_falls_back_and_the_held_one_is_reaped(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "echo run >> count; wc -l < count"])
    handle = create(runtime, spec)
    held_pids = _wait_held(runtime, handle.sandbox_id)
    fresh = LocalRuntime(settings)  # nothing held in it: kills the held one, spawns as before
    result = fresh.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "succeeded" and fresh.logs(handle)["stdout"].read() == b"1\n"
    assert _alive(held_pids) == []
    other = make_spec(["/bin/true"])
    runtime.destroy(create(runtime, other))  # the next create reaps the dead one
    assert handle.sandbox_id not in runtime.prestarts.held_ids() and _zombies() == []


def test_a_changed_spec_is_not_run_by_the_held_sandbox(runtime) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    spec = make_spec(["/bin/echo", "held"])
    handle = create(runtime, spec)
    changed = replace(spec, argv=("/bin/echo", "fresh"))
    assert runtime.execute(handle, changed, lambda s, c: None).outcome == "succeeded"
    assert runtime.logs(handle)["stdout"].read() == b"fresh\n" and _zombies() == []


def test_the_timeout_counts_from_the_release_and_is_enforced(runtime) -> None:  # type: ignore[no-untyped-def]
    slow = make_spec(["/bin/sh", "-c", "sleep 0.5; echo done"], timeout_s=1.5)
    handle = create(runtime, slow)
    time.sleep(2.0)  # longer than the timeout, spent held: not the job's time
    result = runtime.execute(handle, slow, lambda s, c: None)
    assert result.outcome == "succeeded" and runtime.logs(handle)["stdout"].read() == b"done\n"
    stuck = make_spec(["/bin/sleep", "30"], timeout_s=1)
    handle = create(runtime, stuck)
    result = runtime.execute(handle, stuck, lambda s, c: None)
    assert result.outcome == "timed_out" and result.duration_s < 10


def test_a_worker_dying_after_create_never_lets_the_held_command_run(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Given a process that created the sandbox (holding its bwrap) and was SIGKILLed before execute,
    spec = make_spec(["/bin/sh", "-c", "echo run >> count; wc -l < count"])
    code = ("import json,sys,os,time\nfrom config.settings import load_settings\n"
            "from sandbox.runtimes.local import LocalRuntime\nfrom sandbox.spec import JobSpec\n"
            "rt = LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[2]}))\n"
            "s = JobSpec.from_dict(json.loads(sys.argv[1])); h = rt.create(s, 'h'); rt.prestart(h, s)\n"
            "while len(rt.cgroups.pids(h.sandbox_id)) < 2: time.sleep(0.01)\n"
            "print(json.dumps(h.to_dict()), flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec.to_dict()), settings.work_dir],
                          cwd=REPO, capture_output=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == -signal.SIGKILL, done.stderr
    from sandbox.runtimes.base import SandboxHandle
    handle = SandboxHandle.from_dict(json.loads(done.stdout))
    # then its held command never starts on its own (bwrap would read EOF from a plain pipe as "go"),
    time.sleep(0.5)
    assert not os.path.exists(_ws(runtime, handle.sandbox_id, "count"))
    # and the redelivered execute here runs it exactly once.
    result = runtime.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "succeeded" and runtime.logs(handle)["stdout"].read() == b"1\n"
    assert runtime.cgroups.pids(handle.sandbox_id) == []


def test_setup_and_outbound_jobs_are_not_prestarted(runtime) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from sandbox.spec import NetworkPolicy, SetupSpec

    with_setup = replace(make_spec(["/bin/true"]), setup=SetupSpec(command="/bin/true", argv=("/bin/true",), timeout_s=5,
                                                                  network=NetworkPolicy()))
    create(runtime, with_setup)
    outbound = replace(make_spec(["/bin/true"]), network=NetworkPolicy(outbound=True))
    create(runtime, outbound)
    assert runtime.prestarts.held_ids() == []


def test_prestart_off_spawns_at_execute(settings) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    rt = LocalRuntime(replace(settings, prestart=False))
    spec = make_spec(["/bin/echo", "ok"])
    handle = create(rt, spec)
    assert rt.prestarts is None and rt.cgroups.pids(handle.sandbox_id) == []
    assert rt.execute(handle, spec, lambda s, c: None).outcome == "succeeded"
    rt.destroy(handle)


def test_no_prestart_after_a_cancel_or_for_a_sandbox_gone_meanwhile(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "touch ran"])
    handle = runtime.create(spec, "h")
    runtime.kill(handle)  # a cancel between create and its pre-start
    runtime.prestart(handle, spec)
    assert runtime.prestarts.held_ids() == [] and runtime.cgroups.pids(handle.sandbox_id) == []
    runtime.destroy(handle)
    runtime.prestart(handle, spec)  # a destroy that raced it: nothing raised, nothing spawned
    assert runtime.prestarts.held_ids() == [] and _zombies() == []


@pytest.mark.parametrize("how", ["bwrap exits", "bwrap hangs"])
def test_a_held_sandbox_that_never_got_ready_is_not_released_and_execute_spawns_anew(runtime, monkeypatch, how) -> None:  # type: ignore[no-untyped-def]
    # Given a pre-start whose bwrap never says its child's pid: it stops at parsing its options, or
    # (alive, joined, holding --info-fd open) never gets that far,
    from sandbox.runtimes import prestart

    before = _fds()
    spec = make_spec(["/bin/sh", "-c", "echo run >> count; wc -l < count"])
    real = bwrap.job_argv
    if how == "bwrap exits":
        monkeypatch.setattr(bwrap, "job_argv", lambda *a: [real(*a)[0], "--no-such-option", *real(*a)[1:]])
    else:
        monkeypatch.setattr(bwrap, "job_argv", lambda *a: ["/bin/sleep", "60"])
    handle = create(runtime, spec)
    held = runtime.prestarts._held[handle.sandbox_id].result(timeout=10)
    if how == "bwrap exits":
        held.proc.wait(10)
    monkeypatch.setattr(bwrap, "job_argv", real)
    monkeypatch.setattr(prestart, "READY_WAIT_S", 0.5)
    # when execute runs, the held one is not ready: it is disposed of, never given the byte, and the
    # run spawns anew through the same gate, once;
    result = runtime.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "succeeded", result.reason
    assert runtime.logs(handle)["stdout"].read() == b"1\n"
    assert held.ready is False and held.gate.gate_w == -1 and held.proc.returncode is not None
    # and nothing of the held one is left: no process, zombie or descriptor.
    runtime.destroy(handle)
    _settle_spares(runtime)
    assert runtime.prestarts.held_ids() == [] and _zombies() == [] and _fds() - before == set()
