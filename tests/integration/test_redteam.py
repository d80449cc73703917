"""Red-team attacks from inside a job against the local runtime and the host code reading its files.

Each test is one attack a hostile job author would try; it fails if the attack works. Attacks the
older suites (test_isolation, test_limits, test_local_runtime) already cover are not repeated.
"""
from __future__ import annotations

import json
import socket
import uuid

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
