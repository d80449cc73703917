"""LocalRuntime lifecycle against the real bwrap + cgroups + loop disk: every method, from fresh processes."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from sandbox.errors import JobRejected, RuntimeUnavailable
from sandbox.runtimes.base import ExecResult, SandboxHandle
from sandbox.runtimes.bwrap import INSIDE_UID
from sandbox.spec import JobSpec, ResourceLimits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


def make_spec(argv: list[str], *, timeout_s: float = 20, cpu: float = 1.0, memory: int = 256 * MiB,
              disk: int = 64 * MiB, pids: int = 64, env: dict[str, str] | None = None) -> JobSpec:
    """A JobSpec with a unique id, as the policy would hand it over."""
    return JobSpec(id=f"t{uuid.uuid4().hex[:12]}", command=argv[0], argv=tuple(argv),
                   environment=env or {}, timeout_s=timeout_s,
                   resources=ResourceLimits(cpu=cpu, memory_bytes=memory, disk_bytes=disk, pids=pids))


def run(rt, argv: list[str], **kw) -> tuple[ExecResult, bytes, bytes, SandboxHandle]:  # type: ignore[no-untyped-def]
    """Create, execute and read logs (the sandbox is left for collect/destroy)."""
    spec = make_spec(argv, **kw)
    handle = rt.create(spec, "test-host")
    result = rt.execute(handle, spec, lambda s, c: None)
    logs = rt.logs(handle)
    out, err = logs["stdout"].read(), logs["stderr"].read()
    for f in logs.values():
        f.close()
    return result, out, err, handle


def sh(rt, script: str, **kw) -> tuple[ExecResult, bytes, bytes, SandboxHandle]:  # type: ignore[no-untyped-def]
    """Run a /bin/sh -c script in a fresh sandbox."""
    return run(rt, ["/bin/sh", "-c", script], **kw)


def test_create_is_idempotent_and_listed(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/true"], timeout_s=30)
    first = runtime.create(spec, "node-a")
    again = runtime.create(spec, "node-a")
    assert first == again and first.sandbox_id == f"sbx-{spec.id}" and first.host == "node-a"
    assert first.expires_at >= first.created_at + 30
    assert [i.sandbox_id for i in runtime.list_sandboxes()] == [first.sandbox_id]
    runtime.destroy(first)
    runtime.destroy(first)  # idempotent: missing is fine
    assert runtime.list_sandboxes() == []
    assert not os.path.exists(os.path.join(runtime.run_dir, first.sandbox_id))


def test_hostile_job_ids_never_become_paths(runtime) -> None:  # type: ignore[no-untyped-def]
    for bad in ("../x", "a/b", ".hidden", ""):
        spec = make_spec(["/bin/true"])
        with pytest.raises(JobRejected):
            runtime.create(JobSpec(**{**spec.__dict__, "id": bad}), "h")


def test_stages_work_from_fresh_processes(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Given a sandbox made here, when another process executes it, then this one collects its output.
    spec = make_spec(["/usr/bin/python3", "-c", "import os; os.makedirs('output'); "
                      "open('output/r.txt','w').write(open('in/data.txt').read().upper())"])
    handle = runtime.create(spec, "h")
    runtime.put_file(handle, "in/data.txt", io.BytesIO(b"hello"), 0o644)
    code = (
        "import json,sys\n"
        "from config.settings import load_settings\n"
        "from sandbox.runtimes.local import LocalRuntime\n"
        "from sandbox.runtimes.base import SandboxHandle\n"
        "from sandbox.spec import JobSpec\n"
        "h, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "rt = LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[3]}))\n"
        "print(json.dumps(rt.execute(SandboxHandle.from_dict(h), JobSpec.from_dict(s), lambda *a: None).to_dict()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(handle.to_dict()), json.dumps(spec.to_dict()),
                           settings.work_dir], cwd=REPO, capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"})
    assert json.loads(done.stdout)["outcome"] == "succeeded", done.stderr
    files = {f.relpath: f.open().read() for f in runtime.collect(handle, ("output",))}
    assert files == {"output/r.txt": b"HELLO"}


def test_execute_redelivered_never_runs_twice(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "echo run >> count; cat count | wc -l"])
    handle = runtime.create(spec, "h")
    first = runtime.execute(handle, spec, lambda s, c: None)
    second = runtime.execute(handle, spec, lambda s, c: None)
    assert first == second and first.outcome == "succeeded"
    assert runtime.logs(handle)["stdout"].read() == b"1\n"


def test_put_file_strips_special_bits_and_owns_by_sandbox_uid(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "stat -c '%a %u' in/deep/x.sh; ./in/deep/x.sh"])
    handle = runtime.create(spec, "h")
    assert runtime.put_file(handle, "in/deep/x.sh", io.BytesIO(b"#!/bin/sh\necho ran\n"), 0o6755) == 19
    result = runtime.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "succeeded"
    assert runtime.logs(handle)["stdout"].read() == f"755 {INSIDE_UID}\nran\n".encode()
    host_uid = json.load(open(os.path.join(settings.work_dir, "run", handle.sandbox_id, "meta.json")))["uid"]
    st = os.stat(os.path.join(settings.work_dir, "run", handle.sandbox_id, "mnt", "workspace", "in", "deep", "x.sh"))
    assert (st.st_uid, st.st_gid) == (host_uid, host_uid)  # on the host: the sandbox's own uid


@pytest.mark.parametrize("relpath", ["/etc/x", "../x", "a/../../x", "a//b", ""])
def test_put_file_rejects_escaping_paths(runtime, relpath: str) -> None:  # type: ignore[no-untyped-def]
    handle = runtime.create(make_spec(["/bin/true"]), "h")
    with pytest.raises(JobRejected):
        runtime.put_file(handle, relpath, io.BytesIO(b"x"), 0o644)


def test_put_file_never_follows_a_planted_symlink(runtime) -> None:  # type: ignore[no-untyped-def]
    outside = tempfile.mkdtemp(dir="/tmp")
    target = os.path.join(outside, "host.txt")
    with open(target, "w") as f:
        f.write("host")
    result, _, _, handle = sh(runtime, f"ln -s {target} file; ln -s {outside} dir")
    assert result.outcome == "succeeded"
    for relpath in ("file", "dir/new.txt"):
        with pytest.raises((OSError, JobRejected)):
            runtime.put_file(handle, relpath, io.BytesIO(b"pwned"), 0o644)
    assert open(target).read() == "host" and os.listdir(outside) == ["host.txt"]
    shutil.rmtree(outside)


def test_environment_is_only_the_job_s_plus_fixed(runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WORKER_SECRET", "s3cr3t-token")
    result, out, _, _ = sh(runtime, "env; tr '\\0' '\\n' < /proc/1/environ", env={"GREETING": "hi", "PATH": "/evil"})
    assert result.outcome == "succeeded"
    lines = set(out.decode().split())
    assert {"GREETING=hi", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/workspace", "LANG=C.UTF-8",
            "TMPDIR=/tmp"} <= lines
    assert b"s3cr3t" not in out and b"WORKER_SECRET" not in out and b"/evil" not in out


def test_exit_codes_are_data(runtime) -> None:  # type: ignore[no-untyped-def]
    assert sh(runtime, "exit 3")[0].exit_code == 3
    result = sh(runtime, "exit 137")[0]
    assert (result.outcome, result.exit_code) == ("failed", 137)  # 137 alone is never an OOM


def test_output_is_streamed_and_capped_with_a_marker(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a; echo oops >&2"])
    handle = runtime.create(spec, "h")
    seen: dict[str, int] = {"stdout": 0, "stderr": 0}
    result = runtime.execute(handle, spec, lambda s, c: seen.__setitem__(s, seen[s] + len(c)))
    assert result.stdout_truncated and not result.stderr_truncated and result.stdout_bytes == 3_000_000
    assert any(e["type"] == "output_truncated" for e in result.security_events)
    stored = runtime.logs(handle)["stdout"].read()
    assert stored.startswith(b"a" * settings.max_log_bytes) and b"truncated" in stored[settings.max_log_bytes:]
    assert len(stored) < settings.max_log_bytes + 200 and seen["stdout"] == len(stored)
    assert runtime.logs(handle)["stderr"].read() == b"oops\n"


def test_collect_yields_only_regular_files_within_caps(runtime) -> None:  # type: ignore[no-untyped-def]
    result, _, _, handle = sh(runtime, "mkdir -p output/sub artifacts; echo a > output/a; echo b > output/sub/b; "
                              "ln -s /etc/shadow output/shadow; ln -s /etc output/etcdir; mkfifo output/fifo; "
                              "head -c 1100000 /dev/zero > output/big; for i in 1 2 3 4 5 6; do echo $i > artifacts/$i; done")
    assert result.outcome == "succeeded"
    files = runtime.collect(handle, ("output", "artifacts", "missing"))
    got = {f.relpath: f.open().read() for f in files}
    assert got["output/a"] == b"a\n" and got["output/sub/b"] == b"b\n"
    assert len(got) == 5 and not any("shadow" in p or "etcdir" in p or "fifo" in p for p in got)
    reasons = {s["path"]: s["reason"] for s in files.skipped}
    assert reasons["output/shadow"] == "symlink" and reasons["output/etcdir"] == "symlink"
    assert reasons["output/big"] == "max_output_file_bytes" and reasons["output/fifo"] == "not a regular file"
    assert list(reasons.values()).count("max_output_files") == 3


def test_collect_refuses_a_symlinked_top_dir(runtime) -> None:  # type: ignore[no-untyped-def]
    _, _, _, handle = sh(runtime, "ln -s /etc output")
    files = runtime.collect(handle, ("output",))
    assert list(files) == [] and files.skipped == [{"path": "output", "reason": "symlink or not a directory"}]


def test_kill_from_another_process_cancels(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "echo started; sleep 60"], timeout_s=60)
    handle = runtime.create(spec, "h")
    box: dict[str, ExecResult] = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", runtime.execute(handle, spec, lambda s, c: None)))
    worker.start()
    log = os.path.join(settings.work_dir, "run", handle.sandbox_id, "stdout")
    for _ in range(500):
        if os.path.exists(log) and os.path.getsize(log):
            break
        time.sleep(0.02)
    code = ("import json,sys\nfrom config.settings import load_settings\n"
            "from sandbox.runtimes.local import LocalRuntime\nfrom sandbox.runtimes.base import SandboxHandle\n"
            "LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[2]})).kill(SandboxHandle.from_dict(json.loads(sys.argv[1])))\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(handle.to_dict()), settings.work_dir],
                   cwd=REPO, check=True, env={"PATH": "/usr/bin:/bin"})
    worker.join(30)
    assert box["r"].outcome == "cancelled" and box["r"].duration_s < 60


def test_kill_before_execute_means_it_never_runs(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", "echo ran"])
    handle = runtime.create(spec, "h")
    runtime.kill(handle)
    assert runtime.execute(handle, spec, lambda s, c: None).outcome == "cancelled"
    assert runtime.logs(handle)["stdout"].read() == b""


def test_a_kill_while_the_launcher_is_still_joining_its_cgroups_still_cancels(runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sandbox.runtimes import executor

    # Widen the window between "the launcher started" and "it joined the job's cgroups" to 300 ms.
    monkeypatch.setattr(executor, "_JOIN_THEN_EXEC", "sleep 0.3; " + executor._JOIN_THEN_EXEC)
    spec = make_spec(["/bin/sleep", "30"], timeout_s=40)
    handle = runtime.create(spec, "h")
    results: list[ExecResult] = []
    worker = threading.Thread(target=lambda: results.append(runtime.execute(handle, spec, lambda s, c: None)))
    worker.start()
    time.sleep(0.1)  # the launcher is running but not yet in the cgroup
    runtime.kill(handle)
    worker.join(35)
    assert results and results[0].outcome == "cancelled", results
    assert results[0].duration_s < 20


def _uid_of(rt, handle: SandboxHandle) -> int:  # type: ignore[no-untyped-def]
    with open(os.path.join(rt.run_dir, handle.sandbox_id, "meta.json"), encoding="utf-8") as f:
        return int(json.load(f)["uid"])


def _held(rt) -> dict[int, str]:  # type: ignore[no-untyped-def]
    """uid -> sandbox id of every allocation entry."""
    d = os.path.join(rt.run_dir, ".uids")
    return {int(name): os.readlink(os.path.join(d, name)) for name in os.listdir(d)}


def test_concurrent_sandboxes_run_as_distinct_host_uids_and_destroy_releases_them(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    script = "sleep 0.3; id -u; touch mine"
    specs = [make_spec(["/bin/sh", "-c", script]) for _ in range(4)]
    handles = [runtime.create(s, "h") for s in specs]
    uids = [_uid_of(runtime, h) for h in handles]
    first = settings.sandbox_uid
    assert len(set(uids)) == 4 and all(first <= u < first + settings.sandbox_uid_count for u in uids), uids
    assert _held(runtime) == {u: h.sandbox_id for u, h in zip(uids, handles)}
    st = os.stat(os.path.join(runtime.run_dir, ".uids"))
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    threads = [threading.Thread(target=runtime.execute, args=(h, s, lambda *a: None)) for h, s in zip(handles, specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for h, u in zip(handles, uids):
        assert runtime.logs(h)["stdout"].read() == f"{INSIDE_UID}\n".encode()  # the namespace's view
        mnt = os.path.join(runtime.run_dir, h.sandbox_id, "mnt")
        assert os.stat(os.path.join(mnt, "workspace", "mine")).st_uid == u  # the kernel's: the host uid
        for sub in ("workspace", "tmp"):
            st = os.stat(os.path.join(mnt, sub))
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (u, u, 0o700)
    runtime.destroy(handles[0])
    assert uids[0] not in _held(runtime) and len(_held(runtime)) == 3
    for h in handles[1:]:
        runtime.destroy(h)
    assert _held(runtime) == {}


def test_a_redelivered_create_keeps_its_uid(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/true"])
    first = runtime.create(spec, "h")
    uid = _uid_of(runtime, first)
    assert runtime.create(spec, "h") == first and _uid_of(runtime, first) == uid
    assert _held(runtime) == {uid: first.sandbox_id}
    runtime.destroy(first)
    assert _held(runtime) == {}


def test_destroy_of_a_half_made_sandbox_releases_its_uid(runtime) -> None:  # type: ignore[no-untyped-def]
    # A worker that died after taking the uid but before meta.json: destroy must still free it.
    spec = make_spec(["/bin/true"])
    handle = runtime.create(spec, "h")
    uid = _uid_of(runtime, handle)
    os.unlink(os.path.join(runtime.run_dir, handle.sandbox_id, "meta.json"))
    other = runtime.create(make_spec(["/bin/true"]), "h")
    runtime.destroy(handle)
    assert _held(runtime) == {_uid_of(runtime, other): other.sandbox_id} and uid != _uid_of(runtime, other)
    assert not os.path.exists(os.path.join(runtime.run_dir, handle.sandbox_id))
    runtime.destroy(other)


def test_no_free_uid_is_transient_and_takes_nobody_else_s(settings) -> None:  # type: ignore[no-untyped-def]
    from config.settings import load_settings
    from sandbox.runtimes.local import LocalRuntime

    one = load_settings({"SANDBOX_WORK_DIR": settings.work_dir, "SANDBOX_UID": "70000", "SANDBOX_UID_COUNT": "1"})
    rt = LocalRuntime(one)
    live = rt.create(make_spec(["/bin/true"]), "h")
    assert _uid_of(rt, live) == 70000
    spec = make_spec(["/bin/sh", "-c", "id -u; stat -c %u ."])
    with pytest.raises(RuntimeUnavailable, match="SANDBOX_UID_COUNT"):
        rt.create(spec, "h")
    assert not os.path.exists(os.path.join(rt.run_dir, f"sbx-{spec.id}"))
    assert _held(rt) == {70000: live.sandbox_id}  # the failed create left the live sandbox's uid alone
    rt.destroy(live)
    handle = rt.create(spec, "h")  # the stage's retry, once a uid is free again
    assert _uid_of(rt, handle) == 70000
    assert rt.execute(handle, spec, lambda *a: None).outcome == "succeeded"
    assert rt.logs(handle)["stdout"].read() == f"{INSIDE_UID}\n{INSIDE_UID}\n".encode()  # inside view
    rt.destroy(handle)
    assert _held(rt) == {}


def test_the_work_dir_must_be_searchable_by_every_uid_of_the_range(settings) -> None:  # type: ignore[no-untyped-def]
    from config.settings import load_settings
    from sandbox.errors import ConfigError
    from sandbox.runtimes.local import LocalRuntime

    work = os.path.join(settings.work_dir, "owned")
    os.mkdir(work, 0o700)
    os.chown(work, 70000, 70000)  # searchable by its owner only
    env = {"SANDBOX_WORK_DIR": work, "SANDBOX_UID": "70000"}
    LocalRuntime(load_settings({**env, "SANDBOX_UID_COUNT": "1"}))  # the range is just the owner: fine
    with pytest.raises(ConfigError, match="SANDBOX_WORK_DIR") as caught:
        LocalRuntime(load_settings({**env, "SANDBOX_UID_COUNT": "2"}))  # uid 70001 could not reach it
    assert "SANDBOX_UID_COUNT 2" in str(caught.value)
    os.chmod(work, 0o711)
    LocalRuntime(load_settings({**env, "SANDBOX_UID_COUNT": "2"}))


def test_a_command_that_ends_on_its_own_before_the_kill_lands_is_recorded_as_it_ended(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # The cancel marker is written just before the kill; a command that exits 0 in between is not
    # "cancelled" (the issue: 7 of 20 commands ran to completion yet were recorded cancelled).
    spec = make_spec(["/bin/sh", "-c", "sleep 0.5; echo done"], timeout_s=20)
    handle = runtime.create(spec, "h")
    results: list[ExecResult] = []
    worker = threading.Thread(target=lambda: results.append(runtime.execute(handle, spec, lambda s, c: None)))
    worker.start()
    time.sleep(0.2)
    open(os.path.join(settings.work_dir, "run", handle.sandbox_id, "cancelled"), "w").close()  # the kill never lands
    worker.join(30)
    assert results and results[0].outcome == "succeeded" and results[0].exit_code == 0, results
