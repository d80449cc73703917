"""The egress proxy's policy, from inside real sandboxes, against upstreams in a test network namespace.

DNS: the static host map (SANDBOX_EGRESS_HOSTS) and an injected lookup are the proxy's only
resolvers here, and `Resolver.lookups` counts every answer either gives: "no DNS query made" is
asserted on that counter.
"""
from __future__ import annotations

import dataclasses
import io
import socket
import subprocess
import threading
import time
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from sandbox.errors import JobRejected
from sandbox.spec import SetupSpec
from tests.support.egress import BAD_ADDRESSES, Box, Sink, entries, upstream  # noqa: F401 (fixture)
from tests.support.netns import Upstream

BLOCKED = (22, 25, 465, 587, 2375, 2376, 3306, 5432, 6379, 11211, 27017)


@pytest.fixture(scope="module")
def box(upstream: Upstream) -> Iterator[Box]:
    b = Box(upstream)
    yield b
    b.close()


def test_curl_fetches_an_allowed_host_over_https_and_http_with_no_job_side_configuration(box: Box) -> None:
    result, sink = box.run(box.job("curl -sS https://api.test/hello http://api.test/hello",
                                   hosts=["api.test"], ports=[80, 443]))
    assert result.outcome == "succeeded", bytes(sink.out["stderr"])
    assert bytes(sink.out["stdout"]) == b"hello api.test\nhello api.test\n"
    log = entries(result)
    assert [(e["kind"], e["host"], e["port"], e["verdict"]) for e in sorted(log, key=lambda e: e["port"])] == [
        ("http", "api.test", 80, "allowed"), ("connect", "api.test", 443, "allowed")]
    tls = next(e for e in log if e["port"] == 443)
    assert tls["sni"] == "api.test" and tls["address"] == box.up.address
    assert tls["bytes_up"] > 0 and tls["bytes_down"] > 0 and tls["duration_s"] > 0
    assert result.network["totals"]["bytes_down"] == sum(e["bytes_down"] for e in log)
    assert len(sink.events) == 2  # each connection was published live as it ended


def test_an_ipv6_upstream_is_reached_at_the_checked_ipv6_address(box: Box) -> None:
    result, sink = box.run(box.job("curl -sS https://v6.test/hello", hosts=["v6.test"]))
    assert bytes(sink.out["stdout"]) == b"hello v6.test\n", bytes(sink.out["stderr"])
    (entry,) = entries(result)
    assert entry["address"] == box.up.address6 and entry["verdict"] == "allowed"


def test_python_urllib_and_git_find_the_proxy_by_themselves(box: Box) -> None:
    got, result, _ = box.probe("download", "https://files.test/bytes/100000", hosts=["files.test"])
    assert got == {"results": [100000]}
    # pip reaches the index through the proxy and reads its page (the upstream serves no packages)
    got, result, _ = box.probe("pip", "https://files.test/simple/", hosts=["files.test"])
    assert "Skipping page https://files.test/simple/somepkg/" in got["output"], got
    assert [(e["host"], e["verdict"]) for e in entries(result)] == [("files.test", "allowed")]
    assert entries(result)[0]["bytes_down"] > 0
    # git over https reaches the upstream through the proxy (which is no git server: a 501 from it)
    result, sink = box.run(box.job("git ls-remote https://api.test/repo.git", hosts=["api.test"]))
    log = entries(result)
    assert [e["host"] for e in log] and all(e["verdict"] == "allowed" for e in log), log


def test_a_host_not_on_the_list_is_refused_before_any_dns_lookup(box: Box) -> None:
    before = box.rt.egress.resolver.lookups
    got, result, _ = box.probe("connect", "other.test:443", "evil.example.com:443", "api.test.:443",
                               hosts=["files.test"])
    assert got["other.test:443"] == {"status": 403, "reason": "host_not_allowed"}
    assert got["evil.example.com:443"] == {"status": 403, "reason": "host_not_allowed"}
    assert box.rt.egress.resolver.lookups == before  # nothing was resolved: no name left by DNS
    assert {e["reason"] for e in entries(result)} == {"host_not_allowed"}
    assert any(ev["type"] == "egress_refused" for ev in result.security_events)


