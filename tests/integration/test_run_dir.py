"""The run dir (sandbox/runtimes/rundir.py): per-sandbox state on a tmpfs mounted once, only the disk
image on the work dir's file system, and a plain directory where no tmpfs can be mounted."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from config.settings import load_settings
from sandbox.errors import ConfigError
from sandbox.runtimes import rundir
from sandbox.runtimes.local import LocalRuntime
from tests.integration.test_local_runtime import REPO, make_spec, sh


def _mounts_at(path: str) -> list[list[str]]:
    """mountinfo lines (split) whose mount point is `path`."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split() for line in f if line.split()[4] == path]


def test_the_run_dir_is_one_tmpfs_that_a_restarted_runtime_reuses(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    run = os.path.join(settings.work_dir, "run")
    assert runtime.run_dir == run and runtime.run_dir_in_memory
    [fields] = _mounts_at(run)
    assert fields[fields.index("-") + 1] == "tmpfs"
    assert {"nosuid", "nodev", "noexec"} <= set(fields[5].split(","))
    st = os.stat(run)
    assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_uid == 0
    handle = runtime.create(make_spec(["/bin/true"]), "node-a")
    again = LocalRuntime(settings)  # a restarted worker: never mounts over live sandboxes' state
    assert len(_mounts_at(run)) == 1
    assert [i.sandbox_id for i in again.list_sandboxes()] == [handle.sandbox_id]
    again.destroy(handle)


def test_racing_starts_mount_one_tmpfs(settings) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    run = os.path.join(settings.work_dir, "racing")
    code = "import sys; from sandbox.runtimes import rundir; rundir.ensure(sys.argv[1], sys.argv[2], 1 << 20)"
    procs = [subprocess.Popen([sys.executable, "-c", code, run, settings.work_dir], cwd=REPO) for _ in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    assert len(_mounts_at(run)) == 1  # a second one would hide the first's sandboxes


def test_a_job_leaves_only_its_disk_image_on_the_work_dirs_file_system(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    before = set(os.listdir(settings.work_dir))
    result, out, _, handle = sh(runtime, "echo hi")
    assert result.outcome == "succeeded" and out == b"hi\n"
    # created once per work dir, never per job: the run dir, the images dir, templates, /etc copies
    assert set(os.listdir(settings.work_dir)) == before | {".templates", ".etc"}
    assert os.listdir(os.path.join(settings.work_dir, "images")) == [f"{handle.sandbox_id}.img"]
    d = os.path.join(runtime.run_dir, handle.sandbox_id)
    assert sorted(os.listdir(d)) == ["execute.started", "meta.json", "mnt", "result.json", "stderr", "stdout"]
    runtime.destroy(handle)
    assert os.listdir(os.path.join(settings.work_dir, "images")) == []


def test_without_cap_sys_admin_the_run_dir_is_a_plain_directory(settings) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0 or not shutil.which("capsh"):
        pytest.skip("needs root and capsh to drop CAP_SYS_ADMIN")
    run = os.path.join(settings.work_dir, "plain")
    code = ("import sys, logging; logging.basicConfig(); from sandbox.runtimes import rundir; "
            "print(rundir.ensure(sys.argv[1], sys.argv[2], 1 << 20))")
    done = subprocess.run(["capsh", "--drop=cap_sys_admin", "--", "-c", 'exec "$0" "$@"', sys.executable,
                           "-c", code, run, settings.work_dir], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False" and "SANDBOX_RUN_DIR" in done.stderr  # the warning names the setting
    assert os.path.isdir(run) and not _mounts_at(run)


def test_a_runtime_on_a_plain_run_dir_runs_and_cleans_up(runtime, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(rundir, "ensure", lambda *a: os.makedirs(a[0], 0o711, exist_ok=True) or False)
    plain = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": settings.work_dir,
                                        "SANDBOX_RUN_DIR": os.path.join(settings.work_dir, "plain-run")}))
    assert not plain.run_dir_in_memory and not _mounts_at(plain.run_dir)
    result, out, _, handle = sh(plain, "echo plain")
    assert result.outcome == "succeeded" and out == b"plain\n"
    plain.destroy(handle)
    assert os.listdir(plain.run_dir) == [".uids"] and not os.listdir(os.path.join(plain.run_dir, ".uids"))


def test_a_run_dir_that_would_hide_the_work_dir_is_refused() -> None:
    for bad in ("/var/lib/sandbox", "/var/lib", "/"):
        with pytest.raises(ConfigError, match="SANDBOX_RUN_DIR"):
            load_settings({"SANDBOX_WORK_DIR": "/var/lib/sandbox", "SANDBOX_RUN_DIR": bad})
    with pytest.raises(ConfigError, match="SANDBOX_RUN_DIR"):
        load_settings({"SANDBOX_RUN_DIR": "relative/run"})
    assert load_settings({"SANDBOX_WORK_DIR": "/var/lib/sandbox", "SANDBOX_RUN_DIR": "/run/sandbox"}).run_dir


def test_the_tmpfs_cap_covers_every_admitted_sandbox_with_full_logs() -> None:
    s = load_settings({"SANDBOX_MAX_LOG_BYTES": "1Mi", "SANDBOX_NODE_MAX_SANDBOXES": "64"})
    cap = rundir.size_bytes(s.node_max_sandboxes, s.max_log_bytes)
    assert cap >= 64 * 4 * (1 << 20) and cap < 64 * 5 * (1 << 20) + (1 << 20)


def test_a_create_after_a_reboot_replaces_the_image_the_reboot_left(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    from sandbox.runtimes import diskimage

    spec = make_spec(["/bin/true"])
    handle = runtime.create(spec, "node-a")
    d = os.path.join(runtime.run_dir, handle.sandbox_id)
    diskimage.unmount(os.path.join(d, "mnt"))  # the reboot: mount, cgroup and tmpfs contents gone
    runtime.cgroups.remove(handle.sandbox_id)
    shutil.rmtree(d)
    for entry in os.scandir(os.path.join(runtime.run_dir, ".uids")):
        os.unlink(entry.path)
    again = runtime.create(spec, "node-a")  # a redelivered create of the same job
    assert again.sandbox_id == handle.sandbox_id and os.path.ismount(os.path.join(d, "mnt"))
    assert os.listdir(os.path.join(settings.work_dir, "images")) == [f"{handle.sandbox_id}.img"]
    runtime.destroy(again)


def test_the_image_sweep_leaves_a_live_image_of_another_run_dir_alone(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    """Two workers on one work dir with different SANDBOX_RUN_DIRs (a misconfiguration): each one's
    live images lack a directory in the other's run dir, but are attached, so never reaped."""
    import time

    other = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": settings.work_dir,
                                        "SANDBOX_RUN_DIR": os.path.join(settings.work_dir, "run2")}))
    handle = other.create(make_spec(["/bin/true"]), "node-b")
    try:
        assert runtime.reap_incomplete(older_than=time.time() + 3600) == []
        assert os.path.ismount(os.path.join(other.run_dir, handle.sandbox_id, "mnt"))
    finally:
        other.destroy(handle)
