"""One e2e suite over every runtime: `runtime_name` is a session parameter (local, fly).

With `fly`, the worker drives the fake Machines API (tests/support/fakefly.py) whose machines run
the real agent with the real LocalRuntime inside. A test that only makes sense on some runtimes
says so with `@pytest.mark.runtimes("local")`. After every fly test no machine and no agent may be
left, and every request the fake received must validate against Fly's spec.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import requests

from sandbox import nodes, sweeps
from tests.support.fakefly import FakeFly, agent_processes_alive
from tests.support.services import free_port

RUNTIMES = ("local", "fly")
FLY_APP = "sbx-e2e"
FLY_TOKEN = "fm2_e2e-fly-api-token-" + "k" * 24  # a macaroon-looking token: sent as `FlyV1 …`
FLY_AGENT_SECRET = "e2e-agent-secret-" + "s" * 32
LEFTOVER_WAIT_S = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "runtimes(*names): run this e2e test only on these runtimes")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "runtime_name" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("runtimes")
        names = marker.args if marker else RUNTIMES
        metafunc.parametrize("runtime_name", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def runtime_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def fake_fly(runtime_name: str, work_dir: Path) -> Iterator[FakeFly | None]:
    if runtime_name != "fly":
        yield None
        return
    fake = FakeFly(FLY_TOKEN, FLY_APP, work_dir / "fly-machines", agent_port=free_port()).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def stack_env(stack_env: dict[str, str], runtime_name: str, fake_fly: FakeFly | None) -> dict[str, str]:
    """The session's stack, driving sandboxes through `runtime_name`."""
    if fake_fly is None:
        return stack_env
    return {**stack_env, "SANDBOX_RUNTIME": "fly", "SANDBOX_FLY_API_URL": fake_fly.url, "SANDBOX_FLY_APP": FLY_APP,
            "SANDBOX_FLY_API_TOKEN": FLY_TOKEN, "SANDBOX_FLY_IMAGE": f"registry.fly.io/{FLY_APP}:e2e",
            "SANDBOX_FLY_AGENT_SECRET": FLY_AGENT_SECRET, "SANDBOX_FLY_AGENT_PORT": str(fake_fly.agent_port),
            "SANDBOX_FLY_REGIONS": "ams,fra", "SANDBOX_FLY_START_TIMEOUT": "8", "SANDBOX_FLY_RETRY_BUDGET": "10"}


@pytest.fixture(autouse=True)
def no_machine_outlives_its_job(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each fly test: every machine destroyed, every agent gone, every request valid."""
    if "runtime_name" not in request.fixturenames or request.getfixturevalue("runtime_name") != "fly":
        yield
        return
    fake: FakeFly = request.getfixturevalue("fake_fly")
    yield
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while (fake.live() or agent_processes_alive(fake)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(m.id, (m.config.get("metadata") or {}).get("sandbox_job"), m.state) for m in fake.live()]
    leftover_agents = agent_processes_alive(fake)
    for m in fake.live():  # the next test starts clean even when this one failed
        fake._destroy(m)
    for r in list(fake.requests):
        assert "violation" not in r, r  # the fake validated each on arrival (validate_request)
    fake.reset()
    assert not left, f"machines outlived their jobs: {left}"
    assert not leftover_agents, f"agent processes outlived their machines: {leftover_agents}"


@pytest.fixture()
def sweeps_due(redis_client: redis.Redis) -> None:
    """Every beat sweep may run at once, whatever ran before: a sweep an earlier test sent (in this
    file or another) holds its once-per-period lock for 0.9 of the worker's period (60 s for the
    orphans), and a sweep sent under it returns None without sweeping. Released as an operator
    would release it: by deleting the lock key."""
    redis_client.delete(*(sweeps.sweep_lock_key(name) for name in nodes.SWEEPS))


def sandbox_left(job_id: str, stack_env: dict[str, str]) -> list[str]:
    """What is left of a job's sandbox: local directories, or Fly machines (asked of the API)."""
    if stack_env.get("SANDBOX_RUNTIME") == "fly":
        machines = requests.get(f"{stack_env['SANDBOX_FLY_API_URL']}/apps/{stack_env['SANDBOX_FLY_APP']}/machines",
                                headers={"Authorization": f"FlyV1 {stack_env['SANDBOX_FLY_API_TOKEN']}"},
                                timeout=10).json()
        return [m["id"] for m in machines if (m["config"].get("metadata") or {}).get("sandbox_job") == job_id]
    work = Path(stack_env["SANDBOX_WORK_DIR"])  # its state in the run dir, its disk image in images/
    return [p.name for d in (work, work / "run", work / "images") if d.is_dir() for p in d.iterdir() if job_id in p.name]
