"""Admission by node resources: atomic under racing workers, released on every ending, drained in order."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from config import load_settings
from sandbox import lifecycle
from sandbox.admission import Admission, Request, admitted_key, capacity_key
from sandbox.state import JobStore
from tests.conftest import new_job_id, wait_for
from tests.support.jobs import record_of
from tests.e2e.test_worker_lost import restore_unacked_now
from tests.support.services import Worker

SMALL = Request(cpu=0.1, memory_bytes=64 << 20, disk_bytes=16 << 20)


# -- the ledger itself (real Redis, no worker) ----------------------------------------------------

def test_racing_admissions_of_one_node_never_exceed_any_resource(redis_client, redis_url, tmp_path):
    # Given two "workers" of one node (two Admission objects, two connection pools) and 16 threads
    settings = load_settings({"SANDBOX_WORK_DIR": str(tmp_path), "SANDBOX_NODE_CPU": "1", "SANDBOX_CPU_OVERCOMMIT": "1",
                              "SANDBOX_NODE_MEMORY": "1Gi", "SANDBOX_NODE_MAX_SANDBOXES": "50"})
    node = new_job_id("node")
    ledgers = [Admission(redis.Redis.from_url(redis_url), node, settings) for _ in range(2)]
    jobs = [new_job_id("race") for _ in range(200)]
    # When every job (0.1 cpu, 64 MiB) races to be admitted at once
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: ledgers[i % 2].try_admit(jobs[i], SMALL), range(len(jobs))))
    # Then exactly as many as the scarcer resource allows got in (cpu: 1 core / 0.1 = 10; memory: 16)
    assert answers.count("ok") == 10
    assert set(answers) == {"ok", "cpu"}
    assert len(ledgers[0].admitted()) == 10
    # and admitting an admitted job again is a no-op that still says ok (a redelivered create)
    admitted = list(ledgers[0].admitted())
    assert ledgers[1].try_admit(admitted[0], SMALL) == "ok" and len(ledgers[1].admitted()) == 10
    # and a release lets exactly one more in
    ledgers[0].release(admitted[0])
    rest = [j for j in jobs if j not in admitted]
    assert [ledgers[1].try_admit(j, SMALL) for j in rest[:2]] == ["ok", "cpu"]
    redis_client.delete(admitted_key(node))


def test_each_resource_and_the_count_limit_admission(redis_client, tmp_path):
    settings = load_settings({"SANDBOX_WORK_DIR": str(tmp_path), "SANDBOX_NODE_CPU": "2", "SANDBOX_CPU_OVERCOMMIT": "2",
                              "SANDBOX_NODE_MEMORY": "256Mi", "SANDBOX_NODE_DISK": "100Mi",
                              "SANDBOX_NODE_MAX_SANDBOXES": "3"})
    ledger = Admission(redis_client, new_job_id("node"), settings)
    assert ledger.try_admit("a", Request(3.9, 10, 10)) == "ok"  # cpu overcommitted: 2 cores x 2
    assert ledger.try_admit("b", Request(0.2, 10, 10)) == "cpu"
    assert ledger.try_admit("c", Request(0.1, 256 << 20, 10)) == "memory"  # no memory overcommit
    assert ledger.try_admit("d", Request(0.1, 10, 100 << 20)) == "disk"
    assert ledger.try_admit("e", Request(0.01, 10, 10)) == "ok"
    assert ledger.try_admit("f", Request(0.01, 10, 10)) == "ok"
    assert ledger.try_admit("g", Request(0.01, 10, 10)) == "max_sandboxes"
    # the real free space of the work dir's filesystem, whatever SANDBOX_NODE_DISK says
    huge = load_settings({"SANDBOX_WORK_DIR": str(tmp_path), "SANDBOX_NODE_DISK": "1000Ti"})
    assert Admission(redis_client, new_job_id("node"), huge).try_admit("h", Request(0.1, 10, 900 << 40)) == "free_disk"


def test_creates_waiting_for_capacity_are_counted_so_no_submit_overtakes_them(redis_client, tmp_path):
    # sandbox.submit builds a job itself only while no create of its process waits (tasks.stages)
    settings = load_settings({"SANDBOX_WORK_DIR": str(tmp_path), "SANDBOX_NODE_MAX_SANDBOXES": "1"})
    node = new_job_id("node")
    ledger = Admission(redis_client, node, settings)
    assert ledger.admit("held", SMALL, 0.0, lambda: True) and ledger.waiting == 0
    assert not ledger.admit("now", SMALL, 0.0, lambda: True) and ledger.waiting == 0  # one try, no wait
    answers: list[bool] = []
    waiter = threading.Thread(target=lambda: answers.append(ledger.admit("waits", SMALL, 10.0, lambda: True)))
    waiter.start()
    wait_for(lambda: ledger.waiting == 1, timeout_s=5)
    ledger.release("held")  # wakes the waiting create at once
    waiter.join(timeout=5)
    assert answers == [True] and ledger.waiting == 0
    assert set(ledger.admitted()) == {"waits"}
    redis_client.delete(admitted_key(node))


def test_reconcile_keeps_live_and_young_entries_and_releases_the_rest(redis_client, tmp_path):
    ledger = Admission(redis_client, new_job_id("node"), load_settings({"SANDBOX_WORK_DIR": str(tmp_path)}))
    for job in ("live", "young", "ended", "old"):
        ledger.try_admit(job, SMALL)
    stale = json.loads(redis_client.hget(admitted_key(ledger.node), "old"))
    redis_client.hset(admitted_key(ledger.node), "old", json.dumps({**stale, "at": time.time() - 3600}))
    released = ledger.reconcile(["live"], ended=lambda job_id: job_id == "ended")
    assert sorted(released) == ["ended", "old"]
    assert sorted(ledger.admitted()) == ["live", "young"]


def test_impossible_requests_are_rejected_at_submit_naming_the_field(redis_url, tmp_path):
    # a database of its own: live workers of this session publish their (real) capacities in db 0
    # with their heartbeats, and a node big enough makes these requests possible
    redis_client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/15")
    redis_client.flushdb()
    settings = load_settings({"SANDBOX_WORK_DIR": str(tmp_path), "SANDBOX_ALLOWED_COMMANDS": "ls",
                              "SANDBOX_NODE_CPU": "1", "SANDBOX_NODE_MEMORY": "256Mi", "SANDBOX_NODE_DISK": "512Mi"})
    store = JobStore(redis_client)
    svc = lifecycle.Services(settings=settings, store=store, runtime=None, artifacts=None, events=store.events,
                             host="adm@host", admission=Admission(redis_client, "adm@host", settings))
    for resources, field in (({"cpu": "1.5"}, "/resources/cpu"), ({"memory": "512Mi"}, "/resources/memory"),
                             ({"memory": "64Mi", "disk": "1Gi"}, "/resources/disk")):
        record, run = lifecycle.submit(svc, json.dumps({"command": "ls", "resources": resources}), "t")
        assert run is False and record["status"] == "rejected"
        assert record["error"]["field"] == field and record["error"]["rule"] == "above_node_capacity"
    # a bigger node that published its capacity makes the same request possible
    big = new_job_id("big")
    redis_client.sadd("sandbox:nodes", big)
    redis_client.set(capacity_key(big), json.dumps({"cpu": 8, "memory_bytes": 2 << 30, "disk_bytes": 8 << 30}))
    try:
        record, run = lifecycle.submit(svc, json.dumps({"command": "ls", "resources": {"memory": "512Mi"}}), "t")
        assert run is True and record["status"] == "queued"
    finally:
        redis_client.srem("sandbox:nodes", big)
        redis_client.delete(capacity_key(big))


# -- real workers --------------------------------------------------------------------------------

def waiting_creates(worker: Worker) -> float | None:
    """The worker's gauge of creates waiting for admission, as Prometheus scrapes it (None: absent)."""
    text = requests.get(f"{worker.metrics_url}/metrics", timeout=10).text
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == "sandbox_admission_waiting_creates" and s.labels == {"node": worker.node}), None)


