"""Workers check at start-up that the broker keeps what it is given (AOF, no eviction): they warn
loudly, or refuse to start with SANDBOX_REQUIRE_DURABLE_REDIS."""
from __future__ import annotations

import pytest

from sandbox import nodes
from tests.conftest import wait_for
from tests.faults.conftest import FaultWorker, LOG_DIR


def test_the_redis_the_tests_and_devstack_start_is_durable(fault_redis_client):
    assert nodes.durability_problems(fault_redis_client) == []


def test_a_worker_refuses_a_broker_without_persistence_when_required(fault_env, fault_client, fault_redis_client):
    fault_redis_client.config_set("appendonly", "no")
    fault_redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        problems = nodes.durability_problems(fault_redis_client)
        assert any("appendonly" in p for p in problems) and any("noeviction" in p for p in problems)
        worker = FaultWorker({**fault_env, "SANDBOX_REQUIRE_DURABLE_REDIS": "true"}, "fw-strict@host-z",
                             LOG_DIR / "fw-strict.log")
        with pytest.raises(RuntimeError, match="exited"):
            worker.start(fault_client, timeout_s=60)
        assert "SANDBOX_REQUIRE_DURABLE_REDIS" in worker.tail(200)
        worker.stop()

        lenient = FaultWorker({**fault_env, "SANDBOX_REQUIRE_DURABLE_REDIS": "false"}, "fw-lenient@host-z",
                              LOG_DIR / "fw-lenient.log")
        lenient.start(fault_client)  # starts, but says so loudly
        lenient.stop()
        assert "REDIS IS NOT DURABLE" in lenient.tail(400)
    finally:
        fault_redis_client.config_set("appendonly", "yes")  # starts an AOF rewrite
        fault_redis_client.config_set("maxmemory-policy", "noeviction")
        wait_for(lambda: not fault_redis_client.info("persistence")["aof_rewrite_in_progress"]
                 and not fault_redis_client.info("persistence")["aof_rewrite_scheduled"], timeout_s=30)
