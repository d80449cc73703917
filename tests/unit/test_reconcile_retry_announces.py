"""Start-up retries the reconcile when Redis drops (ConnectionError/TimeoutError, e.g. Redis
restarting as the node boots): a job an earlier attempt ended (end_if committed) is terminal by the
retry, so the jobs ended are gathered across attempts and every one is announced (the submit's
result, its webhook). The session-7 reviewer's repro (tasks/nodes.py announced only the last attempt's)."""
from __future__ import annotations

import json
import subprocess
import time
from types import SimpleNamespace

import redis

from config import load_settings
from sandbox import sweeps
from sandbox.services import Services
from sandbox.state import JobStatus, JobStore, new_record


def test_a_reconcile_retried_after_a_redis_drop_announces_the_jobs_its_first_attempt_ended(monkeypatch, redis_url):
    import tasks.nodes as node_start

    node = "boot-retry@test"
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client)
    gone = subprocess.Popen(["true"]); gone.wait()
    job_id = f"f-rec-{time.time_ns()}"
    rec = new_record(job_id, JobStatus.RUNNING)
    rec["submit_task_id"] = "submit-" + job_id
    rec["stages"] = {"execute": {"host": node, "pid": gone.pid, "started_at": time.time() - 5, "attempts": 1}}
    store.create(rec, {})
    svc = Services(settings=load_settings({"SANDBOX_REDIS_URL": redis_url}), store=store, runtime=None,
                   artifacts=None, events=None, host=node, admission=None)

    calls = {"n": 0}

    def sweep_node(svc, booted_at=0.0, now=None, ended=None):  # the second half of sweeps.reconcile
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ConnectionError("Redis restarted while the node booted")  # after end_if committed
        return []

    announced = []
    monkeypatch.setattr(sweeps, "sweep_node", sweep_node)
    monkeypatch.setattr(node_start, "services", lambda: svc)
    monkeypatch.setattr(node_start.nodes, "check_durability", lambda *a, **k: [])
    monkeypatch.setattr(node_start.nodes, "beat", lambda *a, **k: None)
    monkeypatch.setattr(node_start, "consume_own_queues", lambda sender, instance: None)
    monkeypatch.setattr(node_start, "start_endpoint", lambda sender: None)
    monkeypatch.setattr(node_start.transport, "_holder", {})  # (this process takes no messages)
    gave_back = {"n": 0}

    def restore_held(*_a, **_k):  # (its own tests) kombu wraps a Redis drop in OperationalError
        gave_back["n"] += 1
        if gave_back["n"] == 1:
            from kombu.exceptions import OperationalError
            raise OperationalError("Redis dropped while the node gave back held messages")
        return []

    monkeypatch.setattr(node_start.transport, "restore_held", restore_held)
    monkeypatch.setattr(node_start.threading, "Thread", lambda *a, **k: SimpleNamespace(start=lambda: None))
    import tasks.stages
    monkeypatch.setattr(tasks.stages, "announce_end", lambda record: announced.append(record["id"]))
    monkeypatch.setenv("SANDBOX_REDIS_URL", redis_url)
    instance = SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from={}))))

    node_start._start_node(node, instance)

    final = json.loads(client.get(f"sandbox:job:{job_id}"))
    assert final["status"] == "error" and final["error"]["code"] == "worker_lost"  # ended by attempt 1
    assert calls["n"] == 3 and gave_back["n"] == 2  # the start-up retried both drops, never refused
    assert announced == [job_id], f"ended but never announced (waiters, webhook): {announced}"
