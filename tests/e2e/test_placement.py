"""Two worker nodes on one queue: every stage runs on the node that holds the job's sandbox."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import new_job_id
from tests.support.services import Worker


@pytest.fixture()
def second_worker(stack_env, celery_client, session_dir, worker):
    proc = Worker(stack_env, node="w2@host-b", log_path=session_dir / "worker-b.log")
    proc.start(celery_client)
    yield proc
    proc.stop()


@pytest.mark.runtimes("local")  # a Fly machine is every worker's: its stages are not pinned
def test_every_stage_runs_where_its_sandbox_is_and_jobs_spread(submit, second_worker):
    jobs = [{"id": new_job_id("place"), "command": "sleep 1"} for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(submit, jobs))

    hosts_used = set()
    for record in records:
        assert record["status"] == "succeeded", record
        sandbox_host = record["sandbox"]["host"]
        assert {stage["host"] for stage in record["stages"].values()} == {sandbox_host}
        hosts_used.add(sandbox_host)
    assert hosts_used == {"w1@host-a", "w2@host-b"}
