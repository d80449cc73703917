"""bench/floor.py, the issue-10 floor bench/e2e.py measures beside the chain and the job: one floor
chain through a real worker (Redis, SeaweedFS, bwrap, cgroups) does what it claims and leaves nothing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery, chain

from bench.floor import floor_signatures
from config.settings import load_settings
from sandbox.runtimes import cgrouphost, rundir
from sandbox.storage import ArtifactStore
from tests.support.services import Worker

QUEUE = "bench-floor"  # its own: the session's worker does not load the bench tasks


@pytest.fixture(scope="module")
def floor_worker(stack_env: dict[str, str], celery_client: Celery, session_dir: Path) -> Iterator[Worker]:
    proc = Worker(stack_env, node="floor@host-f", log_path=session_dir / "worker-floor.log", queue=QUEUE)
    proc.extra_args = ["--include", "bench.noop,bench.floor"]
    proc.start(celery_client)
    yield proc
    proc.stop()


@pytest.mark.runtimes("local")  # a bare local bwrap + cgroup start: no Fly counterpart
def test_a_floor_chain_lists_its_empty_workspace_stores_the_objects_and_leaves_no_cgroup(
        runtime_name: str, floor_worker: Worker, celery_client: Celery, stack_env: dict[str, str]) -> None:
    ended = chain(*floor_signatures(celery_client, QUEUE)).apply_async().get(timeout=60)

    # `ls` ran in the sandbox (the launcher's cgroup join and uid drop under `sh -e`, then bwrap)
    # and listed an empty /workspace: exit 0, nothing on either stream
    assert (ended["exit_code"], ended["stdout"], ended["stderr"], ended["removed"]) == (0, "", "", True), ended
    assert sorted(ended["task_ms"]) == ["cgroup", "remove", "run", "store"]  # what bench/e2e.py prints
    name = ended["name"]
    # the trivial job's writes, and no empty stdout.log (collect stores none)
    assert sorted(key.rsplit("/", 1)[1] for key in ended["stored"]) == ["audit.jsonl", "events.json"]
    listed = {o["key"]: o["size"] for o in ArtifactStore(load_settings(stack_env), actor="test").list_keys(f"jobs/{name}/")}
    assert listed == ended["stored"] and all(size > 500 for size in listed.values())
    # nothing left: the cgroup in every hierarchy, the directory, the uid's claim
    groups = cgrouphost.detect()
    assert [f for f in groups.procs_files(name) if os.path.exists(os.path.dirname(f))] == []
    run_dir = Path(rundir.default_path(stack_env["SANDBOX_WORK_DIR"]))
    assert not (run_dir / name).exists()
    assert [e.name for e in (run_dir / ".uids").iterdir() if os.readlink(e) == name] == []
