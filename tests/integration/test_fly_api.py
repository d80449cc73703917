"""FlyRuntime's Machines API half against the strict fake: faults, idempotent create, regions, sweeps.

The agent is a stub here (its real process is driven in tests/e2e over the fly runtime), so these
tests exercise exactly the API calls and their retries.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from config.settings import Settings, load_settings
from sandbox.errors import AgentConflict, RuntimeUnavailable, SandboxFailure
from sandbox.runtimes import fly as flymod
from sandbox.runtimes.fly import SERVICE, FlyRuntime, machine_name
from sandbox.runtimes.flyapi import FlyAPIError, MachinesAPI
from sandbox.spec import parse_job
from tests.support.fakefly import FakeFly
from tests.support.flyspec import SpecViolation, validate_request

TOKEN = "fly-api-token-for-tests-0123456789"
SECRET = "agent-secret-for-tests-0123456789abcdef"


class StubAgent:
    """Answers health and create; records what the runtime asked of it."""

    calls: list[str] = []

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            StubAgent.calls.append(name)
            return {"ok": True}
        return call


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeFly]:
    server = FakeFly(TOKEN, "sbx-app", tmp_path / "fly", agent_port=18080, start_agents=False, wait_cap_s=5).start()
    yield server
    server.stop()


def fly_settings(fake: FakeFly, **env: str) -> Settings:
    return load_settings({"SANDBOX_RUNTIME": "fly", "SANDBOX_FLY_API_URL": fake.url, "SANDBOX_FLY_APP": "sbx-app",
                          "SANDBOX_FLY_API_TOKEN": TOKEN, "SANDBOX_FLY_IMAGE": "registry.fly.io/sbx-app:test",
                          "SANDBOX_FLY_AGENT_SECRET": SECRET, "SANDBOX_FLY_RETRY_BUDGET": "5",
                          "SANDBOX_FLY_START_TIMEOUT": "5", "SANDBOX_FLY_REGIONS": "ams,fra", **env})


@pytest.fixture
def runtime(fake: FakeFly, monkeypatch: pytest.MonkeyPatch) -> FlyRuntime:
    monkeypatch.setattr(flymod, "_agent_client", StubAgent)
    StubAgent.calls = []
    return FlyRuntime(fly_settings(fake))


def spec(job_id: str, **extra: Any):
    return parse_job({"id": job_id, "command": "ls", **extra}, load_settings({}))


def posts(fake: FakeFly) -> list[dict]:
    return [r for r in fake.requests if r["method"] == "POST"]


def test_happy_create_is_lookup_create_wait_and_destroy_is_one_delete(fake, runtime):
    handle = runtime.create(spec("j-happy"), "w1")
    runtime.destroy(handle)
    assert [r["op"] for r in fake.requests] == ["Machines_list", "Machines_create", "Machines_wait", "Machines_delete"]
    assert StubAgent.calls == ["health", "create", "destroy"]
    assert fake.live() == []
    body = posts(fake)[0]["body"]
    assert body["name"] == machine_name("j-happy") and body["region"] == "ams"
    config = body["config"]
    assert config["auto_destroy"] is True and config["restart"] == {"policy": "no"}
    assert config["metadata"]["sandbox_service"] == SERVICE and config["metadata"]["sandbox_job"] == "j-happy"
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 768}  # 512 MiB + agent, rounded
    assert "rounded up" in handle.data["sizing"]
    assert len(config["env"]["SANDBOX_AGENT_TOKEN_SHA256"]) == 64 and "SANDBOX_AGENT_TOKEN" not in config["env"]
    assert TOKEN not in str(config) and config["env"]["SANDBOX_AGENT_JOB_ID"] == "j-happy"
    assert not {"SANDBOX_FLY_API_TOKEN", "SANDBOX_REDIS_URL", "SANDBOX_CLOUDFLARE_SECRET_KEY"} & set(config["env"])
    assert SECRET not in str(handle.to_dict()) and "TOKEN" not in str(handle.to_dict())


def test_create_retried_after_its_answer_was_lost_ends_with_one_machine(fake, runtime):
    fake.fail("POST", "/machines", "reset_after")  # Fly made the machine; the answer never came
    handle = runtime.create(spec("j-lost"), "w1")
    again = runtime.create(spec("j-lost"), "w1")  # a retried create task / a redelivered message
    assert handle.sandbox_id == again.sandbox_id
    assert len(fake.machine_of("j-lost")) == 1 and len(posts(fake)) == 1


def test_create_reset_before_fly_acted_retries_as_a_stage_and_makes_one_machine(fake, runtime):
    fake.fail("POST", "/machines", "reset_before")
    with pytest.raises(RuntimeUnavailable):
        runtime.create(spec("j-reset"), "w1")  # the stage's Celery retry runs it again
    runtime.create(spec("j-reset"), "w1")
    assert len(fake.machine_of("j-reset")) == 1


def test_429_with_retry_after_is_honoured(fake):
    sleeps: list[float] = []
    api = MachinesAPI(fake.url, TOKEN, "sbx-app", retry_budget_s=5, sleep=sleeps.append)
    fake.fail("GET", "/machines", status=429, retry_after="2", times=2)
    assert api.list() == []
    assert sleeps == [2.0, 2.0]


def test_429_without_retry_after_backs_off_exponentially_with_jitter(fake):
    sleeps: list[float] = []
    api = MachinesAPI(fake.url, TOKEN, "sbx-app", retry_budget_s=5, sleep=sleeps.append)
    fake.fail("GET", "/machines", status=429, times=4)
    assert api.list() == []
    assert len(sleeps) == 4 and all(0 <= s <= 0.5 * 2 ** i for i, s in enumerate(sleeps))


@pytest.mark.parametrize("kind,status", [("status", 500), ("status", 503), ("reset_before", 0)])
def test_5xx_bursts_and_dropped_connections_are_retried(fake, kind, status):
    api = MachinesAPI(fake.url, TOKEN, "sbx-app", retry_budget_s=5, sleep=lambda s: None)
    fake.fail("GET", "/machines", kind, status=status or 500, times=3)
    assert api.list() == []
    assert len(fake.requests) == 4


def test_throttling_gives_up_after_the_budget_with_the_reason(fake):
    api = MachinesAPI(fake.url, TOKEN, "sbx-app", retry_budget_s=1)
    fake.fail("GET", "/machines", status=429, retry_after="0.2", times=1000)
    with pytest.raises(RuntimeUnavailable) as caught:
        api.list()
    # bounded: 0.2 s apart within a 1 s budget leaves room for at most 6 attempts (fewer on a busy host)
    assert 2 <= len(fake.requests) <= 6
    assert f"gave up after {len(fake.requests)} attempts" in str(caught.value)
    assert "429" in str(caught.value) and TOKEN not in str(caught.value)


def test_a_wrong_token_is_refused_at_once_without_showing_the_token(fake):
    api = MachinesAPI(fake.url, "wrong-token-abcdef", "sbx-app", retry_budget_s=5, sleep=lambda s: None)
    with pytest.raises(FlyAPIError) as caught:
        api.list()
    assert caught.value.status == 401 and "wrong-token" not in str(caught.value)
    assert len(fake.requests) == 1


def test_408_from_wait_means_not_yet(fake, runtime):
    fake.fail("GET", "/wait", status=408, times=2, body={"error": "deadline_exceeded"})
    runtime.create(spec("j-408"), "w1")
    waits = [r["status"] for r in fake.requests if r["op"] == "Machines_wait"]
    assert waits[:2] == [408, 408] and waits[-1] == 200 and set(waits) == {408, 200}


def test_capacity_error_tries_the_next_region(fake, runtime):
    fake.no_capacity = {"ams"}
    handle = runtime.create(spec("j-cap"), "w1")
    assert handle.data["region"] == "fra"
    assert [r["body"]["region"] for r in posts(fake)] == ["ams", "fra"]
    assert [r["status"] for r in posts(fake)] == [422, 200]


def test_no_capacity_anywhere_ends_create_with_the_reason(fake, runtime):
    fake.no_capacity = {"ams", "fra"}
    with pytest.raises(SandboxFailure) as caught:
        runtime.create(spec("j-nocap"), "w1")
    assert "ams" in str(caught.value) and "fra" in str(caught.value) and "insufficient_capacity" in str(caught.value)
    assert fake.live() == []


def test_a_machine_that_never_starts_is_destroyed_after_the_start_timeout(fake, monkeypatch):
    monkeypatch.setattr(flymod, "_agent_client", StubAgent)
    runtime = FlyRuntime(fly_settings(fake, SANDBOX_FLY_START_TIMEOUT="1.5"))
    fake.start_delay_s = float("inf")
    with pytest.raises(SandboxFailure, match="did not start within 1.5 s"):
        runtime.create(spec("j-stuck"), "w1")
    assert fake.live() == [] and len(fake.machine_of("j-stuck")) == 1


def test_a_slow_start_is_waited_for(fake, runtime):
    fake.start_delay_s = 1.2
    runtime.create(spec("j-slowstart"), "w1")
    assert [r["status"] for r in fake.requests if r["op"] == "Machines_wait"][-1] == 200


def test_destroying_a_gone_machine_is_fine(fake, runtime):
    handle = runtime.create(spec("j-gone"), "w1")
    runtime.destroy(handle)
    runtime.destroy(handle)
    assert [r["status"] for r in fake.requests if r["op"] == "Machines_delete"] == [200, 404]


def test_kill_destroys_the_machine_when_the_agent_does_not_answer(fake, runtime, monkeypatch):
    handle = runtime.create(spec("j-deadagent"), "w1")

    class DeadAgent(StubAgent):
        def kill(self) -> None:
            raise ConnectionError("agent unreachable")

    monkeypatch.setattr(flymod, "_agent_client", DeadAgent)
    runtime.kill(handle)
    assert fake.live() == []


def test_sandboxes_are_listed_by_this_services_metadata_only(fake, runtime):
    foreign = fake.add_foreign_machine({"team": "web"})
    lookalike = fake.add_foreign_machine({"sandbox_job": "j-x"})  # no sandbox_service: not ours either
    runtime.create(spec("j-listed"), "w1")
    listed = runtime.list_sandboxes()
    assert [info.job_id for info in listed] == ["j-listed"]
    assert foreign.id not in {i.sandbox_id for i in listed} and lookalike.id not in {i.sandbox_id for i in listed}


def test_every_request_the_runtime_sent_validates_against_the_spec(fake, runtime):
    for job_id in ("j-s1", "j-s2"):
        runtime.destroy(runtime.create(spec(job_id, resources={"memory": "3Gi", "cpu": "1.5"}), "w1"))
    runtime.list_sandboxes()
    assert fake.requests
    for r in fake.requests:
        assert "violation" not in r, r  # the fake validated each on arrival (validate_request)


def test_the_spec_check_refuses_what_fly_would_not_take() -> None:
    """The check every fake request passes through must be able to fail: a misspelt field, a query
    parameter the operation lacks, an operation the API does not have."""
    good = {"config": {"image": "registry.fly.io/app:v1"}, "name": "sbx-x"}
    assert validate_request("POST", "/apps/a/machines", {}, good) == "Machines_create"
    with pytest.raises(SpecViolation, match="imagee"):
        validate_request("POST", "/apps/a/machines", {}, {"config": {"imagee": "x"}})
    with pytest.raises(SpecViolation, match="not in the spec"):
        validate_request("GET", "/apps/a/machines", {"metadata.job": ["x"]}, None)
    with pytest.raises(SpecViolation, match="not an operation"):
        validate_request("PATCH", "/apps/a/machines", {}, None)


class HangingAgent(StubAgent):
    """An agent whose command outlives its timeout and whose stream ends only when it is killed."""

    killed = None

    def execute(self, sink, max_wait_s=None):  # noqa: ANN001, ANN201
        import threading
        HangingAgent.killed = HangingAgent.killed or threading.Event()
        if not HangingAgent.killed.wait(10):
            raise AssertionError("the worker's backstop never killed the command")
        from sandbox.runtimes.base import ExecResult
        return ExecResult("timed_out", None, 9, 1.5, reason="killed by the worker's backstop")

    def kill(self) -> None:
        HangingAgent.killed.set()


def test_the_worker_kills_a_command_the_agent_let_outlive_its_timeout(fake, runtime, monkeypatch):
    monkeypatch.setattr(flymod, "BACKSTOP_MARGIN_S", 0.5)
    handle = runtime.create(spec("j-backstop", timeout=1), "w1")
    monkeypatch.setattr(flymod, "_agent_client", HangingAgent)
    HangingAgent.killed = None
    result = runtime.execute(handle, spec("j-backstop", timeout=1), lambda s, b: None)
    assert result.outcome == "timed_out" and HangingAgent.killed.is_set()
    runtime.destroy(handle)


def test_the_backstop_destroys_the_machine_when_the_kill_is_not_taken(fake, runtime, monkeypatch):
    monkeypatch.setattr(flymod, "BACKSTOP_MARGIN_S", 0.5)
    handle = runtime.create(spec("j-backstop2", timeout=1), "w1")

    class Unkillable(HangingAgent):
        def kill(self) -> None:
            raise ConnectionError("agent stuck")

        def execute(self, sink, max_wait_s=None):  # noqa: ANN001, ANN201
            deadline = time.monotonic() + 10
            while fake.live() and time.monotonic() < deadline:
                time.sleep(0.05)
            from sandbox.errors import AgentUnavailable
            raise AgentUnavailable("exec stream broke before its end")

        def wait_result(self, max_wait_s=None):  # noqa: ANN001, ANN201
            from sandbox.errors import AgentUnavailable
            raise AgentUnavailable("connection refused")

    monkeypatch.setattr(flymod, "_agent_client", Unkillable)
    result = runtime.execute(handle, spec("j-backstop2", timeout=1), lambda s, b: None)
    assert fake.live() == []  # destroyed by the backstop
    assert result.outcome == "error" and "stopped answering" in result.reason


def test_a_concurrent_create_of_the_same_job_shares_its_machine(fake, runtime, monkeypatch):
    # Both looked before either created: the second POST meets the taken name and finds the first.
    first = runtime.create(spec("j-race"), "w1")
    monkeypatch.setattr(runtime, "_find", lambda name, real=runtime._find: real(name) if posts(fake)[1:] else None)
    second = runtime.create(spec("j-race"), "w2")
    assert first.sandbox_id == second.sandbox_id and len(fake.machine_of("j-race")) == 1
    assert [r["status"] for r in posts(fake)] == [200, 409]


def test_an_answer_slower_than_the_read_timeout_is_retried(fake):
    api = MachinesAPI(fake.url, TOKEN, "sbx-app", retry_budget_s=5, sleep=lambda s: None, read_timeout_s=0.3)
    fake.fail("GET", "/machines", "slow", delay_s=1.0)
    assert api.list() == []
    assert len(fake.requests) == 2


def test_one_client_serves_many_threads_at_once(fake):
    from concurrent.futures import ThreadPoolExecutor

    api = MachinesAPI(fake.url, TOKEN, "sbx-app", retry_budget_s=5, sleep=lambda s: None)
    fake.fail("GET", "/machines", status=503, times=8)  # some threads retry while others pass
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: api.list(), range(64)))
    assert answers == [[]] * 64 and len(fake.requests) == 72


class ListingAgent(StubAgent):
    """Lists one output; answers 409 `conflict` to the first `conflicts` listings."""

    conflicts = 0
    conflict = "running"

    def outputs(self, dirs: tuple[str, ...]) -> list[str]:
        StubAgent.calls.append("outputs")
        if ListingAgent.conflicts:
            ListingAgent.conflicts -= 1
            raise AgentConflict(ListingAgent.conflict, f"agent GET /outputs: 409 {ListingAgent.conflict}: busy")
        return ["output/r.txt"]


@pytest.mark.parametrize(("conflict", "conflicts", "calls"), [
    ("running", 0, ["outputs"]),  # the happy path: one request, no /health first
    ("running", 1, ["outputs", "kill", "wait_result", "outputs"]),  # its worker was lost mid-command
    ("no_sandbox", 1, ["outputs"]),  # any other refusal is the sandbox failing: nothing is killed
])
def test_collect_lists_at_once_and_ends_a_command_still_running_first(fake, runtime, monkeypatch, conflict,
                                                                      conflicts, calls):
    handle = runtime.create(spec("j-collect"), "w1")
    monkeypatch.setattr(flymod, "_agent_client", ListingAgent)
    ListingAgent.conflict, ListingAgent.conflicts, StubAgent.calls = conflict, conflicts, []
    try:
        if conflict == "running":
            assert runtime.collect(handle, ("output",)) == ["output/r.txt"]
        else:
            with pytest.raises(AgentConflict, match="no_sandbox"):
                runtime.collect(handle, ("output",))
        assert StubAgent.calls == calls
    finally:
        runtime.destroy(handle)
