"""The Node.js client's own tests (node --test), run against this suite's real Redis and worker."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


def _require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def test_node_client_suite_passes_against_the_real_worker(redis_url, worker, stack_env):
    _require(shutil.which("node") is not None and shutil.which("npm") is not None, "node/npm are not installed")
    _require((NODE_DIR / "node_modules" / "ioredis").is_dir(),
             "clients/node has no node_modules: run `npm ci --prefix clients/node` (make deps does)")
    # The Node webhook receiver needs the worker's secret, and 127.0.0.1 on its allow-list.
    secret = stack_env.get("SANDBOX_WEBHOOK_SECRET", "")
    _require(bool(secret) and "127.0.0.1" in stack_env.get("SANDBOX_WEBHOOK_ALLOWED_HOSTS", ""),
             "stack_env needs SANDBOX_WEBHOOK_SECRET and SANDBOX_WEBHOOK_ALLOWED_HOSTS=127.0.0.1")
    env = {**os.environ, "REDIS_URL": redis_url, "SANDBOX_E2E": "1", "SANDBOX_WEBHOOK_SECRET": secret}
    proc = subprocess.run(["npm", "test", "--silent"], cwd=NODE_DIR, env=env, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(output[-8000:])
        print(worker.tail(80))
    assert proc.returncode == 0, "npm test failed (output above)"
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", output, re.M)}
    # Nothing may have been skipped: a skipped e2e test would pass without proving anything.
    assert counts.get("fail") == 0 and counts.get("skipped") == 0 and counts.get("cancelled") == 0, counts
    assert counts.get("pass", 0) >= 40, counts
    for name in ("a job runs, its lines arrive in order", "cancelling it kills it", "comes back rejected",
                 "receiver verifies the signed terminal record"):
        assert re.search(rf"^\s*ok \d+ - .*{re.escape(name)}", output, re.M), f"{name!r} did not pass"