def _start(stack_env, celery_client, session_dir, node, queue, tag, **env) -> Worker:
    proc = Worker({**stack_env, **env}, node=node, log_path=session_dir / f"worker-{tag}.log", queue=queue)
    proc.start(celery_client)
    return proc


def test_two_workers_of_one_node_never_hold_more_sandboxes_than_admitted(celery_client, stack_env, session_dir,
                                                                        redis_client):
    node, queue = "w-adm@host-e", "adm-race"
    workers = [_start(stack_env, celery_client, session_dir, node, queue, f"adm-{i}", SANDBOX_NODE_MAX_SANDBOXES="3")
               for i in range(2)]
    peak, peak_live, done = [0], [0], threading.Event()
    jobs = [{"id": new_job_id("adm"), "command": "sleep 1", "resources": {"cpu": "0.1", "memory": "64Mi"}}
            for _ in range(9)]
    dirs = {f"sbx-{j['id']}" for j in jobs}

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], redis_client.hlen(admitted_key(node)))
            live = sum(1 for p in (Path(stack_env["SANDBOX_WORK_DIR"]) / "run").iterdir() if p.name in dirs)
            peak_live[0] = max(peak_live[0], live)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        pending = [celery_client.send_task("sandbox.submit", args=[json.dumps(j)], queue=queue) for j in jobs]
        records = [p.get(timeout=120) for p in pending]
    finally:
        done.set()
        sampler.join()
        for w in workers:
            w.stop()
    assert [r["status"] for r in records] == ["succeeded"] * 9, [r.get("error") for r in records]
    assert 1 <= peak[0] <= 3 and 1 <= peak_live[0] <= 3
    # create starts after admission, cleanup starts before the release: inside each admitted span
    intervals = sorted((r["stages"]["create"]["started_at"], r["stages"]["cleanup"]["started_at"]) for r in records)
    assert max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals) <= 3
    assert redis_client.hlen(admitted_key(node)) == 0


