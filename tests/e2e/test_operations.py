"""Operations: Flower behind basic auth, and beat's sweeps run as real tasks on a real worker."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

import celeryconfig
from tests.support.services import ROOT, free_port, stop_process

pytestmark = pytest.mark.runtimes("local")  # nothing here depends on the runtime


def test_every_beat_entry_names_a_task_the_worker_has(worker, celery_client):
    registered = set(celery_client.control.inspect(destination=[worker.node], timeout=5).registered()[worker.node])
    assert {entry["task"] for entry in celeryconfig.beat_schedule.values()} <= registered


def test_orphan_sweep_fans_out_to_every_live_node(worker, celery_client, sweeps_due):
    nodes = celery_client.send_task("sandbox.sweep_orphans").get(timeout=30)
    assert worker.node in nodes


def test_stuck_and_artifact_sweeps_run(worker, celery_client, sweeps_due):
    assert isinstance(celery_client.send_task("sandbox.sweep_stuck").get(timeout=30), list)
    assert celery_client.send_task("sandbox.sweep_artifacts").get(timeout=60) >= 0


@contextlib.contextmanager
def start_flower(stack_env: dict[str, str], db: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    """Flower exactly as the Procfile starts it, on a free port; yields its base URL and credentials."""
    port = free_port()
    env = {**os.environ, **stack_env, "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": "ops:secret",
           "FLOWER_DB": str(db)}
    command = [line.split(":", 1)[1] for line in (ROOT / "Procfile").read_text().splitlines()
               if line.startswith("flower:")][0]
    proc = subprocess.Popen(["bash", "-c", f"exec {command.strip()}"], cwd=ROOT, start_new_session=True,
                            env={**env, "PATH": f"{os.path.dirname(sys.executable)}:{env['PATH']}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/flower"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield base, ("ops", "secret")
    finally:
        stop_process(proc)


def test_flower_serves_the_workers_behind_basic_auth(worker, stack_env, session_dir):
    with start_flower(stack_env, session_dir / "flower.db") as (base, auth):
        assert requests.get(f"{base}/api/workers", timeout=5).status_code == 401
        deadline = time.monotonic() + 30
        workers = {}
        while time.monotonic() < deadline and worker.node not in workers:
            workers = requests.get(f"{base}/api/workers?refresh=1", auth=auth, timeout=10).json()
        assert worker.node in workers
