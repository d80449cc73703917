"""The real agent process with a real LocalRuntime behind it, driven through AgentClient (and raw HTTP)."""
from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterator

import pytest
import requests

from config.settings import Settings
from sandbox.agent.client import AgentClient, RemoteFile
from sandbox.errors import AgentConflict, AgentUnavailable, JobRejected, SandboxFailure
from sandbox.spec import JobSpec, NetworkPolicy, ResourceLimits, SetupSpec
from tests.support.agent import AgentProcess

MiB = 1 << 20
TOKEN = "agent-test-token-" + uuid.uuid4().hex


def make_spec(argv: list[str], *, timeout_s: float = 20, memory: int = 128 * MiB, disk: int = 64 * MiB,
              job_id: str | None = None) -> JobSpec:
    return JobSpec(id=job_id or f"a{uuid.uuid4().hex[:12]}", command=argv[0], argv=tuple(argv), environment={},
                   timeout_s=timeout_s, resources=ResourceLimits(cpu=1.0, memory_bytes=memory,
                                                                 disk_bytes=disk, pids=64))


def sh(script: str, **kw: Any) -> JobSpec:
    return make_spec(["/bin/sh", "-c", script], **kw)


@pytest.fixture
def start_agent(runtime, settings: Settings, tmp_path) -> Iterator[Callable[..., AgentProcess]]:  # type: ignore[no-untyped-def]
    """Start agents on the test's work dir (the `runtime` fixture checks root, bwrap and cgroups first)."""
    started: list[AgentProcess] = []

    def start(**env: str) -> AgentProcess:
        base = {"SANDBOX_WORK_DIR": settings.work_dir, "SANDBOX_AGENT_TOKEN": TOKEN,
                "SANDBOX_AGENT_KEEPALIVE": "0.2", "SANDBOX_MAX_LOG_BYTES": "64Ki",
                "SANDBOX_MAX_OUTPUT_FILES": "5", "SANDBOX_MAX_OUTPUT_FILE_BYTES": "256Mi",
                "SANDBOX_MAX_OUTPUT_BYTES": "256Mi"}
        agent = AgentProcess({**base, **env}, tmp_path / f"agent-{len(started)}.log")
        started.append(agent.start())
        return agent

    yield start
    for agent in started:
        assert agent.stop() == 0, agent.log()[-2000:]
        assert TOKEN not in agent.log()  # never logged, whatever the test did
    assert runtime.list_sandboxes() == []  # a stopped agent leaves no sandbox behind


def client(agent: AgentProcess, token: str = TOKEN, read_s: float = 10.0) -> AgentClient:
    return AgentClient(agent.url, token, timeout=(2.0, read_s))


def test_what_the_walk_left_unlisted_reaches_the_worker(start_agent) -> None:  # type: ignore[no-untyped-def]
    # 1,100 files where 5 may be collected: the walk looks at 2 x 5 + 1000 entries, lists 1000 of
    # the 1,005 it leaves out (after its "walk stopped" entry), and counts the other 5. The count
    # was lost on the way from the agent, and the answer's list cut one entry short.
    agent = start_agent()
    c = client(agent)
    c.create(sh("mkdir output && cd output && i=0; while [ $i -lt 1100 ]; do : > f$i; i=$((i+1)); done",
                timeout_s=60))
    assert c.execute(lambda s, d: None).outcome == "succeeded"
    outputs = c.outputs(("output",))
    assert len(outputs) == 5 and outputs.skipped[0]["reason"] == "walk stopped: more than 1010 entries"
    assert len(outputs.skipped) == 1 + 1000 and outputs.not_listed == 5
    c.destroy()


def test_every_route_needs_the_token(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}):
        for method, path in (("GET", "/health"), ("POST", "/sandbox"), ("POST", "/exec"), ("GET", "/logs/stdout"),
                             ("PUT", "/files?path=x&mode=420"), ("DELETE", "/sandbox"), ("GET", "/nope")):
            resp = requests.request(method, agent.url + path, headers=headers, data=b'{"id": "x"}', timeout=5)
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json() == {"error": "unauthorized", "message": "missing or wrong bearer token"}
            assert TOKEN not in resp.text and "wrong-token" not in resp.text
    with pytest.raises(SandboxFailure) as refused:
        client(agent, "wrong-token").health()
    assert "wrong-token" not in str(refused.value)
    assert client(agent).health() == {"ok": True, "job_id": None, "state": "idle", "protocol": 2, "setup": False}  # nothing made
    assert "wrong-token" not in agent.log()


