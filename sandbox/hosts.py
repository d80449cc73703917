"""Host-name rules shared by the job policy and the egress proxy: normalising names and matching
them against allow-lists. Standard library and idna only, so the in-machine agent (which runs the
proxy inside a Fly machine) needs nothing more."""
from __future__ import annotations

import ipaddress
import re

import idna

INTERNAL_NAMES = frozenset({"localhost", "metadata", "instance-data", "metadata.google.internal", "kubernetes"})
INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".intranet", ".lan", ".home", ".corp", ".arpa",
                     ".localdomain", ".home.arpa", ".svc", ".onion")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


def normalise_host(entry: str) -> tuple[str, str, str]:
    """(normalised name, rule, why); rule is "" when the entry is an acceptable host name."""
    if "@" in entry:
        return entry, "userinfo", "user info is not allowed; give a host name only"
    if entry.count(":") >= 2 or entry.startswith("["):
        return entry, "ip_literal", "IP addresses are not allowed; give a host name"
    if ":" in entry:
        return entry, "port", "ports are not allowed; give a host name only"
    if re.search(r"[/?#\\\s\x00-\x1f]", entry):
        return entry, "host_syntax", "give a host name only, not a URL"
    wildcard = entry.startswith("*.")
    body = entry[2:] if wildcard else entry
    if "*" in body:
        return entry, "wildcard", "only a leading '*.' wildcard is allowed"
    try:
        ascii_name = idna.encode(body.rstrip(".") if body.endswith(".") and not body.endswith("..") else body,
                                 uts46=True, std3_rules=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        return entry, "invalid_host", f"not a valid host name ({e})"
    labels = ascii_name.split(".")
    if wildcard and len(labels) < 2:
        return entry, "wildcard", "a wildcard must sit above a name of at least two labels"
    if _NUMERIC_LABEL.fullmatch(labels[-1]) or _is_ip(ascii_name):  # 127.1, 2130706433, 0x7f.1, 0177.0.0.1
        return entry, "ip_literal", "IP addresses are not allowed in any spelling; give a host name"
    if ascii_name in INTERNAL_NAMES or ascii_name.endswith(INTERNAL_SUFFIXES) or len(labels) < 2:
        return entry, "internal_name", "local, internal and single-label names are not allowed"
    return ("*." if wildcard else "") + ascii_name, "", ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_within(name: str, allowed: str) -> bool:
    """True if `name` (maybe "*.x") lies within the operator entry `allowed` ("*.y" covers subdomains of y)."""
    if not allowed.startswith("*."):
        return name == allowed
    base = allowed[2:]
    if name.startswith("*."):
        return name[2:] == base or name[2:].endswith("." + base)
    return name.endswith("." + base)
