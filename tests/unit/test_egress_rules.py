"""The egress proxy's rules and parsers, without sockets: hosts, ports, addresses, SNI, HTTP heads."""
from __future__ import annotations

import asyncio
import ssl

import pytest

from config.settings import load_settings
from config.units import parse_bandwidth
from sandbox.egress import http, tls
from sandbox.egress.bucket import TokenBucket
from sandbox.egress.rules import (EgressPolicy, Refused, Resolver, check_address, check_host, check_port,
                                  normalise_target, parse_cidrs, parse_host_map, resolve_checked)
from sandbox.errors import ConfigError


def reason(fn, *args):  # type: ignore[no-untyped-def]
    with pytest.raises(Refused) as caught:
        fn(*args)
    return caught.value.reason


@pytest.mark.parametrize("raw,expected", [("API.Test.", "api.test"), ("bücher.example", "xn--bcher-kva.example")])
def test_targets_are_normalised(raw: str, expected: str) -> None:
    assert normalise_target(raw) == expected


@pytest.mark.parametrize("raw,rule", [
    ("2130706433", "ip_literal"), ("0177.0.0.1", "ip_literal"), ("0x7f.1", "ip_literal"), ("127.1", "ip_literal"),
    ("[::1]", "ip_literal"), ("::ffff:127.0.0.1", "ip_literal"), ("user@api.test", "bad_host"),
    ("api .test", "bad_host"), ("api%2etest", "bad_host"), ("[api.test", "ip_literal"), ("*.api.test", "bad_host"),
    ("", "bad_host"), ("localhost", "bad_host"), ("metadata.google.internal", "bad_host"),
])
def test_odd_targets_are_refused(raw: str, rule: str) -> None:
    assert reason(normalise_target, raw) == rule


def test_ports_must_be_asked_for_and_never_blocked() -> None:
    policy = EgressPolicy(allowed_hosts=("api.test",), allowed_ports=(443, 22), blocked_ports=frozenset({22}))
    check_port(policy, 443)
    assert reason(check_port, policy, 22) == "port_blocked"
    assert reason(check_port, policy, 80) == "port_not_allowed"


def test_wildcards_cover_subdomains_only() -> None:
    policy = EgressPolicy(allowed_hosts=("*.example.com", "api.test"))
    check_host(policy, "a.b.example.com")
    check_host(policy, "api.test")
    for host in ("example.com", "evilexample.com", "sub.api.test"):
        assert reason(check_host, policy, host) == "host_not_allowed"


@pytest.mark.parametrize("address", [
    "127.0.0.1", "::1", "::ffff:127.0.0.1", "::127.0.0.1", "::ffff:10.0.0.1", "169.254.169.254", "fd00:ec2::254",
    "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "fe80::1", "fc00::1", "64:ff9b::7f00:1", "2002:7f00:1::1", "2001::1", "ff02::1", "fe80::1%eth0", "not-an-ip",
])
def test_non_global_addresses_are_refused(address: str) -> None:
    assert reason(check_address, address) == "address_not_global"


def test_global_addresses_pass_and_operators_open_internal_cidrs_but_never_metadata() -> None:
    assert str(check_address("93.184.216.34")) == "93.184.216.34"
    assert str(check_address("2606:2800:220:1::1")) == "2606:2800:220:1::1"
    opened = parse_cidrs("10.203.0.0/30,169.254.0.0/16")
    assert str(check_address("::ffff:10.203.0.2", opened)) == "10.203.0.2"  # unmapped first
    assert reason(check_address, "10.203.0.5", opened) == "address_not_global"
    assert reason(check_address, "169.254.169.254", opened) == "address_not_global"


