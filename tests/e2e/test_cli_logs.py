"""`python -m sandbox logs ID --follow` follows a job that is already running, to its end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import new_job_id, wait_for
from tests.e2e.test_pipeline import ROOT


def test_logs_follow_prints_lines_from_the_start_and_exits_when_the_job_ends(celery_client, worker, stack_env,
                                                                            redis_client):
    job_id = new_job_id("follow")
    code = "import time\nfor i in range(4):\n    print(f'line {i}', flush=True)\n    time.sleep(0.5)\n"
    pending = celery_client.send_task("sandbox.submit", args=[json.dumps(
        {"id": job_id, "command": "python3 job.py", "files": [{"path": "job.py", "content": code}]})])
    wait_for(lambda: redis_client.xlen(f"sandbox:job:{job_id}:logs") >= 1)  # joins late: line 0 is already out

    follow = subprocess.run([sys.executable, "-m", "sandbox", "logs", job_id, "--follow"], cwd=ROOT,
                            env={**os.environ, **stack_env}, capture_output=True, timeout=60)

    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.decode().splitlines() == [f"[stdout] line {i}" for i in range(4)]
    assert pending.get(timeout=30)["status"] == "succeeded"
