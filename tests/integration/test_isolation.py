"""Hostile jobs trying to break out of the local sandbox: each test fails if a guarantee breaks."""
from __future__ import annotations

import json
import os
import socket
import subprocess

from tests.integration.test_local_runtime import run, sh

# Run inside the sandbox with Debian's python3: each probe prints the errno it got (0 = it worked).
PROBES = r"""
import ctypes, errno, json, socket
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def sc(name, nr, *args):
    r = libc.syscall(nr, *args)
    out[name] = 0 if r >= 0 else ctypes.get_errno()
for fam, name in ((40, "AF_VSOCK"), (17, "AF_PACKET"), (38, "AF_ALG"), (15, "AF_KEY")):
    try:
        socket.socket(fam, socket.SOCK_RAW if fam == 17 else socket.SOCK_SEQPACKET if fam == 38 else socket.SOCK_STREAM).close()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
sc("unshare_user", 272, 0x10000000)
sc("unshare_net", 272, 0x40000000)
sc("setns", 308, 0, 0)
r = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None); out["mount"] = 0 if r == 0 else ctypes.get_errno()
sc("umount2", 166, b"/proc", 2)
sc("ptrace_attach", 101, 16, 1, 0, 0)
sc("keyctl", 250, 0, 0, 0, 0)
sc("add_key", 248, b"user", b"k", b"v", 1, 0xfffffffd)
sc("bpf", 321, 0, 0, 0)
sc("io_uring_setup", 425, 8, ctypes.create_string_buffer(120))
sc("perf_event_open", 298, ctypes.create_string_buffer(128), 0, -1, -1, 0)
sc("userfaultfd", 323, 0)
sc("pivot_root", 155, b"/tmp", b"/tmp")
sc("personality_no_aslr", 135, 0x0040000)
sc("kexec_load", 246, 0, 0, 0, 0)
sc("init_module", 175, 0, 0, b"")
print(json.dumps(out))
"""


def test_job_runs_unprivileged_with_no_new_privs_and_seccomp(runtime) -> None:  # type: ignore[no-untyped-def]
    result, out, _, _ = sh(runtime, "id -u; id -g; grep -E '^(NoNewPrivs|Seccomp|CapEff|CapPrm|CapBnd):' /proc/self/status")
    assert result.outcome == "succeeded"
    lines = out.decode().split("\n")
    assert lines[0] == "65534" and lines[1] == "65534"
    status = dict(line.split(":\t") for line in lines[2:] if line)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"


def test_dangerous_syscalls_and_socket_families_are_refused(runtime) -> None:  # type: ignore[no-untyped-def]
    result, out, err, _ = run(runtime, ["/usr/bin/python3", "-c", PROBES])
    assert result.outcome == "succeeded", err
    probes = json.loads(out)
    assert probes and all(code != 0 for code in probes.values()), probes
    for name in ("AF_VSOCK", "AF_PACKET", "AF_ALG", "unshare_user", "keyctl", "bpf", "io_uring_setup",
                 "ptrace_attach", "mount", "setns", "userfaultfd", "personality_no_aslr"):
        assert probes[name] == 1, (name, probes[name])  # EPERM from our filter, not a lucky EINVAL


def test_host_paths_are_invisible_and_base_is_read_only(runtime) -> None:  # type: ignore[no-untyped-def]
    script = ("for p in /root /home /work /var /run /etc/shadow /etc/ssl/private /usr/local/etc/npmrc "
              "/sys/fs/cgroup /root/.pyenv /var/run/redis; do test -e $p && echo VISIBLE $p; done; "
              "for p in /x /usr/x /etc/x /bin/x; do touch $p 2>/dev/null && echo WROTE $p; done; "
              "touch /workspace/ok /tmp/ok && echo writable; cat /etc/passwd; hostname; echo ---; ls /")
    result, out, _, _ = sh(runtime, script)
    text = out.decode()
    assert result.outcome == "succeeded"
    assert "VISIBLE" not in text and "WROTE" not in text and "writable" in text
    assert "sandbox:x:65534" in text and "root:x:0:0" in text
    listing = set(text.split("---\n", 1)[1].split())
    assert listing <= {"bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "workspace"}, listing


def test_proc_shows_only_the_job_and_no_worker_environment(runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SANDBOX_CLOUDFLARE_SECRET_KEY", "worker-secret-value")
    result, out, _, _ = sh(runtime, "ls /proc | grep -E '^[0-9]+$' | wc -l; cat /proc/1/environ /proc/*/environ 2>/dev/null; "
                           "cat /proc/1/cmdline")
    assert result.outcome == "succeeded"
    count = int(out.split(b"\n")[0])
    assert count <= 5  # bwrap's init, sh, and the short-lived helpers of this pipeline
    assert b"worker-secret-value" not in out and b"SANDBOX_" not in out
    assert str(os.getpid()).encode() + b"\n" not in out.split(b"\n")[0:1]


def test_worker_descriptors_do_not_leak_in(runtime) -> None:  # type: ignore[no-untyped-def]
    # Given the worker holds a live loopback connection (as it would to Redis or S3), made inheritable
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    client.set_inheritable(True)
    try:
        result, out, _, _ = sh(runtime, "ls /proc/self/fd; ls -l /proc/self/fd | grep -c socket || true")
    finally:
        client.close()
        server.close()
    fds = out.decode().split("\n")
    assert result.outcome == "succeeded"
    assert sorted(fds[:-2], key=int) == ["0", "1", "2", "3"]  # 3 is ls's own directory handle
    assert fds[-2] == "0"


def test_network_is_loopback_only(runtime) -> None:  # type: ignore[no-untyped-def]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    probe = (f"import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), timeout=2); print('REACHED')\n"
             "except OSError as e: print('refused', e.errno)\n"
             "import os; print(sorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') else 'nosys')\n"
             "try:\n socket.create_connection(('169.254.169.254', 80), timeout=2); print('METADATA')\n"
             "except OSError as e: print('unreachable', e.errno)\n")
    try:
        result, out, err, _ = run(runtime, ["/usr/bin/python3", "-c", probe])
    finally:
        server.close()
    assert result.outcome == "succeeded", err
    assert b"REACHED" not in out and b"METADATA" not in out and b"refused" in out


def test_nothing_survives_into_the_next_job(runtime) -> None:  # type: ignore[no-untyped-def]
    marker = "sleep 987.654"
    result, _, _, first = sh(runtime, f"echo left > /tmp/leftover; echo left > /workspace/leftover; "
                             f"setsid sh -c '{marker}' </dev/null >/dev/null 2>&1 & echo started")
    assert result.outcome == "succeeded"
    assert runtime.cgroups.pids(first.sandbox_id) == []
    host_ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in host_ps
    runtime.destroy(first)
    result, out, _, _ = sh(runtime, f"ls /tmp /workspace; ps -eo args 2>/dev/null | grep -c '{marker}' || true")
    assert result.outcome == "succeeded" and b"leftover" not in out
