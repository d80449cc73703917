"""The local runtime's workspace disk and shared /etc: cloned from templates, attached by ioctl,
never reused, released on destroy, safe under concurrent creates from several processes."""
from __future__ import annotations

import glob
import hashlib
import os
import stat
import subprocess
import sys

from sandbox.runtimes import diskimage, hostetc
from sandbox.runtimes.bwrap import INSIDE_UID
from tests.integration.test_local_runtime import REPO, MiB, sh


def _loops_backed_under(work_dir: str) -> list[str]:
    """Loop devices whose backing file lies under `work_dir` (read from sysfs)."""
    found = []
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path, encoding="utf-8") as f:
                if f.read().strip().startswith(work_dir.rstrip("/") + "/"):
                    found.append(path.split("/")[3])
        except FileNotFoundError:
            continue
    return found


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_each_sandbox_gets_a_fresh_disk_and_the_template_never_changes(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    r1, out1, _, h1 = sh(runtime, "head -c 3000000 /dev/urandom > big; echo x > /tmp/left; sync; ls", disk=64 * MiB)
    assert r1.outcome == "succeeded" and b"big" in out1
    assert r1.resources_used["bytes_written"] >= 3_000_000
    templates = glob.glob(os.path.join(settings.work_dir, diskimage.TEMPLATE_DIR, "*.img"))
    assert len(templates) == 1
    before = _digest(templates[0])
    runtime.destroy(h1)
    r2, out2, _, h2 = sh(runtime, "ls -A /workspace /tmp; df -k /workspace | tail -1", disk=64 * MiB)
    assert r2.outcome == "succeeded"
    assert b"big" not in out2 and b"left" not in out2, out2
    assert r2.resources_used["bytes_written"] < 1_000_000
    assert _digest(templates[0]) == before  # a job's writes never reach the template
    st = os.stat(os.path.join(settings.work_dir, diskimage.TEMPLATE_DIR))
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == 0
    runtime.destroy(h2)


def test_destroy_releases_mount_and_loop_device(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    r, _, _, h = sh(runtime, "echo hi > f")
    assert r.outcome == "succeeded"
    d = os.path.join(settings.work_dir, "run", h.sandbox_id)
    images = os.path.join(settings.work_dir, "images")  # the one per-sandbox file on the work dir's disk
    assert os.path.ismount(os.path.join(d, "mnt"))
    assert os.listdir(images) == [f"{h.sandbox_id}.img"]
    assert len(_loops_backed_under(images)) == 1
    runtime.destroy(h)
    assert not os.path.exists(d) and os.listdir(images) == []
    assert _loops_backed_under(images) == []  # autoclear detached it with the unmount
    runtime.destroy(h)  # a second destroy is a no-op


def test_concurrent_creates_from_several_processes(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    """Loop devices are claimed with LOOP_CTL_GET_FREE + LOOP_CONFIGURE; racing processes retry, never share."""
    code = (
        "import sys, uuid\n"
        "from config.settings import load_settings\n"
        "from sandbox.runtimes.local import LocalRuntime\n"
        "from sandbox.spec import JobSpec, ResourceLimits\n"
        "rt = LocalRuntime(load_settings({'SANDBOX_WORK_DIR': sys.argv[1]}))\n"
        "for i in range(3):\n"
        "    s = JobSpec(id='c' + uuid.uuid4().hex[:12], command='/bin/sh', argv=('/bin/sh', '-c', 'echo $0 > f; cat f'),\n"
        "                environment={}, timeout_s=20, resources=ResourceLimits(1.0, 128 << 20, (32 + i) << 20, 32))\n"
        "    h = rt.create(s, 'host')\n"
        "    r = rt.execute(h, s, lambda *_: None)\n"
        "    assert r.outcome == 'succeeded', r\n"
        "    rt.destroy(h)\n"
        "print('ok')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, settings.work_dir], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == b"ok", err.decode()
    assert _loops_backed_under(settings.work_dir) == []
    assert runtime.list_sandboxes() == []


def test_shared_etc_is_built_once_per_uid_and_read_only_to_jobs(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    etc = hostetc.shared_etc(settings.work_dir, settings.sandbox_uid)
    assert hostetc.shared_etc(settings.work_dir, settings.sandbox_uid) == etc
    other = hostetc.shared_etc(settings.work_dir, settings.sandbox_uid + 1)
    assert other != etc
    with open(os.path.join(other, "passwd"), encoding="utf-8") as f:
        assert f":{settings.sandbox_uid + 1}:" in f.read()
    for dirpath, dirnames, filenames in os.walk(etc):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_uid == 0, (dirpath, name)
            assert stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o022, (dirpath, name)  # links are always 0777
    assert not os.path.exists(os.path.join(etc, "shadow"))
    r, out, _, _ = sh(runtime, "cat /etc/passwd; touch /etc/x 2>/dev/null || echo ro; ls /etc/ssl/certs | head -1")
    assert r.outcome == "succeeded"
    assert f"sandbox:x:{INSIDE_UID}:".encode() in out and b"ro\n" in out


def test_one_template_per_disk_size_serves_every_sandbox_uid(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Two live sandboxes always have distinct host uids; a template per uid would format one per job.
    (ra, out_a, _, ha), (rb, out_b, _, hb) = (sh(runtime, "stat -c %u /workspace /tmp", disk=32 * MiB)
                                              for _ in range(2))
    assert ra.outcome == rb.outcome == "succeeded"
    assert out_a == out_b == f"{INSIDE_UID}\n{INSIDE_UID}\n".encode()
    uids = {h.sandbox_id: os.stat(os.path.join(settings.work_dir, "run", h.sandbox_id, "mnt", "workspace")).st_uid
            for h in (ha, hb)}
    assert len(set(uids.values())) == 2, uids
    assert len(glob.glob(os.path.join(settings.work_dir, diskimage.TEMPLATE_DIR, "*.img"))) == 1
    runtime.destroy(ha)
    runtime.destroy(hb)
