"""Shared fixtures: a real Redis, a real SeaweedFS S3 server and real Celery worker processes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis
from celery import Celery

from tests.support.jobs import client_app, new_job_id, wait_for  # noqa: F401  (tests import these from here)
from tests.support.seaweed import SeaweedUnavailable, seaweed_server
from tests.support.services import RedisServer, ServiceUnavailable, Worker, sandbox_work_dir, unavailable

E2E_COMMANDS = "ls,cat,grep,curl,wget,python3,sleep"
WEBHOOK_SECRET = "e2e-webhook-secret"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


def running_redis(data_dir: Path, config: dict[str, str] | None = None) -> Iterator[RedisServer]:
    """A real Redis (AOF on) in `data_dir`, with `config` set on it, for a fixture to yield from;
    fails under CI if missing."""
    server = RedisServer(data_dir)
    try:
        server.start()
    except ServiceUnavailable as e:
        unavailable(str(e))
    client = redis.Redis.from_url(server.url)
    for key, value in (config or {}).items():
        client.config_set(key, value)
    client.close()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    yield from running_redis(session_dir)


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture()
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def s3(session_dir: Path) -> Iterator[Any]:
    try:
        with seaweed_server(session_dir / "s3") as server:
            yield server
    except SeaweedUnavailable as e:
        unavailable(str(e))


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    with sandbox_work_dir("sandbox-work-") as path:
        yield path


@pytest.fixture(scope="session")
def stack_env(redis_url: str, s3: Any, work_dir: Path) -> dict[str, str]:
    """SANDBOX_* variables of the test stack; workers and the tests' own Settings share them."""
    work = work_dir
    return {
        "SANDBOX_REDIS_URL": redis_url,
        **s3.env(),
        "SANDBOX_WORK_DIR": str(work),
        "SANDBOX_ALLOWED_COMMANDS": E2E_COMMANDS,
        "SANDBOX_DEFAULT_TIMEOUT": "30",
        "SANDBOX_MAX_TIMEOUT": "600",
        "SANDBOX_DEFAULT_MEMORY": "256Mi",
        "SANDBOX_DEFAULT_DISK": "64Mi",
        "SANDBOX_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SANDBOX_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    }


@pytest.fixture(scope="session")
def celery_client(redis_url: str) -> Celery:
    return client_app("client", redis_url)


@pytest.fixture(scope="session")
def worker(stack_env: dict[str, str], celery_client: Celery, session_dir: Path) -> Iterator[Worker]:
    proc = Worker(stack_env, node="w1@host-a", log_path=session_dir / "worker-a.log")
    proc.start(celery_client)
    yield proc
    proc.stop()


@pytest.fixture()
def submit(celery_client: Celery, worker: Worker) -> Callable[..., dict]:
    """Send a job through sandbox.submit and wait for its final record."""

    def run(job: dict | str, timeout_s: float = 120) -> dict:
        payload = job if isinstance(job, str) else json.dumps(job)
        result = celery_client.send_task("sandbox.submit", args=[payload])
        try:
            return result.get(timeout=timeout_s)
        except Exception:
            print(worker.tail(80))
            raise

    return run

