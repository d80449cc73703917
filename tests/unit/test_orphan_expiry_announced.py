"""The orphan sweep's expiry (sandbox/sweeps.py) ends a non-terminal job `error` with end_if; the
sandbox.sweep_node task announces it (the submit's waiters, the webhook) as sweep_stuck, the
start-up reconcile and give_up do. The session-7 reviewer's repro (it was never announced)."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import redis

from config import load_settings
from sandbox.runtimes.base import SandboxInfo
from sandbox.services import Services
from sandbox.state import JobStatus, JobStore, new_record


def test_a_job_the_orphan_sweep_expires_is_announced(monkeypatch, redis_url):
    import tasks.stages
    import tasks.sweeps as beat_sweeps

    node = "orphan-exp@test"
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client)
    job_id = f"f-exp-{time.time_ns()}"
    now = time.time()
    rec = new_record(job_id, JobStatus.RUNNING)
    rec["submit_task_id"] = "submit-" + job_id
    rec["sandbox"] = {"sandbox_id": f"sbx-{job_id}", "job_id": job_id, "runtime": "local", "host": node,
                      "created_at": now - 4000, "expires_at": now - 4000 + 60 + 900}
    rec["stages"] = {"execute": {"host": node, "pid": 1, "started_at": now - 3990, "attempts": 1}}
    store.create(rec, {})
    info = SandboxInfo(f"sbx-{job_id}", job_id, node, now - 4000, now - 4000 + 60 + 900)
    destroyed = []
    runtime = SimpleNamespace(name="local", pinned=True, list_sandboxes=lambda: [info],
                              destroy=lambda h: destroyed.append(h.sandbox_id), reap_incomplete=lambda older_than: [])
    svc = Services(settings=load_settings({"SANDBOX_REDIS_URL": redis_url}), store=store, runtime=runtime,
                   artifacts=None, events=None, host=node, admission=None)
    announced = []
    monkeypatch.setattr(beat_sweeps, "services", lambda: svc)
    monkeypatch.setattr(tasks.stages, "announce_end", lambda record: announced.append(record["id"]))
    import tasks.nodes
    monkeypatch.setattr(tasks.nodes, "booted_at", lambda: now - 10)

    beat_sweeps.sweep_node.run()

    final = json.loads(client.get(f"sandbox:job:{job_id}"))
    assert destroyed == [f"sbx-{job_id}"] and final["status"] == "error"
    assert announced == [job_id], "ended by the orphan sweep, never announced to waiters or webhook"
