"""What only the Fly runtime has: Machines API faults in a real pipeline, capacity, a machine that never
starts, an agent that dies mid-job, the orphan sweep by metadata, API calls per job, and secrets."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from sandbox.runtimes.fly import SERVICE, agent_token, machine_name
from tests.conftest import new_job_id, wait_for
from tests.e2e.conftest import FLY_AGENT_SECRET, FLY_APP, FLY_TOKEN
from tests.e2e.test_pipeline import HELLO, assert_cleaned_up
from tests.support.fakefly import agent_requests, kill_agent

pytestmark = pytest.mark.runtimes("fly")


def test_happy_path_takes_four_machines_api_calls(submit, fake_fly, stack_env, redis_client):
    fake_fly.requests.clear()  # only this job's calls (a worker starting lists once for its metrics)
    record = submit({**HELLO, "id": new_job_id("calls")})
    assert record["status"] == "succeeded", record
    ops = [r["op"] for r in fake_fly.requests]
    assert ops == ["Machines_list", "Machines_create", "Machines_wait", "Machines_delete"], ops
    # the agent: /health once when create waits for it and once when the logs are opened (did a setup
    # run?); collect asks none (the agent itself answers 409 on /outputs while the command runs)
    [machine] = fake_fly.machine_of(record["id"])
    routes = Counter(agent_requests(machine))
    assert routes["GET /health 200"] == 2 and routes["GET /outputs 200"] == 1, routes
    assert not [r for r in routes if not r.endswith(" 200")], routes
    assert record["sandbox"]["runtime"] == "fly" and "rounded up" in record["sandbox"]["data"]["sizing"]
    assert_cleaned_up(record, stack_env, redis_client)


def test_throttling_5xx_and_a_lost_create_answer_still_end_with_one_machine(submit, fake_fly):
    fake_fly.fail("GET", "/machines", status=429, times=2)  # no Retry-After: backoff with jitter
    fake_fly.fail("POST", "/machines", "reset_after")  # Fly made it, the answer was lost
    fake_fly.fail("GET", "/wait", status=503, times=2)
    fake_fly.fail("GET", "/wait", status=408, times=1, body={"error": "deadline_exceeded"})
    job_id = new_job_id("faults")
    record = submit({"id": job_id, "command": "ls"})
    assert record["status"] == "succeeded", record
    assert len(fake_fly.machine_of(job_id)) == 1
    assert [r["status"] for r in fake_fly.requests if r["op"] == "Machines_create"] == [0]  # reset, not re-sent


def test_a_full_region_moves_the_machine_to_the_next_one(submit, fake_fly):
    fake_fly.no_capacity = {"ams"}
    record = submit({"id": new_job_id("cap"), "command": "ls"})
    assert record["status"] == "succeeded", record
    assert record["sandbox"]["data"]["region"] == "fra"


def test_no_capacity_in_any_region_ends_the_job_error_with_the_reason(submit, fake_fly, stack_env, redis_client):
    fake_fly.no_capacity = {"ams", "fra"}
    record = submit({"id": new_job_id("nocap"), "command": "ls"})
    assert record["status"] == "error" and record["error"]["stage"] == "create"
    assert "insufficient_capacity" in record["error"]["message"] and "fra" in record["error"]["message"]
    assert_cleaned_up(record, stack_env, redis_client)


def test_a_machine_that_never_starts_is_destroyed_and_the_job_ends_error(submit, fake_fly, stack_env, redis_client):
    fake_fly.start_delay_s = float("inf")
    job_id = new_job_id("nostart")
    record = submit({"id": job_id, "command": "ls"})
    assert record["status"] == "error"
    assert "did not start within 8 s" in record["error"]["message"]
    assert [m.state for m in fake_fly.machine_of(job_id)] == ["destroyed"]
    assert_cleaned_up(record, stack_env, redis_client)


def test_an_agent_that_dies_mid_job_ends_it_error_and_the_machine_is_gone(celery_client, worker, fake_fly,
                                                                          stack_env, redis_client):
    job_id = new_job_id("agentdied")
    pending = celery_client.send_task("sandbox.submit", args=[json.dumps(
        {"id": job_id, "timeout": 60, "command": "python3 -c \"import time; print('up', flush=True); time.sleep(30)\""})])
    wait_for(lambda: redis_client.xlen(f"sandbox:job:{job_id}:logs") >= 1, timeout_s=60)
    [machine] = fake_fly.machine_of(job_id)
    kill_agent(machine)  # the VM's main process is gone: auto_destroy ends the machine

    record = pending.get(timeout=120)
    assert record["status"] == "error", record
    assert "stopped answering" in record["outcome"]["reason"]
    assert record["stages"]["execute"]["duration_s"] < 25  # not waited out
    assert_cleaned_up(record, stack_env, redis_client)


def test_orphan_sweep_destroys_ours_that_ended_or_expired_and_never_touches_others(celery_client, worker, fake_fly,
                                                                                  sweeps_due):
    now = time.time()

    def machine(job: str, created_s_ago: float, expires_in_s: float, service: str | None = SERVICE):
        meta = {"sandbox_job": job, "sandbox_created_at": f"{now - created_s_ago:.0f}",
                "sandbox_expires_at": f"{now + expires_in_s:.0f}"}
        if service:
            meta["sandbox_service"] = service
        return fake_fly._create({"name": machine_name(job), "region": "ams", "skip_launch": True,
                                 "config": {"image": "x", "metadata": meta}})

    expired = machine(new_job_id("expired"), 5000, -1000)
    unknown_old = machine(new_job_id("unknown"), 1000, 3000)  # no record, made long ago
    young = machine(new_job_id("young"), 1, 3000)  # no record yet: its create may be under way
    foreign = machine(new_job_id("foreign"), 5000, -1000, service=None)
    foreign_service = machine(new_job_id("other"), 5000, -1000, service="someone-else")
    try:
        celery_client.send_task("sandbox.sweep_orphans").get(timeout=30)
        wait_for(lambda: expired.state == "destroyed" and unknown_old.state == "destroyed", timeout_s=30)
        time.sleep(1)
        assert young.state == foreign.state == foreign_service.state == "created"
    finally:
        for m in (young, foreign, foreign_service):
            fake_fly._destroy(m)


def test_no_secret_appears_in_any_record_log_event_result_or_request(submit, celery_client, worker, fake_fly,
                                                                     redis_client, session_dir):
    ok = submit({**HELLO, "id": new_job_id("secret")})
    job_id = new_job_id("secretdied")
    pending = celery_client.send_task("sandbox.submit", args=[json.dumps(
        {"id": job_id, "command": "python3 -c \"import time; print('up', flush=True); time.sleep(30)\""})])
    wait_for(lambda: redis_client.xlen(f"sandbox:job:{job_id}:logs") >= 1, timeout_s=60)
    kill_agent(fake_fly.machine_of(job_id)[0])  # an error path too: its exception messages are searched
    failed = pending.get(timeout=120)
    assert ok["status"] == "succeeded" and failed["status"] == "error"

    secrets = {"fly api token": FLY_TOKEN, "agent secret": FLY_AGENT_SECRET}
    for jid in (ok["id"], job_id):
        secrets[f"agent token of {jid}"] = agent_token(FLY_AGENT_SECRET, FLY_APP, machine_name(jid))
    corpus = list(_everything(redis_client, fake_fly, session_dir))
    # the search reaches what it claims to: both records, the agents' and the worker's logs
    assert all(any(jid in text for where, text in corpus if where.startswith("redis")) for jid in (ok["id"], job_id))
    assert any("agent-" in where for where, _ in corpus) and any("worker" in where for where, _ in corpus)
    found = {name: where for where, text in corpus for name, secret in secrets.items() if secret in text}
    assert not found, found


def _everything(redis_client, fake_fly, session_dir):
    """(where, text) for every Redis value (records, events, log streams, Celery results: what
    Flower shows), every worker and agent log, and every request the Fly API received."""
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key).decode()
        value = {"string": lambda: redis_client.get(key), "hash": lambda: redis_client.hgetall(key),
                 "list": lambda: redis_client.lrange(key, 0, -1), "set": lambda: redis_client.smembers(key),
                 "zset": lambda: redis_client.zrange(key, 0, -1), "stream": lambda: redis_client.xrange(key)}.get(kind)
        yield f"redis {key!r}", repr(value() if value else None) + repr(key)
    for log in session_dir.glob("*.log"):
        yield str(log), log.read_text(errors="replace")
    for m in list(fake_fly.machines.values()) + list(fake_fly.destroyed.values()):
        if m.log_path:
            yield m.log_path, open(m.log_path, errors="replace").read()
    yield "fly requests", json.dumps(fake_fly.requests, default=str)


def test_throttling_past_the_budget_ends_the_job_error_with_the_reason_on_its_record(stack_env, fake_fly):
    from config.settings import load_settings
    from config.wiring import build_services
    from sandbox import lifecycle
    from sandbox.errors import RuntimeUnavailable

    svc = build_services(load_settings({**stack_env, "SANDBOX_FLY_RETRY_BUDGET": "1"}), host="budget-node")
    job_id = new_job_id("budget")
    lifecycle.submit(svc, {"id": job_id, "command": "ls"}, "task-1")
    fake_fly.fail("GET", "/machines", status=429, retry_after="0.3", times=1000)
    with pytest.raises(RuntimeUnavailable) as caught:
        lifecycle.create(svc, job_id)  # what the stage's last retry meets
    record = lifecycle.fail(svc, job_id, "create", caught.value)
    assert record["status"] == "error"
    message = record["error"]["message"]
    assert "gave up after" in message and "429" in message and FLY_TOKEN not in json.dumps(record)


def test_collect_ends_a_command_its_lost_worker_left_running_then_lists_its_outputs(stack_env, fake_fly):
    # Given a command running on alone in its machine (the worker driving execute was lost), when
    # collect runs, then the agent's 409 on /outputs makes it kill the command, wait for its ending
    # and list what it wrote, as the local runtime's collect does.
    from config.settings import load_settings
    from sandbox.runtimes.fly import FlyRuntime
    from sandbox.spec import parse_job

    settings = load_settings(stack_env)
    runtime = FlyRuntime(settings)
    job = parse_job({"id": new_job_id("ranon"), "timeout": 60, "command": (
        "python3 -c \"import os, time; os.makedirs('output'); open('output/p.txt', 'w').write('partial'); "
        "print('up', flush=True); time.sleep(50)\"")}, settings)
    handle = runtime.create(job, "test-host")
    try:
        up, ended = threading.Event(), []
        follower = threading.Thread(target=lambda: ended.append(runtime._agent(handle).execute(
            lambda stream, data: up.set())), daemon=True)
        follower.start()
        assert up.wait(30)
        files = runtime.collect(handle, ("output",))
        assert [(f.relpath, f.size) for f in files] == [("output/p.txt", 7)]
        follower.join(10)
        assert ended and ended[0].outcome == "cancelled", ended
        [machine] = fake_fly.machine_of(job.id)

        def routes_so_far() -> list[str]:
            return [r for r in agent_requests(machine) if "/outputs" in r or "/kill" in r]

        # the agent logs a request after answering it: its last line may trail collect's return
        wait_for(lambda: len(routes_so_far()) >= 3, timeout_s=10)
        routes = routes_so_far()
        assert routes == ["GET /outputs 409", "POST /kill 200", "GET /outputs 200"], routes
    finally:
        runtime.destroy(handle)
