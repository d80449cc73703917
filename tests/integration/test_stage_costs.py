"""What a trivial job's stages cost the worker beyond their work: Redis round trips, hand-offs to
helper threads, and syscalls (each one a point where the worker's other threads take the GIL).
Real Redis, SeaweedFS, bwrap, cgroups and loop mounts; the figures are docs/capacity.md's."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from config.settings import load_settings
from sandbox import collecting, lifecycle, parallel
from sandbox.errors import SandboxFailure
from sandbox.events import EventBus
from sandbox.runtimes import fsutil, hostetc
from sandbox.runtimes.base import SandboxHandle
from sandbox.runtimes.local import LocalRuntime
from sandbox.services import Services
from sandbox.spec import JobSpec, ResourceLimits
from sandbox.state import JobStatus, JobStore, new_record
from sandbox.storage import ArtifactStore
from tests.conftest import E2E_COMMANDS, new_job_id
from tests.support.services import sandbox_work_dir, unavailable

HOST = "costs@host"


class Counted(redis.Redis):
    """A client that counts the commands it sends (a pipeline's go through its own path)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.fixture
def svc(redis_url: str, s3: Any) -> Iterator[Services]:
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/bwrap"):
        unavailable("the local runtime needs root and bubblewrap")
    with sandbox_work_dir("sbx-costs-", "/tmp") as work:
        settings = load_settings({**s3.env(), "SANDBOX_REDIS_URL": redis_url, "SANDBOX_WORK_DIR": str(work),
                                  "SANDBOX_DEFAULT_DISK": "16Mi", "SANDBOX_DEFAULT_MEMORY": "64Mi",
                                  "SANDBOX_ALLOWED_COMMANDS": E2E_COMMANDS})
        try:
            runtime = LocalRuntime(settings)
        except SandboxFailure as e:
            unavailable(str(e))
        client = Counted.from_url(redis_url)
        client.sent = []
        events = EventBus.from_settings(client, settings)
        artifacts = ArtifactStore(settings, actor=HOST)
        artifacts.ensure_bucket()
        yield Services(settings=settings, store=JobStore(client, events), runtime=runtime, artifacts=artifacts,
                       events=events, host=HOST)
        for info in runtime.list_sandboxes():
            runtime.destroy(SandboxHandle(info.sandbox_id, info.job_id, "local", info.host, 0, 0))
        if runtime.spares is not None:
            runtime.spares.settle()


def _run_to_collect(svc: Services, command: str = "ls") -> str:
    job_id = new_job_id("costs")
    record, run = lifecycle.submit(svc, json.dumps({"id": job_id, "command": command}), "task-" + job_id)
    assert run, record
    lifecycle.create(svc, job_id)
    lifecycle.prepare(svc, job_id)
    lifecycle.execute(svc, job_id, token="t-" + job_id)
    return job_id


def test_collect_starts_in_one_round_trip_and_hands_no_empty_log_to_a_helper(svc: Services,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a job whose command ran and printed nothing (both logs empty)
    job_id = _run_to_collect(svc)
    submitted: list[Any] = []
    real_pool = parallel._pool

    class Watched:
        def submit(self, fn: Any) -> Any:
            submitted.append(fn)
            return real_pool().submit(fn)

    monkeypatch.setattr(parallel, "_pool", Watched)
    svc.store.redis.sent.clear()
    # When it is collected
    collecting.collect(svc, job_id)
    # Then: its start and its end are one record script each (no read of the record first), the
    # empty logs get their entries without an upload, and the one object stored (events.json) is
    # put by the stage's own thread: nothing was handed to a helper thread
    assert svc.store.redis.sent == ["EVALSHA", "EVALSHA"], svc.store.redis.sent
    assert submitted == []
    record = svc.store.get(job_id)
    logs = {entry["key"].rsplit("/", 1)[1]: entry for entry in record["logs"]}
    assert logs["stdout.log"] == {"key": logs["stdout.log"]["key"], "size": 0, "url": None}
    assert logs["stderr.log"]["size"] == 0 and logs["stderr.log"]["url"] is None
    assert logs["events.json"]["size"] > 0 and logs["events.json"]["url"]
    assert record["status"] == JobStatus.COLLECTING.value and record["stages"]["collect"]["finished_at"]
    assert lifecycle.cleanup(svc, job_id)["status"] == "succeeded"


def test_collect_of_a_job_whose_command_never_ran_writes_nothing(svc: Services) -> None:
    # Given a job cancelled before execute: no outcome
    job_id = new_job_id("costs-none")
    lifecycle.submit(svc, json.dumps({"id": job_id, "command": "ls"}), "task-" + job_id)
    lifecycle.create(svc, job_id)
    lifecycle.cancel(svc, job_id)
    before = svc.store.redis.get(f"sandbox:job:{job_id}")
    svc.store.redis.sent.clear()
    collecting.collect(svc, job_id)
    # Then the stage read the record (one round trip) and changed nothing
    assert len(svc.store.redis.sent) == 1 and svc.store.redis.get(f"sandbox:job:{job_id}") == before
    lifecycle.cleanup(svc, job_id)


def test_a_log_with_bytes_is_still_uploaded(svc: Services) -> None:
    job_id = _run_to_collect(svc, "python3 -c \"print(12345)\"")
    collecting.collect(svc, job_id)
    logs = {e["key"].rsplit("/", 1)[1]: e for e in svc.store.get(job_id)["logs"]}
    assert logs["stdout.log"]["size"] == 6 and logs["stdout.log"]["url"]
    assert logs["stderr.log"]["size"] == 0 and logs["stderr.log"]["url"] is None
    lifecycle.cleanup(svc, job_id)


def test_a_transition_with_a_condition_writes_only_when_it_holds_and_decides_on_the_current_record(
        redis_client: redis.Redis) -> None:
    a, b = JobStore(redis_client), JobStore(redis_client)
    job_id = new_job_id("only-if")
    a.create(new_record(job_id, JobStatus.RUNNING))
    raw = redis_client.get(f"sandbox:job:{job_id}")
    ran = lambda r: r.get("outcome") is not None  # noqa: E731
    record = a.transition(job_id, JobStatus.COLLECTING, only_if=ran)
    assert record["status"] == "running" and redis_client.get(f"sandbox:job:{job_id}") == raw
    # another process records the outcome: a's remembered copy is stale, the condition is
    # decided on the current record
    b.update(job_id, lambda r: r.update(outcome={"outcome": "succeeded"}))
    record = a.transition(job_id, JobStatus.COLLECTING, only_if=ran)
    assert record["status"] == "collecting" and a.get(job_id)["status"] == "collecting"


def test_small_file_helpers_read_everything_and_write_like_open(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"1234567\n" * 20000)  # 160 KB: more than one read
    assert fsutil.read_file(str(big)) == big.read_bytes()
    # a kernel seq file returns a page per read: a short read is not its end (cgroup.procs of a
    # fork bomb is as long; a pid list cut short would let a kill miss processes)
    with open("/proc/kallsyms", "rb") as f:
        assert len(fsutil.read_file("/proc/kallsyms")) == len(f.read()) > 3 * 4096
    with pytest.raises(FileNotFoundError):
        fsutil.read_file(str(tmp_path / "missing"))
    assert fsutil.read_json(str(tmp_path / "missing")) is None
    fsutil.write_json_atomic(str(tmp_path / "a.json"), {"x": [1, "é"]})
    with open(tmp_path / "b.json", "w", encoding="utf-8") as f:
        json.dump({"x": [1, "é"]}, f)
    assert fsutil.read_json(str(tmp_path / "a.json")) == {"x": [1, "é"]}
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    fsutil.create_new(str(tmp_path / "marker"))
    with pytest.raises(FileExistsError):
        fsutil.create_new(str(tmp_path / "marker"))
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(FileExistsError):  # a symlink is never followed to create its target
        fsutil.create_new(str(tmp_path / "link"))
    assert not (tmp_path / "elsewhere").exists()


def test_is_mount_point_agrees_with_ismount(svc: Services, tmp_path: Path) -> None:
    rt = svc.runtime
    assert isinstance(rt, LocalRuntime)
    job_id = new_job_id("mnt")
    spec = JobSpec(id=job_id, command="ls", argv=("/usr/bin/ls",), environment={}, timeout_s=5,
                   resources=ResourceLimits(cpu=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20, pids=32))
    handle = rt.create(spec, HOST)
    mnt = os.path.join(rt.run_dir, handle.sandbox_id, "mnt")
    os.symlink(mnt, tmp_path / "link")
    for path in (mnt, os.path.join(mnt, "workspace"), str(tmp_path), str(tmp_path / "link"),
                 str(tmp_path / "missing"), "/", "/proc"):
        assert fsutil.is_mount_point(path) == os.path.ismount(path), path
    assert fsutil.is_mount_point(mnt)
    rt.destroy(handle)
    assert not os.path.exists(os.path.dirname(mnt))


def test_remove_flat_dir_removes_files_and_empty_dirs_and_falls_back_for_anything_deeper(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a").write_text("a")
    (flat / "empty").mkdir()
    os.symlink(outside, flat / "link")  # removed as a link; its target is not touched
    fsutil.remove_flat_dir(str(flat))
    assert not flat.exists() and (outside / "keep").read_text() == "x"
    deep = tmp_path / "deep"
    (deep / "d" / "e").mkdir(parents=True)
    (deep / "d" / "e" / "f").write_text("f")
    os.symlink(outside, deep / "d" / "link")
    fsutil.remove_flat_dir(str(deep))
    assert not deep.exists() and (outside / "keep").read_text() == "x"
    fsutil.remove_flat_dir(str(tmp_path / "missing"))  # nothing there: nothing to do


def test_the_shared_etc_is_fingerprinted_at_most_once_per_interval_and_follows_a_changed_host_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    version = ["1"]

    def fingerprint(uid: int) -> str:
        calls.append(uid)
        return f"fp{version[0]}"

    monkeypatch.setattr(hostetc, "_fingerprint", fingerprint)
    monkeypatch.setattr(hostetc, "_etc_seen", {})
    # the interval counts from the check before the first copy is built: with the default 1 s, a
    # build slowed by a busy disk (its fsyncs took over 1 s under the suite's I/O) left the second
    # call past the interval already, and it fingerprinted again
    monkeypatch.setattr(hostetc, "ETC_RECHECK_S", 3600.0)
    work = str(tmp_path)
    first = hostetc.shared_etc(work, 65534)
    assert hostetc.shared_etc(work, 65534) == first and len(calls) == 1  # within ETC_RECHECK_S: no stats
    version[0] = "2"  # a host file was replaced
    monkeypatch.setattr(hostetc, "ETC_RECHECK_S", 0.0)  # ... and the interval has passed
    second = hostetc.shared_etc(work, 65534)
    assert second != first and second.endswith("fp2") and len(calls) == 2
    assert os.path.isfile(os.path.join(second, "passwd"))
    # a copy removed under us is rebuilt at once, whatever the interval
    monkeypatch.setattr(hostetc, "ETC_RECHECK_S", 3600.0)
    shutil.rmtree(second)
    assert hostetc.shared_etc(work, 65534) == second and os.path.isdir(second)


def test_a_kept_meta_is_read_once_and_never_outlives_its_sandbox(svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = svc.runtime
    assert isinstance(rt, LocalRuntime)
    other = LocalRuntime(svc.settings)  # another worker process on the same work dir
    job_id = new_job_id("meta")
    spec = JobSpec(id=job_id, command="ls", argv=("/usr/bin/ls",), environment={}, timeout_s=5,
                   resources=ResourceLimits(cpu=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20, pids=32))
    handle = rt.create(spec, HOST)
    reads: list[str] = []
    real = fsutil.read_json
    monkeypatch.setattr(fsutil, "read_json", lambda path, flags=0: reads.append(path) or real(path, flags))
    first = rt._meta(handle.sandbox_id)
    assert rt._meta(handle.sandbox_id) == first == other._meta(handle.sandbox_id)
    assert len(reads) == 1  # the creating runtime kept what it wrote; the other read it once
    # destroyed and made again by the other process (a new uid): the kept copy is not served
    other.destroy(handle)
    assert rt._meta(handle.sandbox_id) is None
    taken = other.uids._entry(first["uid"])
    os.symlink("sbx-placeholder", taken)  # its first uid is held: the next create gets another
    try:
        again = other.create(spec, HOST)
        assert rt._meta(again.sandbox_id) == other._meta(again.sandbox_id)
        assert rt._meta(again.sandbox_id)["uid"] != first["uid"]
        other.destroy(again)
    finally:
        os.unlink(taken)
