"""A stack of its own for fault injection: a Redis (AOF) the tests may stop and restart, a work dir,
and real worker processes on Celery's threads pool with short heartbeats (the session's S3)."""
from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis
from celery import Celery

from tests.conftest import E2E_COMMANDS, running_redis
from tests.support.jobs import (  # noqa: F401  (the fault tests import these from here)
    MADE_JOB_IDS, TERMINAL, client_app, lines_of, normal_job_succeeds, record_of, wait_terminal,
)
from tests.support.services import RedisServer, Worker, sandbox_work_dir

HEARTBEAT_S = "1"
DEAD_AFTER_S = "3"
# A directory of this run's own (kept afterwards for reading): tests read these logs back, so a log
# appended to by an earlier run, or by another suite running at the same time, would be miscounted.
LOG_DIR = Path(os.environ.get("SANDBOX_FAULT_LOGS") or tempfile.mkdtemp(prefix="sandbox-fault-logs-", dir="/var/tmp"))
LOG_DIR.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path_factory.mktemp("fault-redis"))


@pytest.fixture(scope="module")
def fault_work_dir() -> Iterator[Path]:
    with sandbox_work_dir("sandbox-faults-") as path:
        yield path
        _destroy_left_sandboxes(path)


def _destroy_left_sandboxes(path: Path) -> None:
    """What a failed test left: destroyed as the runtime does (cgroups and uids too), not just deleted."""
    from config import load_settings
    from sandbox.runtimes.base import SandboxHandle
    from sandbox.runtimes.local import LocalRuntime

    try:
        runtime = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": str(path)}))
    except Exception:  # noqa: BLE001 - no runtime here: nothing could have been made either
        return
    for info in runtime.list_sandboxes():
        runtime.destroy(SandboxHandle(info.sandbox_id, info.job_id, "local", info.host, 0, 0))
    runtime.reap_incomplete(older_than=time.time() + 1)


@pytest.fixture(scope="module")
def fault_env(fault_redis: RedisServer, s3: Any, fault_work_dir: Path) -> dict[str, str]:
    return {
        "SANDBOX_REDIS_URL": fault_redis.url, **s3.env(), "SANDBOX_WORK_DIR": str(fault_work_dir),
        "SANDBOX_ALLOWED_COMMANDS": E2E_COMMANDS, "SANDBOX_DEFAULT_TIMEOUT": "60", "SANDBOX_MAX_TIMEOUT": "600",
        "SANDBOX_DEFAULT_MEMORY": "128Mi", "SANDBOX_DEFAULT_DISK": "16Mi",
        "SANDBOX_HEARTBEAT_INTERVAL": HEARTBEAT_S, "SANDBOX_NODE_DEAD_AFTER": DEAD_AFTER_S,
        "SANDBOX_STUCK_SWEEP_INTERVAL": "0.5", "SANDBOX_ORPHAN_SWEEP_INTERVAL": "0.5",
        "SANDBOX_REQUIRE_DURABLE_REDIS": "true",
        # 20 sleeping jobs at once on one node (the numbers): admission must not hold
        # some back, whatever this test machine's cores and memory
        "SANDBOX_NODE_CPU": "32", "SANDBOX_NODE_MEMORY": "32Gi", "SANDBOX_NODE_MAX_SANDBOXES": "64",
    }


@pytest.fixture(scope="module")
def fault_client(fault_redis: RedisServer) -> Celery:
    return client_app("fault-client", fault_redis.url)


@pytest.fixture()
def fault_redis_client(fault_redis: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(fault_redis.url)


class FaultWorker(Worker):
    """A worker node on the threads pool (what ships), killable by PID."""

    def __init__(self, env: dict[str, str], node: str, log_path: Path, concurrency: int = 4,
                 queue: str = "sandbox") -> None:
        super().__init__(env, node, log_path, concurrency=concurrency, queue=queue)
        self.extra_args = ["--pool=threads"]

    def kill_by_pid(self) -> None:
        """SIGKILL the worker process only (its sandboxes die with it through --die-with-parent)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture()
def start_worker(fault_env: dict[str, str], fault_client: Celery, tmp_path: Path) -> Iterator[Callable[..., FaultWorker]]:
    started: list[FaultWorker] = []

    def start(node: str = "fw@host-f", concurrency: int = 4, queue: str = "sandbox", **env: str) -> FaultWorker:
        worker = FaultWorker({**fault_env, **env}, node, LOG_DIR / f"{node}-{len(started)}.log",
                             concurrency=concurrency, queue=queue)
        started.append(worker)
        worker.start(fault_client)
        return worker

    yield start
    for worker in started:
        worker.stop()


def sandbox_dirs(work_dir: Path) -> list[str]:
    """The sandbox directories in the work dir's run dir (default SANDBOX_RUN_DIR)."""
    run = work_dir / "run"
    return [p.name for p in run.iterdir() if p.name.startswith("sbx-")] if run.is_dir() else []


def assert_host_clean(work_dir: Path) -> None:
    """Nothing of any sandbox is left: dirs, mounts, loop devices, cgroups, host uids, processes."""
    work = os.path.realpath(work_dir)
    assert not sandbox_dirs(work_dir), "sandbox dirs left"
    images = work_dir / "images"
    assert not (images.is_dir() and os.listdir(images)), f"disk images left: {os.listdir(images)}"
    uids = work_dir / "run" / ".uids"
    assert not (uids.is_dir() and os.listdir(uids)), f"host uids still allocated: {os.listdir(uids)}"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:  # the run dir's own tmpfs stays, like /run
        mounts = [line.split()[4] for line in f]
    assert not [m for m in mounts if m.startswith(f"{work}/") and m != f"{work}/run"], "mounts left under the work dir"
    loops = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().startswith(work + "/"):
                loops.append(backing.parent.parent.name)
        except OSError:
            continue
    assert not loops, f"loop devices still attached: {loops}"
    # groups are named after sandbox ids, and every job of these tests has an id starting "f-" made
    # by new_job_id: the cgroup tree is the host's, so only the groups of ids this run made are its
    # own (another suite's fault tests on the same host have "f-" jobs too)
    # (a teardown still under way, in another controller's hierarchy, gets a few seconds to finish)
    def own_groups() -> list[str]:
        return [str(g) for g in Path("/sys/fs/cgroup").glob("*/sandbox/sbx-f-*")
                if g.name.removeprefix("sbx-") in MADE_JOB_IDS]

    deadline = time.monotonic() + 10
    while (groups := own_groups()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not groups, f"job cgroups left: {groups}"
    procs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if work.encode() in cmdline.read_bytes():
                procs.append(cmdline.parent.name)
        except OSError:
            continue
    assert not procs, f"processes of sandboxes still running: {procs}"