def test_one_bad_answer_refuses_the_name_and_a_refused_host_is_never_looked_up() -> None:
    async def dns(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.1"]

    resolver = Resolver({"api.test": ("93.184.216.34",)}, dns=dns)
    policy = EgressPolicy(allowed_hosts=("api.test",))
    assert [str(a) for a in asyncio.run(resolve_checked(policy, resolver, "api.test", 443))] == ["93.184.216.34"]
    with pytest.raises(Refused):
        asyncio.run(resolve_checked(policy, resolver, "mixed.test", 443))
    assert resolver.lookups == 2


def test_host_map_and_cidr_settings_are_checked_at_start_up() -> None:
    assert parse_host_map("API.test=10.0.0.2|::1, b.test=1.2.3.4") == {"api.test": ("10.0.0.2", "::1"),
                                                                      "b.test": ("1.2.3.4",)}
    for env, value in (("SANDBOX_EGRESS_HOSTS", "api.test"), ("SANDBOX_EGRESS_HOSTS", "api.test=300.1.1.1"),
                       ("SANDBOX_EGRESS_HOSTS", "*.x.test=1.2.3.4"), ("SANDBOX_EGRESS_ALLOW_CIDRS", "10.0.0.1/8"),
                       ("SANDBOX_DEFAULT_BANDWIDTH", "fast"), ("SANDBOX_DEFAULT_BANDWIDTH", "2Gbps")):
        with pytest.raises(ConfigError) as caught:
            load_settings({env: value})
        assert caught.value.args[0].startswith(env) or env in str(caught.value)


def test_bandwidth_units_are_bits_per_second() -> None:
    assert parse_bandwidth("10Mbps") == 10_000_000 and parse_bandwidth("500kbps") == 500_000
    with pytest.raises(ValueError):
        parse_bandwidth("10MB/s")


def _client_hello(server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _read_hello(raw: bytes) -> tuple[bytes, str | None]:
    async def go() -> tuple[bytes, str | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await tls.read_client_hello(reader)

    return asyncio.run(go())


def test_the_sni_of_a_real_client_hello_is_read() -> None:
    hello = _client_hello("API.test")
    raw, name = _read_hello(hello)
    assert name == "api.test" and raw == hello
    assert _read_hello(_client_hello(None))[1] is None


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                 b"\x16\x03\x01\x00\x00"])
def test_what_is_not_a_client_hello_is_refused(raw: bytes) -> None:
    with pytest.raises(tls.NotTLS):
        _read_hello(raw)


def test_request_heads_are_parsed_strictly() -> None:
    head = http.parse_head(b"GET http://api.test/x?y HTTP/1.1\r\nHost: api.test\r\nProxy-Connection: keep-alive\r\n\r\n")
    assert http.split_absolute(head.target) == ("api.test", "/x?y")
    assert head.origin_form("/x?y") == b"GET /x?y HTTP/1.1\r\nhost: api.test\r\n\r\n"
    for bad in (b"GET  http://a/ HTTP/1.1\r\n\r\n", b"GET http://a/ HTTP/2\r\n\r\n",
                b"GET http://a/ HTTP/1.1\r\n folded: x\r\n\r\n", b"GET http://a/ HTTP/1.1\r\nBad Name: x\r\n\r\n"):
        assert reason(http.parse_head, bad) == "bad_request"
    smuggle = http.parse_head(b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reason(http.body_framing, smuggle) == "bad_request"
    assert reason(http.split_absolute, "https://a/") == "bad_request"
    assert reason(http.split_absolute, "http://u@a/") == "bad_host"
    assert http.split_authority("[::1]:443", None) == ("[::1]", 443)
    assert reason(http.split_authority, "a.test", None) == "bad_request"


def test_the_token_bucket_charges_debt_so_concurrent_takers_share_the_rate() -> None:
    bucket = TokenBucket(1_000_000)  # 1 MB/s, 64 KiB burst
    asyncio.run(bucket.take(64 * 1024))
    assert bucket.tokens <= 0.01 * bucket.rate
    unlimited = TokenBucket(0)
    asyncio.run(unlimited.take(10**9))  # returns at once


def test_a_fly_machine_gets_the_operators_egress_settings_in_a_form_it_parses_back() -> None:
    from sandbox.agent.protocol import machine_env

    worker = load_settings({"SANDBOX_EGRESS_HOSTS": "api.test=10.0.0.2|::1,b.test=1.2.3.4",
                            "SANDBOX_EGRESS_ALLOW_CIDRS": "10.0.0.0/30", "SANDBOX_EGRESS_MAX_BYTES": "5Mi",
                            "SANDBOX_BLOCKED_PORTS": "22,25"})
    machine = load_settings(machine_env(worker, "token", "job-1"))
    for name in ("egress_hosts", "egress_allow_cidrs", "egress_max_bytes", "egress_max_connections",
                 "blocked_ports"):
        assert getattr(machine, name) == getattr(worker, name), name
