"""bench/floor.py's failure paths on a real LocalRuntime: a floor task that fails ends its chain, so
it removes what the floor holds itself (cgroup, directory, uid), or nothing else ever would."""
from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from bench import floor
from sandbox.errors import SandboxFailure
from sandbox.runtimes.gate import Gate
from sandbox.runtimes.local import LocalRuntime
from tests.support.services import _remove_job_cgroups


@pytest.fixture
def made(runtime: LocalRuntime) -> Iterator[list[str]]:
    """The floors a test made (by uid allocation, the first step): removed after it whatever it
    asserted, so a failing test leaks no cgroup (the test stack's clean-up knows only sbx-*)."""
    names: list[str] = []
    real_allocate = runtime.uids.allocate

    def allocate(name: str) -> int:
        names.append(name)
        return real_allocate(name)

    runtime.uids.allocate = allocate  # type: ignore[method-assign]
    yield names
    for name in names:
        floor.remove(runtime, {"name": name, "uid": None})


def _left(rt: LocalRuntime, name: str) -> list[str]:
    groups = [os.path.dirname(f) for f in rt.cgroups.procs_files(name) if os.path.exists(os.path.dirname(f))]
    held = [e.name for e in os.scandir(rt.uids.dir) if os.readlink(e.path) == name]
    return groups + held + ([name] if os.path.lexists(os.path.join(rt.run_dir, name)) else [])


def test_a_failed_spawn_removes_the_floor_it_was_given(runtime: LocalRuntime, made: list[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec = floor.trivial_spec(runtime.settings)
    ctx = floor.make(runtime, spec)
    assert len(_left(runtime, ctx["name"])) >= 3  # given: a live floor (cgroup, uid, directory)

    def refused(*_: object, **__: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(floor.executor, "spawn_gated", refused)
    with pytest.raises(OSError):
        floor.run(runtime, spec, ctx)
    assert _left(runtime, ctx["name"]) == []


def test_a_sandbox_that_never_gets_ready_is_killed_and_its_floor_removed(runtime: LocalRuntime, made: list[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = floor.trivial_spec(runtime.settings)
    ctx = floor.make(runtime, spec)
    spawned: list[subprocess.Popen] = []
    real_spawn = floor.executor.spawn_gated

    def spawn(*args: object) -> tuple[subprocess.Popen, Gate]:
        proc, gate = real_spawn(*args)  # type: ignore[arg-type]
        spawned.append(proc)
        return proc, gate

    def never_ready(self: Gate, timeout_s: float = 10.0) -> int:
        raise SandboxFailure("bwrap gave no child pid")

    monkeypatch.setattr(floor.executor, "spawn_gated", spawn)
    monkeypatch.setattr(Gate, "wait_ready", never_ready)
    with pytest.raises(SandboxFailure):
        floor.run(runtime, spec, ctx)
    # the held sandbox was killed and reaped (never let go), and nothing of the floor is left
    assert len(spawned) == 1 and spawned[0].returncode is not None
    assert _left(runtime, ctx["name"]) == []


def test_a_cgroup_that_cannot_be_made_leaves_no_directory_or_uid(runtime: LocalRuntime, made: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.cgroups, "create", refused)
    with pytest.raises(OSError):
        floor.make(runtime, floor.trivial_spec(runtime.settings))
    assert len(made) == 1 and _left(runtime, made[0]) == []


def test_a_floor_runs_ls_in_its_cgroup_and_remove_leaves_nothing(runtime: LocalRuntime, made: list[str]) -> None:
    spec = floor.trivial_spec(runtime.settings)
    ctx = floor.make(runtime, spec)
    ran = floor.run(runtime, spec, ctx)
    assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (0, "", "")
    floor.remove(runtime, ran)
    assert _left(runtime, ctx["name"]) == []


def test_the_test_stack_clean_up_removes_a_floor_cgroup_a_dead_worker_left(runtime: LocalRuntime, made: list[str]) -> None:
    # given: a floor whose chain never reached its remove (the worker was killed, the bench stopped)
    ctx = floor.make(runtime, floor.trivial_spec(runtime.settings))
    groups = [os.path.dirname(f) for f in runtime.cgroups.procs_files(ctx["name"])]
    assert all(os.path.isdir(g) for g in groups)
    # when: remove_work_dir's clean-up runs over the work dir (as bench/e2e.py and the fixtures do)
    _remove_job_cgroups(runtime.work_dir)
    assert [g for g in groups if os.path.exists(g)] == []
