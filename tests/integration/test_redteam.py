"""Red-team attacks from inside a job against the local runtime and the host code reading its files.

Each test is one attack a hostile job author would try; it fails if the attack works. Attacks the
older suites (test_isolation, test_limits, test_local_runtime) already cover are not repeated.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from tests.integration.test_local_runtime import run, sh


def test_a_crashing_job_cannot_dump_core(runtime) -> None:  # type: ignore[no-untyped-def]
    # Attack: raise RLIMIT_CORE (its hard limit came from the worker) and crash. Where core_pattern is
    # a pipe (systemd-coredump, apport) the kernel hands the job's memory to a root helper on the host.
    probe = ("import os, resource\n"
             "try:\n resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2); print('RAISED')\n"
             "except (ValueError, OSError): print('refused')\n"
             "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
             "if os.fork() == 0:\n os.abort()\n"
             "os.wait(); print(sorted(os.listdir('.')))\n")
    result, out, err, _ = run(runtime, ["/usr/bin/python3", "-c", probe])
    assert result.outcome == "succeeded", err
    assert out.split(b"\n")[:3] == [b"refused", b"(0, 0)", b"[]"], out


def test_no_writable_tmpfs_outside_workspace_tmp_and_dev_shm(runtime) -> None:  # type: ignore[no-untyped-def]
    # Attack: /dev and the /usr/local/etc mask are tmpfs mounts of their own, which `--remount-ro /`
    # does not reach: files there sit outside the disk limit and replace the sandbox's devices.
    probe = ("import multiprocessing, os\n"
             "for p in ('/dev/x', '/usr/local/etc/x', '/dev/null2', '/dev/shm/ok'):\n"
             " try:\n  open(p, 'w').close(); print('WROTE', p)\n"
             " except OSError as e: print('refused', p)\n"
             "try:\n os.unlink('/dev/null'); print('UNLINKED')\n"
             "except OSError: pass\n"
             "multiprocessing.Lock(); print('shm works')\n")
    result, out, err, _ = run(runtime, ["/usr/bin/python3", "-c", probe])
    assert result.outcome == "succeeded", err
    assert out.decode().split("\n")[:-1] == ["refused /dev/x", "refused /usr/local/etc/x", "refused /dev/null2",
                                             "WROTE /dev/shm/ok", "shm works"], out


class _Store:
    """Just enough of JobStore for collecting.collect: one record and its spec, in memory."""

    def __init__(self, record: dict, spec: dict) -> None:
        self.record, self._spec = record, spec

    def get(self, job_id: str) -> dict:
        return self.record

    def spec(self, job_id: str) -> dict:
        return self._spec

    def transition(self, job_id: str, status, also=None, **_: object) -> dict:  # type: ignore[no-untyped-def]
        self.record["status"] = status.value
        if also:
            also(self.record)
        return self.record

    def update(self, job_id: str, change) -> dict:  # type: ignore[no-untyped-def]
        change(self.record)
        return self.record


class _Bucket:
    """Just enough of ArtifactStore: keeps what was uploaded, checks keys as the real one does."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def upload(self, key: str, fh, job_id: str, size: int | None = None,  # type: ignore[no-untyped-def]
               skip_empty: bool = False) -> int:
        from sandbox.layout import check_key

        body = fh.read()
        if body or not skip_empty:
            self.objects[check_key(key)] = body
        return len(body)

    def presign_get(self, key: str, job_id: str) -> str:
        return f"https://bucket.invalid/{key}"


def collect_through_lifecycle(runtime, settings, script: str,  # type: ignore[no-untyped-def]
                              collect: tuple[str, ...] | None = None) -> tuple[dict, _Bucket]:
    """Run `script` in a sandbox, then collecting.collect it (`collect`: other dirs than the default);
    returns the record and what was uploaded."""
    from sandbox import collecting
    from sandbox.services import Services
    from sandbox.runtimes.base import ExecResult
    from sandbox.state import JobStatus, new_record
    from tests.integration.test_local_runtime import make_spec

    spec = make_spec(["/usr/bin/python3", "-c", script])
    if collect is not None:
        spec = dataclasses.replace(spec, collect=collect)
    handle = runtime.create(spec, "h")
    result = runtime.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "succeeded", runtime.logs(handle)["stderr"].read()
    record = new_record(spec.id, JobStatus.RUNNING)
    record.update(sandbox=handle.to_dict(), outcome=ExecResult(**result.to_dict()).to_dict())
    bucket = _Bucket()
    svc = Services(settings=settings, store=_Store(record, spec.to_dict()), runtime=runtime,
                   artifacts=bucket, events=None, host="h")
    collecting.collect(svc, spec.id)
    return record, bucket


