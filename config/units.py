"""Parsing of the units jobs and operators write: cpu "0.5", sizes "512Mi", "1Gi", "1G"."""
from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T|k)?B?$")
_FACTORS = {
    None: 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
_CPU = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m)?$")


def parse_size(text: str) -> int:
    """Bytes from "512Mi", "1Gi", "1G", "100M" or a plain byte count; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("must be a string such as \"512Mi\"")
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size such as \"512Mi\", \"1Gi\" or \"1G\"")
    value = float(match.group(1)) * _FACTORS[match.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return int(value)


def parse_cpu(text: str) -> float:
    """Cores from "0.5", "2" or "500m"; ValueError for anything else or for zero."""
    if not isinstance(text, str):
        raise ValueError("must be a string such as \"0.5\"")
    match = _CPU.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a cpu amount such as \"0.5\" or \"500m\"")
    value = float(match.group(1)) / (1000 if match.group(2) else 1)
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return value


def format_size(n: int) -> str:
    """The shortest exact binary-suffixed form, for messages."""
    for suffix, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(k|K|M|G)?(bps|bit/s)$")


def parse_bandwidth(text: str) -> int:
    """Bits per second from "10Mbps", "500kbps", "1Gbps" (decimal units, as networks count)."""
    if not isinstance(text, str):
        raise ValueError("must be a string such as \"10Mbps\"")
    match = _RATE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a rate such as \"10Mbps\", \"500kbps\" or \"1Gbps\"")
    value = float(match.group(1)) * _FACTORS[match.group(2)]
    if not math.isfinite(value) or value < 1000:
        raise ValueError(f"{text!r} must be at least 1kbps")
    return int(value)