def test_every_blocked_port_is_refused_and_ports_must_be_asked_for(box: Box) -> None:
    targets = [f"api.test:{p}" for p in BLOCKED] + ["api.test:8443", "api.test:80"]
    got, _, _ = box.probe("connect", *targets, hosts=["api.test"])
    for port in BLOCKED:
        assert got[f"api.test:{port}"] == {"status": 403, "reason": "port_blocked"}, port
    assert got["api.test:8443"] == {"status": 403, "reason": "port_not_allowed"}  # default [443]
    assert got["api.test:80"] == {"status": 403, "reason": "port_not_allowed"}
    with pytest.raises(JobRejected) as caught:  # asking for a blocked port fails validation
        box.job("curl https://api.test/", hosts=["api.test"], ports=[443, 6379])
    assert caught.value.rule == "port_blocked"


def test_names_that_resolve_to_non_global_addresses_are_refused(box: Box) -> None:
    targets = [f"{name}:443" for name in BAD_ADDRESSES]
    got, result, _ = box.probe("connect", *targets, hosts=list(BAD_ADDRESSES))
    for target in targets:
        assert got[target] == {"status": 403, "reason": "address_not_global"}, (target, got[target])
    assert all(e["address"] is None for e in entries(result))  # refused before any connect


def test_ip_literals_in_every_spelling_are_refused(box: Box) -> None:
    targets = ["2130706433:443", "0177.0.0.1:443", "0x7f.1:443", "127.1:443", "[::1]:443",
               "[::ffff:127.0.0.1]:443", "169.254.169.254:443", f"{box.up.address}:443"]
    got, _, _ = box.probe("connect", *targets, hosts=["api.test"])
    for target in targets:
        assert got[target] == {"status": 403, "reason": "ip_literal"}, target
    got, _, _ = box.probe("connect", "api%2etest:443", "a@api.test:443", "api.test:99999", hosts=["api.test"])
    assert got["api%2etest:443"]["reason"] == "bad_host"
    assert got["a@api.test:443"]["reason"] == "bad_host"
    assert got["api.test:99999"] == {"status": 400, "reason": "bad_request"}


def test_a_name_whose_resolution_changes_is_connected_to_at_the_address_checked(box: Box) -> None:
    """DNS rebinding: the first answer is the upstream, every later one is loopback."""
    calls: list[str] = []

    async def flipping(host: str, port: int) -> list[str]:
        calls.append(host)
        return [box.up.address] if len(calls) == 1 else ["127.0.0.1"]

    resolver = box.rt.egress.resolver
    resolver.dns = flipping
    try:
        got, result, _ = box.probe("connect", "flip.test:443", "flip.test:443", hosts=["flip.test"])
    finally:
        resolver.dns = None
    log = sorted(entries(result), key=lambda e: e["at"])
    # one lookup per connection: the first connection used the address it checked, not a new answer
    assert calls == ["flip.test", "flip.test"]
    assert log[0]["address"] == box.up.address and log[0]["reason"] != "address_not_global"
    assert log[1]["reason"] == "address_not_global" and log[1]["address"] is None


def test_tls_naming_another_host_than_the_connect_host_is_cut(box: Box) -> None:
    got, result, _ = box.probe("sni", "api.test", "other.test", "/workspace/ca.pem", hosts=["api.test", "other.test"])
    assert got["connect"]["status"] == 200 and got["tls"] != "ok"
    entry = entries(result)[0]
    assert (entry["reason"], entry["sni"], entry["verdict"]) == ("sni_mismatch", "other.test", "refused")
    assert entry["bytes_down"] == 0  # the upstream never saw the ClientHello
    got, _, _ = box.probe("sni", "api.test", "api.test", "/workspace/ca.pem", hosts=["api.test"])
    assert got["tls"] == "ok" and got["body"].startswith("HTTP/1.1 200")