def test_a_job_through_the_agent(start_agent, runtime) -> None:  # type: ignore[no-untyped-def]
    # Given an agent, when a job is created, fed, run, collected and destroyed through it,
    # then each step answers as LocalRuntime does and the output arrives while the job runs.
    agent = start_agent()
    c = client(agent)
    spec = sh("cat in/name.txt; echo oops >&2; sleep 1; echo late; mkdir -p output/deep; "
              "echo result > output/deep/r.txt; ln -s /etc/passwd output/link; echo ran >> /workspace/runs; exit 3")
    handle = c.create(spec)
    assert c.create(spec) == handle and handle.job_id == spec.id  # idempotent
    with pytest.raises(SandboxFailure, match="another job"):
        c.create(sh("true"))
    assert c.put_file("in/name.txt", io.BytesIO(b"sandbox\n"), 0o640) == 8
    states_seen_live: list[str] = []
    chunks: list[tuple[str, bytes]] = []

    def sink(stream: str, data: bytes) -> None:
        if not chunks:  # the first line reaches us while the command still runs
            states_seen_live.append(client(agent).health()["state"])
        chunks.append((stream, data))

    result = c.execute(sink)
    assert states_seen_live == ["running"]
    assert (result.outcome, result.exit_code, result.reason) == ("failed", 3, "exited with status 3")
    assert b"".join(d for s, d in chunks if s == "stdout") == b"sandbox\nlate\n"
    assert b"".join(d for s, d in chunks if s == "stderr") == b"oops\n"
    assert result.resources_used["memory_peak_bytes"] > 0
    # at most once: a second execute returns the first run's result and runs nothing
    assert c.execute(lambda s, d: pytest.fail("no output from a second execute")) == result
    assert c.result() == result
    with pytest.raises(SandboxFailure, match="already_started"):
        c.put_file("late.txt", io.BytesIO(b"x"), 0o644)
    logs = c.logs()
    assert {k: v.read() for k, v in logs.items()} == {"stdout": b"sandbox\nlate\n", "stderr": b"oops\n"}
    for f in logs.values():
        f.close()
    outputs = c.outputs(("output", "artifacts"))
    assert [(f.relpath, f.size) for f in outputs] == [("output/deep/r.txt", 7)]
    assert outputs.skipped == [{"path": "output/link", "reason": "symlink"}] and outputs.not_listed == 0
    with outputs[0].open() as fh:
        assert fh.read() == b"result\n"
    for path in ("output%2Flink", "..%2F..%2Fmeta.json", "output%2Fdeep"):  # listed files only
        with pytest.raises(SandboxFailure, match="not_collected"):
            RemoteFile(c, f"/outputs/file?path={path}").read()
    c.kill()
    c.destroy()
    c.destroy()  # idempotent
    assert c.health()["state"] == "destroyed"
    assert runtime.list_sandboxes() == []


