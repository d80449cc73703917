"""`python -m sandbox health` against a real Redis and a real S3 server: green when all is well, and
each failure it checks for named when that failure is real.

Heartbeats and sweep marks are written here as test setup, in the shared key format (common.md):
the reliability branch's workers and beat write them in production.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from celery import Celery

from sandbox.nodes import BEAT_STARTED_KEY
from sandbox.observability.cluster import NODES_SET, SENT_AT_HEADER, heartbeat_key, sweep_last_key
from tests.conftest import running_redis
from tests.support.services import ROOT, RedisServer, stop_process

NODE = "w1@health"


@pytest.fixture()
def health_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis set up as production's should be: AOF on, noeviction."""
    yield from running_redis(tmp_path, {"appendonly": "yes", "maxmemory-policy": "noeviction"})


@pytest.fixture()
def healthy(health_redis: RedisServer, s3: Any) -> dict[str, str]:
    """A healthy stack's state: one live worker consuming its queues, beat's sweeps just ran."""
    client = redis.Redis.from_url(health_redis.url)
    now = time.time()
    client.sadd(NODES_SET, NODE)
    client.set(heartbeat_key(NODE), json.dumps({"node": NODE, "pid": 1, "at": now, "started_at": now - 60,
                                                "queues": ["sandbox", "celery", f"sandbox.node.{NODE}"]}), ex=30)
    for name in ("orphans", "stuck", "artifacts"):
        client.set(sweep_last_key(name), json.dumps({"at": now, "count": 0, "node": NODE}))
    return {"SANDBOX_REDIS_URL": health_redis.url, **s3.env()}


def health(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "sandbox", "health", "--json"], cwd=ROOT, capture_output=True,
                          env={**os.environ, **env}, timeout=60)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    return done.returncode, {c["name"]: c for c in report["checks"]} | {"status": report["status"]}


def test_healthy_stack_is_green(healthy):
    code, checks = health(healthy)
    assert code == 0, checks
    assert all(checks[n]["status"] == "ok" for n in ("redis", "s3", "workers", "beat", "queues", "dead_letters"))


def test_table_names_every_check(healthy):
    done = subprocess.run([sys.executable, "-m", "sandbox", "health"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **healthy}, timeout=60)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["redis", "s3", "workers", "beat", "queues",
                                                                     "dead_letters", "overall"]


def test_dead_letters_piling_up_are_degraded(healthy):
    client = redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"])
    client.lpush("sandbox.dead", *[json.dumps({"reason": "x", "queue": "sandbox"})] * 3)
    code, checks = health(healthy)
    assert code == 1 and checks["dead_letters"]["status"] == "degraded"
    assert "3 message(s)" in checks["dead_letters"]["detail"] and "dead-letters" in checks["dead_letters"]["detail"]


def test_a_node_that_died_is_degraded_while_another_serves_and_one_stopped_on_purpose_is_not(healthy):
    from sandbox import nodes

    client = redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"])
    for node in ("w2@died", "w3@stopped"):
        nodes.beat(client, node, ["sandbox", nodes.node_queue(node)], time.time() - 100, dead_after_s=0.2)
    nodes.stopped(client, "w3@stopped")
    time.sleep(0.5)  # both heartbeats expired
    code, checks = health(healthy)
    assert code == 1 and checks["workers"]["status"] == "degraded", checks
    assert "w2@died died" in checks["workers"]["detail"] and "w3@stopped" not in checks["workers"]["detail"]
    client.hdel(nodes.LAST_BEATS_KEY, "w2@died")  # what the operator does once it is gone for good
    code, checks = health(healthy)
    assert checks["workers"]["status"] == "ok", checks


def test_redis_without_aof_is_degraded(healthy):
    redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"]).config_set("appendonly", "no")
    code, checks = health(healthy)
    assert code == 1 and checks["redis"]["status"] == "degraded"
    assert "AOF is off" in checks["redis"]["detail"]


def test_evicting_redis_is_degraded(healthy):
    redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"]).config_set("maxmemory-policy", "allkeys-lru")
    code, checks = health(healthy)
    assert code == 1 and "allkeys-lru" in checks["redis"]["detail"]


def test_wrong_s3_credentials_are_down(healthy):
    code, checks = health({**healthy, "SANDBOX_CLOUDFLARE_SECRET_KEY": "not-the-secret"})
    assert code == 2 and checks["s3"]["status"] == "down"
    assert "access denied" in checks["s3"]["detail"] or "refused" in checks["s3"]["detail"]


def test_no_worker_is_down(healthy):
    redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"]).delete(heartbeat_key(NODE))
    code, checks = health(healthy)
    assert code == 2 and checks["workers"]["status"] == "down"
    assert "no worker" in checks["workers"]["detail"]


def test_stale_beat_is_degraded(healthy):
    client = redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"])
    client.set(sweep_last_key("stuck"), json.dumps({"at": time.time() - 3600, "count": 0, "node": NODE}))
    code, checks = health(healthy)
    assert code == 1 and "sweep stuck last ran" in checks["beat"]["detail"]