def test_a_job_cancelled_while_waiting_for_admission_ends_cancelled_and_builds_nothing(
        celery_client, stack_env, session_dir, redis_client):
    node, queue = "w-wait@host-f", "adm-wait"
    worker = _start(stack_env, celery_client, session_dir, node, queue, "adm-wait", SANDBOX_NODE_MAX_SANDBOXES="1")
    try:
        holder = {"id": new_job_id("hold"), "command": "sleep 60", "timeout": 120}
        waiter = {"id": new_job_id("wait"), "command": "ls"}
        held = celery_client.send_task("sandbox.submit", args=[json.dumps(holder)], queue=queue)
        wait_for(lambda: record_of(redis_client, holder["id"]).get("status") == "running")
        waiting = celery_client.send_task("sandbox.submit", args=[json.dumps(waiter)], queue=queue)
        # its create is taken and waits for the one slot (what the worker's metrics tell an operator)
        wait_for(lambda: waiting_creates(worker) == 1, timeout_s=30)
        assert record_of(redis_client, waiter["id"])["status"] == "queued"
        assert list(json.loads(redis_client.get(capacity_key(node)) or b"{}")) and \
            set(redis_client.hkeys(admitted_key(node))) == {holder["id"].encode()}

        answer = celery_client.send_task("sandbox.cancel", args=[waiter["id"]], queue=queue).get(timeout=30)
        record = waiting.get(timeout=60)
        assert answer["cancelled"] is True
        assert record["status"] == "cancelled" and record["sandbox"] is None and "create" not in record["stages"]
        assert set(redis_client.hkeys(admitted_key(node))) == {holder["id"].encode()}
        wait_for(lambda: waiting_creates(worker) == 0, timeout_s=10)  # the cancelled create stopped waiting

        celery_client.send_task("sandbox.cancel", args=[holder["id"]], queue=queue).get(timeout=30)
        assert held.get(timeout=60)["status"] == "cancelled"
        assert redis_client.hlen(admitted_key(node)) == 0
    finally:
        worker.stop()