def test_hostile_paths_are_refused(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    c = client(agent)
    c.create(sh("true"))
    with pytest.raises(SandboxFailure, match="no command to wait for"):  # and no busy polling either
        c.wait_result(30)
    for bad in ("../escape", "/etc/passwd", "a/../../b", "", "a//b", "./x", "x/\0y"):
        with pytest.raises(JobRejected) as refused:
            c.put_file(bad, io.BytesIO(b"x"), 0o644)
        assert refused.value.rule == "path"
    for bad_dir in ("../..", "/etc", "output/../.."):
        with pytest.raises(JobRejected):
            c.outputs((bad_dir,))
    assert c.put_file("empty", io.BytesIO(b""), 0o644) == 0
    c.put_file("dir/file", io.BytesIO(b"x"), 0o7777)  # special bits are dropped, not refused
    with pytest.raises(SandboxFailure, match="IsADirectoryError"):  # a directory is not a file
        c.put_file("dir", io.BytesIO(b"x"), 0o644)
    resp = requests.put(f"{agent.url}/files?path=x&mode=99999", headers={"Authorization": f"Bearer {TOKEN}"},
                        data=b"x", timeout=5)
    assert resp.status_code == 400 and resp.json()["error"] == "bad_body"


def test_disconnect_mid_exec_then_result(start_agent) -> None:  # type: ignore[no-untyped-def]
    # Given a running command whose follower hangs up, the command runs on, once, and its result,
    # logs and outputs are all there afterwards; a second execute waits for it instead of re-running.
    agent = start_agent()
    c = client(agent)
    c.create(sh("echo before; sleep 2; mkdir -p output; echo ran >> output/runs; echo after"))
    events: list[str] = []
    with requests.post(f"{agent.url}/exec", headers={"Authorization": f"Bearer {TOKEN}"}, stream=True,
                       timeout=5) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        for line in resp.iter_lines():
            events.append(json.loads(line)["type"])
            if "keepalive" in events:
                break  # hang up while the command sleeps
    assert events[0] == "start" and "data" in events
    assert c.health()["state"] == "running"
    assert c.result() is None
    with pytest.raises(AgentConflict) as refused:  # what FlyRuntime.collect acts on: never a half-written list
        c.outputs(("output",))
    assert refused.value.reason == "running"
    result = c.execute(lambda s, d: None)  # 409 already_started, then waits for the ending
    assert result.outcome == "succeeded"
    assert c.result(wait_s=1) == result
    assert c.logs()["stdout"].read() == b"before\nafter\n"
    (runs,) = c.outputs(("output",))
    assert runs.open().read() == b"ran\n"


def test_a_broken_stream_is_transient(runtime, settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given an agent that dies mid-exec (the machine went away), the client's error is transient.
    agent = AgentProcess({"SANDBOX_WORK_DIR": settings.work_dir, "SANDBOX_AGENT_TOKEN": TOKEN,
                          "SANDBOX_AGENT_KEEPALIVE": "0.2"}, tmp_path / "killed.log").start()
    try:
        c = client(agent)
        handle = c.create(sh("echo started; sleep 30", timeout_s=60))

        def kill_agent(stream: str, data: bytes) -> None:
            agent.proc.kill()  # type: ignore[union-attr]

        with pytest.raises(AgentUnavailable):
            c.execute(kill_agent)
        with pytest.raises(AgentUnavailable):
            c.health()
    finally:
        agent.stop()
    runtime.destroy(handle)  # SIGKILL skipped the agent's teardown: the worker side's destroy does it


@pytest.mark.parametrize(("script", "limits", "outcome", "event"), [
    ("sleep 30", {"timeout_s": 1}, "timed_out", "timeout"),
    ("python3 -c 'b = bytearray(200 << 20); print(len(b))'", {"memory": 32 * MiB}, "oom_killed", "oom"),
])
def test_limits_come_through(start_agent, script: str, limits: dict, outcome: str, event: str) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    c = client(agent)
    c.create(sh(script, **limits))
    result = c.execute(lambda s, d: None)
    assert result.outcome == outcome
    assert event in [e["type"] for e in result.security_events]


def test_kill_stops_the_running_command(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    c = client(agent)
    c.create(sh("echo started; sleep 30"))
    done: list[Any] = []
    runner = threading.Thread(target=lambda: done.append(c.execute(lambda s, d: done.append(d))))
    runner.start()
    try:
        deadline_polls = 0
        while not done and deadline_polls < 200:
            threading.Event().wait(0.05)
            deadline_polls += 1
        assert done == [b"started\n"]
        client(agent).kill()
    finally:
        runner.join(20)
    assert done[-1].outcome == "cancelled" and done[-1].reason == "cancelled by request"


def test_large_file_streams_both_ways_in_bounded_memory(start_agent) -> None:  # type: ignore[no-untyped-def]
    size = 96 * MiB
    agent = start_agent()
    c = client(agent, read_s=60)
    c.create(sh("true", disk=160 * MiB))
    before = agent.peak_rss_bytes()
    sent = hashlib.sha256()

    class Source(io.RawIOBase):
        """96 MiB made up as it is read: the test holds no more of it than the agent may."""

        left = size

        def read(self, n: int = -1) -> bytes:
            n = min(self.left, 1 << 16 if n is None or n < 0 else n)
            block = (hashlib.sha256(str(self.left).encode()).digest() * (n // 32 + 1))[:n]
            self.left -= n
            sent.update(block)
            return block

    assert c.put_file("output/big.bin", Source(), 0o644) == size
    (big,) = c.outputs(("output",))
    assert big.size == size
    received = hashlib.sha256()
    with big.open() as fh:
        while block := fh.read(8 * MiB):
            received.update(block)
    assert received.hexdigest() == sent.hexdigest()
    # a Content-Length body (not chunked) works too
    resp = requests.put(f"{agent.url}/files?path=small.bin&mode=420", data=b"y" * MiB,
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert resp.json() == {"written": MiB}
    growth = agent.peak_rss_bytes() - before
    assert growth < 16 * MiB, f"agent grew by {growth / MiB:.1f} MiB moving 2 x {size // MiB} MiB"


def test_malformed_bodies_do_not_hurt_the_agent(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    c = client(agent)
    c.create(sh("true"))
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    for raw in (b"PUT /files?path=x HTTP/1.1\r\nHost: a\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"PUT /files?path=x HTTP/1.1\r\nHost: a\r\n" + auth + b"Content-Length: 100\r\n\r\nshort"):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400"), answer
    resp = requests.post(f"{agent.url}/sandbox", data=b"{not json", timeout=5,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert (resp.status_code, resp.json()["error"]) == (400, "bad_body")
    assert c.health()["state"] == "created"


def test_the_machine_runs_only_its_own_job_and_never_sees_the_token(start_agent) -> None:  # type: ignore[no-untyped-def]
    job_id = f"a{uuid.uuid4().hex[:12]}"
    agent = start_agent(SANDBOX_AGENT_JOB_ID=job_id)
    c = client(agent)
    assert c.health()["job_id"] == job_id
    with pytest.raises(SandboxFailure, match="other_job"):
        c.create(sh("true"))
    c.create(sh("cat /proc/self/environ /proc/1/environ; env; ls /proc", job_id=job_id))
    c.execute(lambda s, d: None)
    out = c.logs()["stdout"].read()
    assert TOKEN.encode() not in out and b"SANDBOX_" not in out


def test_bad_settings_stop_the_agent_naming_the_variable(tmp_path, settings: Settings) -> None:
    for env, variable in (({}, "SANDBOX_AGENT_TOKEN"),
                          ({"SANDBOX_AGENT_TOKEN": "t", "SANDBOX_AGENT_LISTEN": "0.0.0.0:8080"}, "SANDBOX_AGENT_LISTEN"),
                          ({"SANDBOX_AGENT_TOKEN_SHA256": "abc"}, "SANDBOX_AGENT_TOKEN_SHA256")):
        agent = AgentProcess({"SANDBOX_WORK_DIR": settings.work_dir, **env}, tmp_path / "bad.log")
        with pytest.raises(RuntimeError, match=variable):
            agent.start()


def test_an_unclaimed_agent_exits_on_its_own(start_agent) -> None:  # type: ignore[no-untyped-def]
    # Given a machine no worker ever reached, its agent exits, so the machine stops (auto_destroy).
    agent = start_agent(SANDBOX_AGENT_UNCLAIMED_EXIT="1")
    assert agent.wait_exit(15) == 0


def test_listens_on_an_ipv6_address(start_agent) -> None:  # type: ignore[no-untyped-def]
    # On Fly the private address is IPv6 (6PN): the agent binds it, the client reaches it bracketed.
    agent = start_agent(SANDBOX_AGENT_LISTEN="[::1]:0")
    assert agent.url.startswith("http://[::1]:")
    assert client(agent).health()["ok"] is True


def test_stopping_the_machine_mid_command_leaves_nothing(start_agent, runtime) -> None:  # type: ignore[no-untyped-def]
    # Given a running command, when the machine is stopped (SIGTERM to the agent), then the agent
    # kills the command, destroys the sandbox and exits cleanly; the follower learns it as an error
    # with the reason, never as a cancel.
    agent = start_agent()
    c = client(agent)
    c.create(sh("echo started; sleep 30", timeout_s=60))
    endings: list[Any] = []

    def follow() -> None:
        try:
            endings.append(c.execute(lambda s, d: threading.Thread(target=agent.stop).start()))
        except AgentUnavailable as e:
            endings.append(e)

    runner = threading.Thread(target=follow)
    runner.start()
    runner.join(30)
    assert agent.wait_exit(30) == 0
    assert len(endings) == 1 and not isinstance(endings[0], AgentUnavailable), endings
    assert (endings[0].outcome, endings[0].reason) == ("error", "the machine stopped while the command ran: signal SIGTERM")
    assert runtime.list_sandboxes() == []


class _EventSink:
    """An OutputSink with LogSink's event method: what a worker's sink looks like."""

    def __init__(self) -> None:
        self.out: list[tuple[str, bytes]] = []
        self.events: list[dict[str, Any]] = []

    def __call__(self, stream: str, data: bytes) -> None:
        self.out.append((stream, data))

    def event(self, entry: dict[str, Any]) -> None:
        self.events.append(entry)


def test_egress_connection_events_cross_the_exec_stream_live(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(SANDBOX_ALLOWED_HOSTS="api.test")
    c = client(agent)
    spec = replace(sh("curl -sS https://evil.test/ ; echo done"),
                   network=NetworkPolicy(outbound=True, allowed_hosts=("api.test",)))
    c.create(spec)
    sink = _EventSink()
    result = c.execute(sink)
    assert result.outcome == "succeeded", result
    assert [(e["host"], e["verdict"], e["reason"]) for e in sink.events] == [("evil.test", "refused", "host_not_allowed")]
    c.destroy()


def test_an_older_client_gets_no_event_lines(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(SANDBOX_ALLOWED_HOSTS="api.test")
    c = client(agent)
    c.create(replace(sh("curl -sS https://evil.test/ ; echo done"),
                     network=NetworkPolicy(outbound=True, allowed_hosts=("api.test",))))
    resp = requests.post(agent.url + "/exec", headers={"Authorization": f"Bearer {TOKEN}"}, data=b"", timeout=20)
    kinds = [json.loads(line)["type"] for line in resp.text.splitlines()]
    assert kinds[0] == "start" and kinds[-1] == "end" and "event" not in kinds, kinds
    c.destroy()


def test_setup_runs_once_under_its_own_policy_with_its_events_then_the_command(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(SANDBOX_ALLOWED_HOSTS="api.test")
    c = client(agent)
    net = NetworkPolicy(outbound=True, allowed_hosts=("api.test",))
    setup = SetupSpec(command="sh", argv=("/bin/sh", "-c", "curl -sS https://evil.test/ ; echo set > dep.txt"),
                      timeout_s=20, network=net)
    c.create(replace(sh("cat dep.txt; env | grep -ci https_proxy || true"), setup=setup))
    sink = _EventSink()
    first = c.setup(sink)
    assert first.outcome == "succeeded", first
    assert [(e["host"], e["reason"]) for e in sink.events] == [("evil.test", "host_not_allowed")]
    assert c.setup(_EventSink()).to_dict() == first.to_dict()  # once only: a second call gets the first's result
    out = _EventSink()
    result = c.execute(out)
    assert result.outcome == "succeeded", result
    # the command has the job's own policy (no outbound): no proxy in its environment
    assert b"".join(d for s, d in out.out if s == "stdout").split() == [b"set", b"0"]
    with pytest.raises(SandboxFailure, match="never after"):
        c.setup(_EventSink())
    c.destroy()


def test_exec_while_the_setup_runs_is_refused_like_the_other_busy_answers(start_agent) -> None:  # type: ignore[no-untyped-def]
    # Given a setup command still running, when /exec is asked for, then it is refused with 409 and
    # the body shape of every busy answer (nothing started), and runs normally once the setup ended.
    agent = start_agent()
    c = client(agent)
    setup = SetupSpec(command="sh", argv=("/bin/sh", "-c", "echo setting; sleep 2; echo set > dep.txt"), timeout_s=20)
    c.create(replace(sh("cat dep.txt; echo ran >> runs; cat runs"), setup=setup))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with requests.post(f"{agent.url}/setup", headers=auth, json={"events": True}, stream=True, timeout=10) as follow:
        lines = follow.iter_lines()
        assert json.loads(next(lines))["type"] == "start"  # the setup runs now
        busy_setup = requests.post(f"{agent.url}/setup", headers=auth, json={"events": True}, timeout=5)
        refused = requests.post(f"{agent.url}/exec", headers=auth, json={"events": True}, timeout=5)
        assert (busy_setup.status_code, refused.status_code) == (409, 409), refused.text[:500]
        assert set(refused.json()) == set(busy_setup.json()) == {"error", "message"}
        assert refused.json()["error"] == "setup_running" and busy_setup.json()["error"] == "already_started"
        assert c.health()["state"] == "created"  # the refused exec started nothing
        with pytest.raises(AgentConflict, match="setup_running") as refusal:
            c.execute(lambda s, d: None)
        assert refusal.value.reason == "setup_running"
        ended = [json.loads(line) for line in lines if line]
    assert ended[-1]["type"] == "end" and ended[-1]["result"]["outcome"] == "succeeded"
    out = _EventSink()
    result = c.execute(out)
    assert result.outcome == "succeeded", result
    assert b"".join(d for s, d in out.out if s == "stdout") == b"set\nran\n"  # once, after the setup
    c.destroy()