def test_output_names_that_display_as_something_else_are_refused(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: name an output so that a person sees another name ("Trojan Source"): a right-to-left
    # override shows 'invoice\u202efdp.exe' as 'invoiceexe.pdf'; also a newline and invalid UTF-8.
    script = ("import os; os.makedirs('output')\n"
              "for name in ('ok.txt', 'invoice\\u202efdp.exe', 'zero\\u200bwidth', 'new\\nline', "
              "b'bad\\xffname', 'caf\\u00e9.txt', 'tab\\tname'):\n"
              " open(os.path.join(b'output' if isinstance(name, bytes) else 'output', name), 'w').write('x')\n")
    record, bucket = collect_through_lifecycle(runtime, settings, script)
    assert sorted(a["path"] for a in record["artifacts"]) == ["output/caf\u00e9.txt", "output/ok.txt"]
    assert sorted(k for k in bucket.objects if "/logs/" not in k) == sorted(a["key"] for a in record["artifacts"])
    assert len(record["skipped_outputs"]) == 5
    text = json.dumps(record["skipped_outputs"], ensure_ascii=False)
    assert all(ord(c) >= 0x20 and c not in "\u202e\u200b" for c in text), text  # shown escaped
    text.encode("utf-8")  # no lone surrogates: printable and storable as is


def test_unreadable_setuid_and_hidden_outputs_are_collected_as_plain_bytes(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: mode 000 files, a directory without x, setuid bits: the worker (root) must neither fail
    # on them nor carry the modes anywhere; the bytes alone are uploaded.
    script = ("import os; os.makedirs('output/nox')\n"
              "open('output/nox/f', 'w').write('hidden'); open('output/zero', 'w').write('000')\n"
              "open('output/suid', 'w').write('s'); os.chmod('output/suid', 0o6777)\n"
              "os.chmod('output/zero', 0); os.chmod('output/nox', 0)\n")
    record, bucket = collect_through_lifecycle(runtime, settings, script)
    assert {a["path"]: bucket.objects[a["key"]] for a in record["artifacts"]} == {
        "output/nox/f": b"hidden", "output/suid": b"s", "output/zero": b"000"}
    assert record["skipped_outputs"] == []


def test_running_out_of_inodes_is_reported_as_a_full_disk(runtime) -> None:  # type: ignore[no-untyped-def]
    # Attack: many empty files fill the image's inode table; the job gets ENOSPC with most bytes still
    # free, and the record must still say why.
    script = ("import os\nn = 0\ntry:\n while True:\n  open(f'f{n}', 'w').close(); n += 1\n"
              "except OSError as e: print(e.errno, n > 1000)\n")
    result, out, err, _ = run(runtime, ["/usr/bin/python3", "-c", script], disk=8 << 20)
    assert result.outcome == "succeeded" and out == b"28 True\n", err
    assert "disk_full" in {e["type"] for e in result.security_events}, result.security_events


def test_host_processes_of_the_same_uid_and_host_sockets_are_out_of_reach(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: a host daemon runs as the job's own host uid (as one in the range might, misconfigured):
    # kill(-1) and kill(pid), /proc/<pid>/root of that daemon, the host's abstract unix sockets.
    from tests.integration.test_local_runtime import make_spec

    spec = make_spec(["/usr/bin/python3", "-c", "PROBE", "NAME"])  # argv filled in below
    name = f"redteam-{uuid.uuid4().hex}"
    handle0 = runtime.create(spec, "h")  # the uid is allocated at create; the victim takes the same one
    with open(os.path.join(settings.work_dir, "run", handle0.sandbox_id, "meta.json")) as f:
        uid = str(json.load(f)["uid"])
    victim = subprocess.Popen(["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                               "/bin/sleep", "60"])
    server = socket.socket(socket.AF_UNIX)
    server.bind("\0" + name)
    server.listen()
    probe = ("import ctypes, os, signal, socket, sys\n"
             "pid = int(open('victim.pid').read())\n"
             "for target in (-1, pid):\n"
             " try:\n  os.kill(target, signal.SIGKILL); print('SIGNALLED', target)\n"
             " except OSError as e: print('kill', target, e.errno)\n"
             "print('proc', os.path.exists(f'/proc/{pid}'), os.path.exists(f'/proc/{pid}/root/etc/shadow'))\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect('\\0' + sys.argv[1]); print('CONNECTED')\n"
             "except OSError as e: print('abstract', e.errno)\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "handle = ctypes.create_string_buffer(136); mount_id = ctypes.c_int()\n"
             "ctypes.memmove(handle, (128).to_bytes(4, 'little'), 4)\n"
             "r = libc.syscall(303, -100, b'/usr', handle, ctypes.byref(mount_id), 0)\n"
             "print('name_to_handle_at', r, ctypes.get_errno())\n"
             "r = libc.syscall(304, -100, handle, 0)\n"
             "print('open_by_handle_at', r, ctypes.get_errno())\n")
    try:
        spec = dataclasses.replace(spec, argv=("/usr/bin/python3", "-c", probe, name))
        runtime.put_file(handle0, "victim.pid", io.BytesIO(str(victim.pid).encode()), 0o644)
        result = runtime.execute(handle0, spec, lambda s, c: None)
        out, err = (runtime.logs(handle0)[s].read() for s in ("stdout", "stderr"))
        alive = victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        server.close()
    assert result.outcome == "succeeded", err
    assert alive, "the job killed a host process"
    lines = out.decode().split("\n")
    assert lines[0].startswith("kill -1 ") or lines[0] == "SIGNALLED -1"  # -1 means its own namespace only
    assert lines[1:] == [f"kill {victim.pid} 3", "proc False False", "abstract 111",
                         "name_to_handle_at -1 1", "open_by_handle_at -1 1", ""], out
    runtime.destroy(handle0)


def test_a_job_cannot_take_the_host_s_file_table(runtime) -> None:  # type: ignore[no-untyped-def]
    # Attack: open files in every process the pids limit allows. The file table (fs.file-max) is one
    # per host and no cgroup limits it: with the worker's RLIMIT_NOFILE (20000 here) a 1 GiB job of
    # 128 processes held 1.2M of this host's 2.4M file handles, so two such jobs starve the worker.
    script = ("import os, resource\n"
              "try:\n resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20)); print('RAISED')\n"
              "except (ValueError, OSError): pass\n"
              "r, w = os.pipe()\n"
              "for _ in range(4):\n"
              " if os.fork() == 0:\n"
              "  n = 0\n"
              "  try:\n   while n < 50000: os.open('/dev/null', os.O_RDONLY); n += 1\n"
              "  except OSError: pass\n"
              "  os.write(w, b'%d\\n' % n); os._exit(0)\n"
              "for _ in range(4): os.wait()\n"
              "os.close(w); print(sum(int(x) for x in os.read(r, 1000).split()))\n")
    result, out, err, _ = run(runtime, ["/usr/bin/python3", "-c", script], memory=512 * (1 << 20))
    assert result.outcome == "succeeded", err
    assert b"RAISED" not in out and int(out) <= 4 * 1024, out


INOTIFY_ALL = ("import ctypes, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\nn = 0\n"
               "while libc.inotify_init() >= 0: n += 1\n"
               "print(n, flush=True); time.sleep(float(sys.argv[1]))\n")


def _host_uids(runtime, sandbox_id: str) -> set[int]:  # type: ignore[no-untyped-def]
    """The real host uids of the processes in a sandbox's cgroup, as the kernel sees them."""
    found = set()
    for pid in runtime.cgroups.pids(sandbox_id):
        try:
            with open(f"/proc/{pid}/status") as f:
                found.add(int(next(line for line in f if line.startswith("Uid:")).split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def test_one_job_cannot_starve_a_concurrent_job_of_inotify(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: take every inotify instance the kernel allows the job's host uid (128) and hold them.
    # Each live sandbox has a host uid of its own, so the per-uid counter the holder exhausts is not
    # the one the other job is charged to.
    from tests.integration.test_local_runtime import make_spec

    spec = make_spec(["/usr/bin/python3", "-c", INOTIFY_ALL, "8"])
    handle = runtime.create(spec, "h")
    holder = threading.Thread(target=runtime.execute, args=(handle, spec, lambda s, c: None))
    holder.start()
    log = os.path.join(settings.work_dir, "run", handle.sandbox_id, "stdout")
    try:
        for _ in range(500):
            if os.path.exists(log) and os.path.getsize(log):
                break
            time.sleep(0.01)
        holder_uids = _host_uids(runtime, handle.sandbox_id)
        probe = INOTIFY_ALL.replace("print(n, flush=True)", "print(n, flush=True); open('mine', 'w').close()")
        result, out, err, other = run(runtime, ["/usr/bin/python3", "-c", probe, "0"])
        # the file the job made carries its real host uid (the namespace shows every job as SANDBOX_UID)
        other_uid = os.stat(os.path.join(settings.work_dir, "run", other.sandbox_id, "mnt", "workspace", "mine")).st_uid
    finally:
        runtime.kill(handle)
        holder.join(30)
    assert result.outcome == "succeeded", err
    assert int(open(log).read()) > 100, "the holder did not take the inotify instances"
    assert int(out) > 0, "the other job could not create a single inotify instance"
    first, last = settings.sandbox_uid, settings.sandbox_uid + settings.sandbox_uid_count - 1
    assert len(holder_uids) == 1 and other_uid not in holder_uids, (holder_uids, other_uid)
    assert all(first <= u <= last for u in holder_uids | {other_uid}), (holder_uids, other_uid)
    runtime.destroy(other)
    runtime.destroy(handle)
