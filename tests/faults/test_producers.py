"""Stock Celery producers reach a worker unchanged, and a submitter whose job Redis lost is told so
instead of waiting forever (the CLI's `submit --wait` and the Node client)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from celery import Celery

from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean
from tests.support.services import ROOT, unavailable

NODE_DIR = Path(__file__).parent / "node"


def _require_node() -> None:
    why = None
    if not shutil.which("node"):
        why = "node is not installed"
    elif not (NODE_DIR / "node_modules" / "celery-node").is_dir():
        why = "tests/faults/node has no node_modules: run `npm ci --prefix tests/faults/node` (make deps does)"
    if why:
        unavailable(why)


def test_send_task_with_celerys_defaults_reaches_a_worker(start_worker, fault_redis, fault_work_dir):
    start_worker("fw-stock@host-s")  # -Q sandbox, as the Procfile starts it
    stock = Celery("stock", broker=fault_redis.url, backend=fault_redis.url)  # no queue, no serializer set
    job_id = new_job_id("f-stock")
    record = stock.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": "ls"})]).get(timeout=90)
    assert record["id"] == job_id and record["status"] == "succeeded", record
    assert_host_clean(fault_work_dir)


def test_celery_node_with_its_defaults_gets_its_record(start_worker, fault_redis, fault_work_dir):
    _require_node()
    start_worker("fw-node@host-n")
    job_id = new_job_id("f-celerynode")
    done = subprocess.run(["node", "producer.js", fault_redis.url, json.dumps({"id": job_id, "command": "ls"})],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["id"] == job_id and record["status"] == "succeeded", record


def test_a_submitter_whose_job_redis_lost_gets_an_answer(fault_env, fault_redis, fault_client, tmp_path):
    """No worker runs; Redis restarts without its data (what a Redis without AOF does on every
    restart): both waiters stop with a clear error instead of waiting forever."""
    _require_node()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"id": new_job_id("f-vanish"), "command": "ls"}))
    env = {**os.environ, **fault_env}
    cli = subprocess.Popen([sys.executable, "-m", "sandbox", "submit", str(job_file), "--wait", "--timeout", "120"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node_job = new_job_id("f-vanish")
    pending = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": node_job, "command": "ls"})])
    waiter = subprocess.Popen(["node", "waiter.js", fault_redis.url, node_job, pending.id], cwd=NODE_DIR,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: fault_client.connection().default_channel.client.llen("sandbox") >= 2, timeout_s=30)
    time.sleep(1.5)  # both waiters are waiting

    fault_redis.stop()
    shutil.rmtree(fault_redis.base_dir / "appendonlydir", ignore_errors=True)  # the data is lost
    fault_redis.start()

    _, cli_err = cli.communicate(timeout=60)
    assert cli.returncode == 1, cli_err
    assert "lost" in cli_err and "submit it again" in cli_err
    out, err = waiter.communicate(timeout=60)
    answer = json.loads(out or "{}")
    assert answer.get("error") == "JobVanished", (out, err)
