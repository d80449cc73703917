"""cgroup2 favordynmods at start-up, against the host's REAL cgroup2 root (the flag is host-wide).

Each test turns the flag off first (a remount without it, every other option kept), so it proves
that the start-up step is what turns it back on; the flag is restored on afterwards whatever
happens (off only costs other processes speed, never correctness). A lock keeps two runs of this
file on one host from toggling it under each other. On 6.18 the remount without the option clears
only the root flag (joins stay cheap: that part is one-way until reboot), which is what mountinfo
shows and these tests check.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from config.settings import load_settings
from sandbox.runtimes import dynmods
from sandbox.runtimes.local import LocalRuntime
from tests.support.services import unavailable

LOCK = "/run/lock/sandbox-favordynmods-test.lock"
REPO = str(Path(__file__).resolve().parents[2])


def _turn_off() -> None:
    dynmods.remount(dynmods.cgroup2_mounts()[0], on=False)
    if dynmods.state() != "off":
        # Newer kernels make favordynmods one-way (the 6.18 per-thread-group rwsem fix): there is no
        # "off" to start from, on any host, so this is a fact of the kernel, not a missing tool.
        pytest.skip("this kernel keeps favordynmods on once set; nothing to turn on")


@pytest.fixture()
def flag_off() -> Iterator[dynmods.Cgroup2Mount]:
    """The host's cgroup2 mount with favordynmods off; on again (and other options unchanged) after."""
    if os.geteuid() != 0:
        unavailable("remounting cgroup2 needs root")
    if not dynmods.supported():
        unavailable("this kernel has no cgroup2 favordynmods")
    if not dynmods.cgroup2_mounts():
        unavailable("no cgroup2 hierarchy is mounted")
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = dynmods.cgroup2_mounts()[0]
        try:
            _turn_off()
            yield before
        finally:
            dynmods.ensure(True)
            after = dynmods.cgroup2_mounts()[0]
            assert dynmods.OPTION in after.super_options
            assert set(after.super_options) | {dynmods.OPTION} == set(before.super_options) | {dynmods.OPTION}
            assert after.mount_options == before.mount_options


def test_runtime_start_turns_favordynmods_on_and_keeps_other_options(flag_off, settings) -> None:
    rt = LocalRuntime(settings)
    assert rt.favordynmods == "enabled"
    now = dynmods.cgroup2_mounts()[0]
    assert dynmods.OPTION in now.super_options
    assert now.mount_options == flag_off.mount_options  # the remount reset no nosuid/nodev/noexec
    assert set(now.super_options) - {dynmods.OPTION} == set(flag_off.super_options) - {dynmods.OPTION}
    assert LocalRuntime(settings).favordynmods == "on"  # already on: nothing to do


def test_setting_off_leaves_the_host_alone(flag_off, settings) -> None:
    off = load_settings({"SANDBOX_WORK_DIR": settings.work_dir, "SANDBOX_CGROUP_FAVOR_DYNMODS": "false"})
    assert LocalRuntime(off).favordynmods == "disabled by setting"
    assert dynmods.state() == "off"


def test_without_cap_sys_admin_it_warns_and_the_runtime_still_starts(flag_off, settings) -> None:
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        from config.settings import load_settings
        from sandbox.runtimes.local import LocalRuntime
        print(LocalRuntime(load_settings({"SANDBOX_WORK_DIR": sys.argv[1]})).favordynmods)
    """)
    # root without CAP_SYS_ADMIN (what a container often is): dropped from bounding and inheritable
    # sets, so the exec'd python has it in no set
    p = subprocess.run(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--",
                        sys.executable, "-c", code, settings.work_dir],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("failed:"), p.stdout
    assert "SANDBOX_CGROUP_FAVOR_DYNMODS" in p.stderr and "RCU grace period" in p.stderr
    assert dynmods.state() == "off"


def test_pure_v1_host_mounts_a_private_cgroup2_for_it(flag_off) -> None:
    # A mount namespace of its own with no cgroup2 visible: what a v1-only host looks like.
    code = textwrap.dedent("""
        import ctypes, sys
        from sandbox.runtimes import dynmods
        for m in dynmods.cgroup2_mounts():
            assert ctypes.CDLL(None).umount2(m.point.encode(), 0) == 0
        assert dynmods.cgroup2_mounts() == []
        print(dynmods.ensure(True))
        assert dynmods.cgroup2_mounts() == []  # the temporary mount is gone again
    """)
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "enabled"
    assert dynmods.state() == "on"  # set from another mount namespace: one root, host-wide