def test_a_killed_workers_admitted_capacity_comes_back(celery_client, stack_env, session_dir, redis_client, redis_url):
    node, queue = "w-kill@host-g", "adm-kill"
    env = {"SANDBOX_NODE_MAX_SANDBOXES": "1"}
    first = _start(stack_env, celery_client, session_dir, node, queue, "adm-kill-1", **env)
    job = {"id": new_job_id("kill"), "command": "sleep 8", "timeout": 20}
    celery_client.send_task("sandbox.submit", args=[json.dumps(job)], queue=queue)
    wait_for(lambda: record_of(redis_client, job["id"]).get("status") == "running", timeout_s=60)
    first.kill()  # SIGKILL mid-execute: the admitted entry stays, nobody released it
    assert redis_client.hexists(admitted_key(node), job["id"])
    # an entry a worker killed mid-create left behind (no sandbox, admitted long ago)
    redis_client.hset(admitted_key(node), "lost-create", json.dumps({"cpu": 0.5, "memory_bytes": 1, "disk_bytes": 1,
                                                                     "at": time.time() - 3600}))
    restore_unacked_now(redis_url)

    second = _start(stack_env, celery_client, session_dir, node, queue, "adm-kill-2", **env)
    try:
        # start-up reconcile drops the dead create's entry; the sandbox that still exists keeps its own
        wait_for(lambda: not redis_client.hexists(admitted_key(node), "lost-create"), timeout_s=30)
        record = wait_for(lambda: (r := record_of(redis_client, job["id"])).get("finished_at") and r, timeout_s=120)
        assert record["status"] == "error"
        wait_for(lambda: redis_client.hlen(admitted_key(node)) == 0, timeout_s=30)
        # the one slot is usable again
        again = celery_client.send_task("sandbox.submit", args=[json.dumps({"id": new_job_id("again"), "command": "ls"})],
                                        queue=queue).get(timeout=60)
        assert again["status"] == "succeeded"
    finally:
        second.stop()


def test_a_node_finishes_its_started_jobs_before_it_creates_new_ones(celery_client, stack_env, session_dir,
                                                                     redis_client):
    # One thread and room for 8 sandboxes: only the queue order decides what runs next.
    node, queue = "w-order@host-h", "adm-order"
    worker = Worker({**stack_env, "SANDBOX_NODE_MAX_SANDBOXES": "8"}, node=node, concurrency=1,
                    log_path=session_dir / "worker-adm-order.log", queue=queue)
    worker.start(celery_client)
    try:
        jobs = [{"id": new_job_id("order"), "command": "ls"} for _ in range(6)]
        pending = [celery_client.send_task("sandbox.submit", args=[json.dumps(j)], queue=queue) for j in jobs]
        records = [p.get(timeout=120) for p in pending]
    finally:
        worker.stop()
    assert all(r["status"] == "succeeded" for r in records)
    spans = sorted((r["stages"]["create"]["started_at"], r["stages"]["cleanup"]["finished_at"]) for r in records)
    # breadth-first (round robin) would create all six before the first cleanup; drained, none overlap
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


@pytest.mark.parametrize("intakes", [("sandbox",), ("adm-x",)])
def test_the_node_queue_is_drained_first_and_creates_last(intakes):
    from tasks.app import consumed_queues

    queues = consumed_queues("n@h", intakes)
    assert queues[0] == "sandbox.node.n@h"
    assert queues[-len(intakes) - 1:] == [f"{q}.create" for q in (*intakes, "celery")]


def test_a_create_that_waits_too_long_goes_back_to_the_queue_and_runs_once_there_is_room(
        celery_client, stack_env, session_dir, redis_client):
    node, queue = "w-bounce@host-i", "adm-bounce"
    worker = _start(stack_env, celery_client, session_dir, node, queue, "adm-bounce", SANDBOX_NODE_MAX_SANDBOXES="1")
    try:
        # 12 s: the later job's create must begin, and wait out one admission wait (5 s), while the
        # holder runs; 7 s left for its submit and the hop to its create on a loaded 2-core host
        holder = {"id": new_job_id("hold"), "command": "sleep 12", "timeout": 30}
        later = {"id": new_job_id("later"), "command": "ls"}
        held = celery_client.send_task("sandbox.submit", args=[json.dumps(holder)], queue=queue)
        wait_for(lambda: record_of(redis_client, holder["id"]).get("status") == "running")
        pending = celery_client.send_task("sandbox.submit", args=[json.dumps(later)], queue=queue)
        first, second = held.get(timeout=60), pending.get(timeout=60)
    finally:
        worker.stop()
    assert first["status"] == "succeeded" and second["status"] == "succeeded"
    # it waited more than one admission wait (5 s) for the holder, then was admitted, never before
    assert second["stages"]["create"]["started_at"] >= first["stages"]["cleanup"]["started_at"]
    assert "not admitted" in worker.tail(400)  # it went back to the queue at least once
