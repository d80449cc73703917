"""The egress policy and its checks, in the order every connection meets them: normalise the
target, port, host (before any DNS lookup), resolve, every address global, then pin that address."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from sandbox.hosts import host_within, normalise_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never reachable, whatever SANDBOX_EGRESS_ALLOW_CIDRS opens: cloud metadata services.
METADATA = tuple(ipaddress.ip_network(n) for n in ("169.254.169.254/32", "fd00:ec2::254/128"))
# Not global, or a wrapper that carries an IPv4 address somewhere else (IPv4-compatible, NAT64,
# 6to4, Teredo); ipaddress's is_global misses some of these (and calls 100.64/10 neither).
REFUSED_NETS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "192.0.0.0/24", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4", "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "fe80::/10",
    "fc00::/7", "ff00::/8",
))


class Refused(Exception):
    """A connection the policy refuses; `reason` is the one-word code the client and record get."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class EgressPolicy:
    """What one job may reach, after the operator's ceilings: hosts, ports, rate and caps."""

    allowed_hosts: tuple[str, ...]  # normalised names, "*.x" for subdomains of x only
    allowed_ports: tuple[int, ...] = (443,)
    blocked_ports: frozenset[int] = frozenset()
    allow_cidrs: tuple[IPNetwork, ...] = ()
    rate_bytes_per_s: float = 0.0  # 0: no rate limit
    max_bytes: int = 1 << 30  # up + down, every connection of the job together
    max_connections: int = 1000
    max_concurrent: int = 32
    max_log_entries: int = 200  # kept on the record; the rest are counted as dropped


def normalise_target(host: str) -> str:
    """The target host as the allow-list spells names; Refused("bad_host") for anything odd."""
    if not host or len(host) > 253 or "%" in host or any(c.isspace() for c in host):
        raise Refused("bad_host", "empty, too long, or holds '%' or whitespace")
    name, rule, why = normalise_host(host)
    if rule == "ip_literal":
        raise Refused("ip_literal", "connect by host name; IP addresses are never allowed")
    if rule or name.startswith("*."):
        raise Refused("bad_host", why or "wildcards are for allow-lists only")
    return name


def check_port(policy: EgressPolicy, port: int) -> None:
    """The port must be one the job asked for and not one anybody blocked."""
    if port in policy.blocked_ports:
        raise Refused("port_blocked", f"port {port} is blocked")
    if port not in policy.allowed_ports:
        raise Refused("port_not_allowed", f"port {port} is not in network.allowed_ports")


def check_host(policy: EgressPolicy, host: str) -> None:
    """The (normalised) host must match an allowed entry; no DNS lookup has happened yet."""
    if not any(host_within(host, allowed) for allowed in policy.allowed_hosts):
        raise Refused("host_not_allowed", f"{host} is not in network.allowed_hosts")


def check_address(address: str, allow_cidrs: Iterable[IPNetwork] = ()) -> IPAddress:
    """The address to connect to, if it is globally routable or inside an operator-opened CIDR."""
    try:
        ip: IPAddress = ipaddress.ip_address(address)
    except ValueError as e:  # a scoped v6 address ("fe80::1%eth0") is never global anyway
        raise Refused("address_not_global", f"{address!r} is not a plain IP address") from e
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 (Python 3.11 says otherwise)
    if any(ip in net for net in METADATA):
        raise Refused("address_not_global", f"{ip} is a metadata service")
    if any(ip.version == net.version and ip in net for net in allow_cidrs):
        return ip
    if (not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
            or ip.is_private or any(ip.version == net.version and ip in net for net in REFUSED_NETS)):
        raise Refused("address_not_global", f"{ip} is not a global address")
    return ip


Lookup = Callable[[str, int], Awaitable[list[str]]]


@dataclass
class Resolver:
    """Host names to addresses: the operator's static map first, then the host's resolver.

    `lookups` counts every answer given (map or DNS), so a test can see that a refused name was
    never looked up.
    """

    host_map: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dns: Lookup | None = None  # injectable; default getaddrinfo on the event loop
    lookups: int = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if host in self.host_map:
            return list(self.host_map[host])
        if self.dns is not None:
            return await self.dns(host, port)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))


async def resolve_checked(policy: EgressPolicy, resolver: Resolver, host: str, port: int) -> list[IPAddress]:
    """Every address of `host`, each checked; one non-global answer refuses them all."""
    try:
        answers = await resolver.resolve(host, port)
    except OSError as e:
        raise Refused("dns_failed", f"{host} did not resolve") from e
    if not answers:
        raise Refused("dns_failed", f"{host} has no address")
    return [check_address(a, policy.allow_cidrs) for a in answers]


def parse_host_map(text: str) -> dict[str, tuple[str, ...]]:
    """SANDBOX_EGRESS_HOSTS: "name=addr[|addr...],..." with names normalised and addresses parsed."""
    out: dict[str, tuple[str, ...]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, addrs = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not name=address")
        normal, rule, why = normalise_host(name.strip())
        if rule or normal.startswith("*."):
            raise ValueError(f"{name!r}: {why or 'no wildcards'}")
        out[normal] = tuple(str(ipaddress.ip_address(a.strip())) for a in addrs.split("|") if a.strip())
        if not out[normal]:
            raise ValueError(f"{name!r} has no address")
    return out


def parse_cidrs(text: str) -> tuple[IPNetwork, ...]:
    """SANDBOX_EGRESS_ALLOW_CIDRS: comma-separated networks ("10.203.0.0/30,fd12::/64")."""
    return tuple(ipaddress.ip_network(part.strip(), strict=True) for part in text.split(",") if part.strip())