def test_every_request_on_a_kept_alive_plain_connection_must_name_the_same_host(box: Box) -> None:
    got, result, _ = box.probe("keepalive", "api.test", "other.test", "api.test", hosts=["api.test"], ports=[80])
    assert got["first"]["status"] == 200 and "hello api.test" in got["first_body"]
    # Upstream bytes went back on this connection: the proxy closes it instead of writing a 403
    # (which could land inside a response still streaming); the log says why.
    assert got["second"] == {"status": None, "reason": None}
    assert [(e["verdict"], e["reason"]) for e in result.network["connections"]] == [("refused", "host_mismatch")]
    got, result, _ = box.probe("keepalive", "api.test", "api.test", "other.test", hosts=["api.test", "other.test"], ports=[80])
    assert got["second"] == {"status": None, "reason": None}  # another host in the URL, too
    assert [e["reason"] for e in result.network["connections"]] == ["host_mismatch"]
    got, _, _ = box.probe("keepalive", "api.test", "api.test", "api.test", hosts=["api.test"], ports=[80])
    assert got["second"]["status"] == 200


def test_without_the_proxy_nothing_leaves_the_sandbox(box: Box) -> None:
    got, _, _ = box.probe("direct", box.up.address, hosts=["api.test"])
    assert got["tcp"].startswith("OSError:101")  # ENETUNREACH: the sandbox has only loopback
    assert got["udp"].startswith("OSError:101")
    assert got["dns"] != "ok"  # no nameserver in resolv.conf, no network to ask one


def test_the_worker_side_is_out_of_reach(box: Box, redis_url: str) -> None:
    redis_port = urlsplit(redis_url).port
    got, _, _ = box.probe("tcp", "127.0.0.1", str(redis_port), hosts=["api.test"])
    assert got["tcp"].startswith("ConnectionRefusedError")  # the worker's real Redis: not there
    host_listener = socket.create_server(("127.0.0.1", 0))
    port = host_listener.getsockname()[1]
    host_listener.settimeout(0.2)
    try:
        got, _, _ = box.probe("tcp", "127.0.0.1", str(port), hosts=["api.test"])
        assert got["tcp"].startswith("ConnectionRefusedError")  # its own loopback, not the host's
        got, _, _ = box.probe("tcp", box.up.host_address, "3128", hosts=["api.test"])
        assert got["tcp"].startswith("OSError:101")  # the proxy has no host side to connect to
        got, _, _ = box.probe("connect", f"loop.test:{port}", hosts=["loop.test"], ports=[port])
        assert got[f"loop.test:{port}"] == {"status": 403, "reason": "address_not_global"}
        with pytest.raises(socket.timeout):
            host_listener.accept()
    finally:
        host_listener.close()


def test_nothing_outside_can_open_a_connection_to_a_job(box: Box) -> None:
    """The job listens on every address of its namespace; the host and the upstream try to reach it."""
    spec = box.job("python3 probe.py listen 8080 3", hosts=["api.test"])
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(zip(("result", "sink"), box.run(spec))))
    t.start()
    time.sleep(1.0)
    attempts = []
    for address in ("127.0.0.1", box.up.host_address):
        try:
            socket.create_connection((address, 8080), timeout=1).close()
            attempts.append("connected")
        except OSError as e:
            attempts.append(type(e).__name__)
    from_upstream = subprocess.run(
        ["ip", "netns", "exec", box.up.netns, "python3", "-c",
         f"import socket;socket.create_connection(('{box.up.host_address}',8080),timeout=1)"],
        capture_output=True, timeout=10)
    t.join(30)
    assert attempts == ["ConnectionRefusedError", "ConnectionRefusedError"]
    assert from_upstream.returncode != 0
    assert done["sink"].result() == {"accepted": 0}


def test_a_job_without_outbound_has_no_proxy_and_no_network(box: Box) -> None:
    spec = box.job("python3 probe.py tcp 127.0.0.1 3128", hosts=["api.test"])
    spec = dataclasses.replace(spec, network=type(spec.network)())
    result, sink = box.run(spec)
    assert sink.result()["tcp"].startswith("ConnectionRefusedError")
    assert result.network is None


