"""AgentClient against a misbehaving agent (a loopback server in this process): what the machine
answers is hostile input too, so every bad answer becomes a bounded, typed error."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import pytest

from sandbox.agent.client import AgentClient
from sandbox.errors import AgentUnavailable, JobRejected, SandboxFailure

Answer = Callable[[BaseHTTPRequestHandler], None]


def ndjson(*lines: bytes) -> Answer:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/x-ndjson")
        h.end_headers()
        for line in lines:
            h.wfile.write(line + b"\n")
    return answer


def status(code: int, body: bytes) -> Answer:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return answer


@pytest.fixture
def fake_agent() -> Iterator[Callable[[Answer], AgentClient]]:
    answers: list[Answer] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            answers[-1](self)

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def client(answer: Answer) -> AgentClient:
        answers.append(answer)
        return AgentClient(f"http://127.0.0.1:{server.server_address[1]}", "tok-xyz", timeout=(2, 5))

    yield client
    server.shutdown()
    server.server_close()


START, END_OK = b'{"type":"start"}', b'{"type":"end","result":{"outcome":"succeeded","exit_code":0,"signal":null,"duration_s":0.1}}'


@pytest.mark.parametrize(("lines", "error"), [
    ((START, b'{"type":"data","stream":"stdin","data":"aGk="}', END_OK), SandboxFailure),  # no such stream
    ((START, b'{"type":"data","stream":"stdout","data":"not base64!"}', END_OK), SandboxFailure),
    ((START, b'{"type":"surprise"}', END_OK), SandboxFailure),
    ((START, b"[1, 2]", END_OK), SandboxFailure),
    ((START, b'{"type":"end","result":{"outcome":"succeeded","rm -rf":1}}'), SandboxFailure),  # not an ExecResult
    ((START, b"x" * (1 << 20)), SandboxFailure),  # one endless line: refused, not buffered
    ((START, b'{"type":"keepalive"}'), AgentUnavailable),  # the stream ended before its end event
])
def test_bad_exec_streams_are_typed_errors(fake_agent, lines: tuple[bytes, ...], error: type) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        fake_agent(ndjson(*lines)).execute(lambda s, d: None)


def test_a_good_stream_feeds_the_sink_and_survives_a_broken_sink(fake_agent) -> None:  # type: ignore[no-untyped-def]
    data = b'{"type":"data","stream":"stdout","data":"aGk="}'
    seen: list[bytes] = []

    def sink(stream: str, chunk: bytes) -> None:
        seen.append(chunk)
        raise RuntimeError("the log feed broke")  # as locally: the job's run goes on

    result = fake_agent(ndjson(START, data, b'{"type":"keepalive"}', data, END_OK)).execute(sink)
    assert result.outcome == "succeeded" and seen == [b"hi"]


@pytest.mark.parametrize(("answer", "error"), [
    (status(400, b'{"error":"rejected","field":"/files/0/path","rule":"path","message":"no"}'), JobRejected),
    (status(401, b'{"error":"unauthorized"}'), SandboxFailure),
    (status(500, b"<html>oops</html>"), SandboxFailure),
    (status(503, b""), AgentUnavailable),
    (status(429, b"{}"), AgentUnavailable),
    (status(200, b"[]"), SandboxFailure),  # not an object
    (status(200, b'{"files":[{"relpath":"a"}]}'), SandboxFailure),  # no size
    (status(200, b'{"files":[],"skipped":[{"path":"a"}]}'), SandboxFailure),  # no reason
    (status(200, b'{"files":[],"skipped":[],"not_listed":-1}'), SandboxFailure),
    (status(200, b'{"files":[],"skipped":[],"not_listed":"many"}'), SandboxFailure),
])
def test_bad_answers_are_typed_errors(fake_agent, answer: Answer, error: type) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as raised:
        fake_agent(answer).outputs(("output",))
    assert "tok-xyz" not in str(raised.value)


def test_an_oversized_answer_is_refused_unread(fake_agent) -> None:  # type: ignore[no-untyped-def]
    huge = json.dumps({"files": [], "pad": "x" * (9 << 20)}).encode()
    with pytest.raises(SandboxFailure, match="answer over"):
        fake_agent(status(200, huge)).outputs(("output",))


def test_an_output_whose_size_changed_is_refused(fake_agent) -> None:  # type: ignore[no-untyped-def]
    listing = b'{"files":[{"relpath":"output/a","size":3}],"skipped":[]}'
    served = iter([status(200, listing), status(200, b"four")])
    c = fake_agent(lambda h: next(served)(h))
    (f,) = c.outputs(("output",))
    with pytest.raises(SandboxFailure, match="size changed"):
        f.open().read()


def test_unreachable_is_transient() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(AgentUnavailable) as raised:
        AgentClient(f"http://127.0.0.1:{port}", "tok-xyz", timeout=(1, 1)).health()
    assert "tok-xyz" not in str(raised.value) and "tok-xyz" not in repr(raised.value.__cause__)


def test_a_skipped_list_past_the_walks_own_is_cut_and_counted(fake_agent) -> None:  # type: ignore[no-untyped-def]
    skipped = [{"path": "output/" + "p" * 5000, "reason": "max_output_files"}] * 1050
    answer = json.dumps({"files": [], "skipped": skipped, "not_listed": 7}).encode()
    outputs = fake_agent(status(200, answer)).outputs(("output",))
    assert len(outputs.skipped) == 1001 and outputs.not_listed == 7 + 49
    assert all(len(e["path"]) == 2048 for e in outputs.skipped)