@pytest.fixture()
def start_beat(healthy: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Start a real `celery beat` on the health stack (no worker consumes what it sends)."""
    procs: list[subprocess.Popen] = []

    def start(**env: str) -> subprocess.Popen:
        client = redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"])
        client.delete(BEAT_STARTED_KEY, *(sweep_last_key(n) for n in ("orphans", "stuck", "artifacts")))
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "beat", "-s", str(tmp_path / "beat"),
                                 "--loglevel", "INFO"], cwd=ROOT, env={**os.environ, **healthy, **env},
                                stdout=open(tmp_path / "beat.log", "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while client.get(BEAT_STARTED_KEY) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "beat.log").read_text()
            time.sleep(0.2)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


def test_a_freshly_started_beat_is_green_before_its_sweeps_are_due(healthy, start_beat):
    # Given a stack whose beat just started: no sweep has run yet (the artifact sweep's first is 1 h away)
    start_beat()
    # Then health calls beat ok: nothing is due yet
    code, checks = health(healthy)
    assert checks["beat"]["status"] == "ok" and code == 0, checks["beat"]
    assert "artifacts not due yet" in checks["beat"]["detail"] and "beat started" in checks["beat"]["detail"]


def test_a_beat_whose_sweep_is_overdue_is_degraded(healthy, start_beat):
    # Given a beat that sends the stuck and orphan sweeps every second, and no worker to run them
    start_beat(SANDBOX_STUCK_SWEEP_INTERVAL="1", SANDBOX_ORPHAN_SWEEP_INTERVAL="1")
    time.sleep(2 * 1 + 10 + 1)  # two periods and the slack (health.SWEEP_SLACK_S) passed: missed
    code, checks = health(healthy)
    # Then health names the sweeps that never ran since beat started, by the periods beat published
    assert code == 1 and checks["beat"]["status"] == "degraded", checks["beat"]
    assert "sweep stuck has not run since beat started" in checks["beat"]["detail"]
    assert "(every 1 s)" in checks["beat"]["detail"] and "artifacts" not in checks["beat"]["detail"]


def _client(url: str) -> Celery:
    app = Celery("producer", broker=url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    return app


def test_message_in_a_queue_nobody_consumes_is_degraded(healthy):
    _client(healthy["SANDBOX_REDIS_URL"]).send_task("sandbox.submit", args=["{}"], queue="nobody-home")
    code, checks = health(healthy)
    assert code == 1 and checks["queues"]["status"] == "degraded"
    assert "nobody-home: 1 message(s) and no consumer" in checks["queues"]["detail"]


def test_old_message_is_degraded(healthy):
    _client(healthy["SANDBOX_REDIS_URL"]).send_task("sandbox.submit", args=["{}"], queue="sandbox",
                                                    headers={SENT_AT_HEADER: time.time() - 900})
    code, checks = health(healthy)
    assert code == 1 and "sandbox: oldest message 9" in checks["queues"]["detail"]
    assert "s old (limit 300 s)" in checks["queues"]["detail"]


def test_redis_down_is_down(healthy, health_redis):
    health_redis.stop()
    code, checks = health(healthy)
    assert code == 2 and checks["redis"]["status"] == "down" and "unreachable" in checks["redis"]["detail"]


def test_a_node_that_died_keeps_a_growing_heartbeat_age_and_one_stopped_on_purpose_has_none(redis_client) -> None:
    # The heartbeat key expires after SANDBOX_NODE_DEAD_AFTER (60 s) and its age used to vanish with
    # it, so the SandboxHeartbeatStale alert (> 60 for 2m) could never fire for a node that died.
    from sandbox import nodes
    from sandbox.observability.cluster import Cluster
    from sandbox.observability.gauges import ClusterCollector

    died, stopped = f"died-{time.time_ns()}@h", f"stopped-{time.time_ns()}@h"
    for node in (died, stopped):
        nodes.beat(redis_client, node, ["sandbox"], time.time(), dead_after_s=0.2)
    nodes.stopped(redis_client, stopped)
    time.sleep(0.5)  # both heartbeat keys have expired
    assert redis_client.get(heartbeat_key(died)) is None
    ages = {b.node: b.age_s for b in Cluster(redis_client).heartbeats(now=time.time() + 300)}
    assert ages[died] >= 300 and ages[stopped] is None
    families = {f.name: f for f in ClusterCollector(Cluster(redis_client), fresh_s=60).collect()}
    exported = {s.labels["node"]: s.value for s in families["sandbox_node_heartbeat_age_seconds"].samples}
    assert exported[died] >= 0.5 and stopped not in exported
    redis_client.srem(NODES_SET, died, stopped)
    redis_client.hdel(nodes.LAST_BEATS_KEY, died)


def test_a_stock_producers_message_is_aged_across_health_runs(healthy):
    # Without a sandbox_sent_at header (celery-node, a plain send_task on `celery`) a message was aged
    # from when *this process* first saw it: each `health` run is a new process and saw it 0 s old.
    client = redis.Redis.from_url(healthy["SANDBOX_REDIS_URL"])
    message = {"body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"lang": "py", "task": "sandbox.submit", "id": f"stock-{time.time_ns()}"},
               "properties": {"delivery_tag": "t1", "body_encoding": "base64",
                              "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0}}
    client.lpush("celery", json.dumps(message))
    env = {**healthy, "SANDBOX_QUEUE_AGE_MAX": "1"}
    assert health(env)[1]["queues"]["status"] == "ok"  # first seen now
    time.sleep(1.5)
    code, checks = health(env)  # a new process: the first sighting is Redis's, not its own
    assert code == 1 and "celery: oldest message" in checks["queues"]["detail"], checks["queues"]
    client.delete("celery")