def test_setup_may_have_network_while_the_command_has_none_and_no_flow_survives_the_change(box: Box) -> None:
    spec = box.job("python3 probe.py tcp 127.0.0.1 3128", hosts=["api.test"])
    spec = dataclasses.replace(spec, network=type(spec.network)())  # the command: no network
    setup = box.job("curl -sS -o dep.txt https://files.test/hello", hosts=["files.test"])
    spec = dataclasses.replace(spec, setup=SetupSpec(setup.command, setup.argv, 30.0, setup.network))
    sink_setup, sink = Sink(), Sink()
    handle = box.rt.create(spec, "test-host")
    try:
        for f in spec.files:
            box.rt.put_file(handle, f.path, io.BytesIO(f.content or b""), f.mode)
        first = box.rt.setup(handle, spec, sink_setup)
        result = box.rt.execute(handle, spec, sink)
        logs = {k: v.read() for k, v in box.rt.logs(handle).items()}
    finally:
        box.rt.destroy(handle)
    assert first.outcome == "succeeded", bytes(sink_setup.out["stderr"])
    (entry,) = entries(first)
    assert (entry["host"], entry["verdict"]) == ("files.test", "allowed")
    assert sink.result()["tcp"].startswith("ConnectionRefusedError")  # the proxy went with the setup
    assert result.network is None
    assert set(logs) == {"stdout", "stderr", "setup-stdout", "setup-stderr"}


def test_hostile_request_heads_are_refused_with_a_reason(box: Box) -> None:
    heads = [
        "b'GET http://api.test/' + b'a' * 20000 + b' HTTP/1.1\\r\\n\\r\\n'",  # longer than the 16 KiB head limit
        "b'POST http://api.test/ HTTP/1.1\\r\\nHost: api.test\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n'",
        "b'GET http://api.test/ HTTP/1.1\\r\\nHost: api.test\\r\\n  folded: x\\r\\n\\r\\n'",
        "b'GET /relative HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n'",
        "b'CONNECT 127.0.0.1:3128 HTTP/1.1\\r\\n\\r\\n'",
        "b'CONNECT api.test HTTP/1.1\\r\\n\\r\\n'",
        "b'\\x16\\x03\\x01\\x00\\x05hello\\r\\n\\r\\n'",
    ]
    got, result, _ = box.probe("raw", *heads, hosts=["api.test"], ports=[80, 443])
    assert [got[h]["status"] for h in heads] == [400, 400, 400, 400, 403, 400, 400], got
    assert got[heads[4]]["reason"] == "ip_literal"
    assert all(e["address"] is None for e in entries(result))  # none reached an upstream


def test_wget_fetches_over_http_and_https_and_a_planted_wgetrc_is_not_read(upstream: Upstream) -> None:
    """wget is on the default allow-list: it must run at all (a WGETRC that is not a regular file,
    such as /dev/null, stops it before it reads its arguments), reach upstreams through the proxy,
    and ignore a .wgetrc among the job's files."""
    b = Box(upstream, SANDBOX_ALLOWED_COMMANDS="wget")
    try:
        spec = b.job("wget -O - --ca-certificate=ca.pem http://api.test/hello https://api.test/hello",
                     hosts=["api.test"], ports=[80, 443])
        planted = b"server_response = on\n"  # prints the response head ("  HTTP/1.1 200 OK") to stderr

        def run(job):  # noqa: ANN001, ANN202
            sink = Sink()
            handle = b.rt.create(job, "test-host")
            try:
                for f in job.files:
                    b.rt.put_file(handle, f.path, io.BytesIO(f.content or b""), f.mode)
                b.rt.put_file(handle, ".wgetrc", io.BytesIO(planted), 0o644)  # the policy refuses the name
                return b.rt.execute(handle, job, sink), sink
            finally:
                b.rt.destroy(handle)

        result, sink = run(spec)
        err = bytes(sink.out["stderr"])
        assert result.outcome == "succeeded", err
        assert bytes(sink.out["stdout"]) == b"hello api.test\nhello api.test\n"
        assert b"WGETRC" not in err and b"wgetrc" not in err, err  # no complaint about its config files
        assert b"HTTP/1.1 200" not in err, err
        assert sorted((e["host"], e["port"], e["verdict"]) for e in entries(result)) == [
            ("api.test", 80, "allowed"), ("api.test", 443, "allowed")]
        # The same file named on the command line (the policy refuses --config) is read: the
        # check above can fail.
        result, sink = run(dataclasses.replace(spec, argv=(spec.argv[0], "--config=.wgetrc", *spec.argv[1:])))
        assert result.outcome == "succeeded" and b"HTTP/1.1 200" in bytes(sink.out["stderr"])
    finally:
        b.close()
