"""The little HTTP/1.x a forward proxy must read: request heads, authorities and request bodies."""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Awaitable, Callable

from sandbox.egress.rules import Refused

MAX_HEAD_BYTES = 16 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(rb"[A-Z]{1,16}")
_HOP_BY_HOP = {b"proxy-connection", b"proxy-authorization", b"proxy-authenticate"}


@dataclass
class RequestHead:
    """One parsed request head; header names lower-cased, values as sent."""

    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def origin_form(self, path: str) -> bytes:
        """The head to send upstream: origin-form target, no proxy-only headers."""
        lines = [f"{self.method} {path} {self.version}".encode("latin-1")]
        lines += [k + b": " + v for k, v in self.headers if k not in _HOP_BY_HOP]
        return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_head(raw: bytes) -> RequestHead:
    """A request head ending in CRLFCRLF; Refused("bad_request") for anything ambiguous."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refused("bad_request", "malformed request line")
    if not parts[1] or any(c <= 0x20 or c >= 0x7f for c in parts[1]):
        raise Refused("bad_request", "request target must be printable ASCII")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # no folded lines, no bare LF, no space before the colon: the usual smuggling spellings
        if not sep or not _TOKEN.fullmatch(name) or b"\n" in line or b"\r" in line:
            raise Refused("bad_request", "malformed header line")
        headers.append((name.lower(), value.strip(b" \t")))
    return RequestHead(parts[0].decode(), parts[1].decode(), parts[2].decode(), headers)


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """("host", port) from "host:port" (or "host" with a default); brackets are left for the host check."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or "]" in port_text:
        host, port_text = authority, ""
    if not port_text:
        if default_port is None:
            raise Refused("bad_request", "CONNECT needs host:port")
        return host, default_port
    if not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
        raise Refused("bad_request", "bad port")
    return host, int(port_text)


def split_absolute(target: str) -> tuple[str, str]:
    """("authority", "/path?query") of an absolute-form http:// target."""
    if not target.lower().startswith("http://"):
        if target.lower().startswith("https://"):
            raise Refused("bad_request", "https goes through CONNECT")
        raise Refused("bad_request", "a proxy request needs an absolute http:// URL")
    rest = target[7:]
    slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:slash], rest[slash:] or "/"
    if path.startswith("?"):
        path = "/" + path
    if "@" in authority:
        raise Refused("bad_host", "user info in the URL")
    if "#" in path:
        raise Refused("bad_request", "fragment in the request target")
    return authority, path


def body_framing(head: RequestHead) -> tuple[str, int]:
    """("none" | "length" | "chunked", length) of a request body, refusing ambiguous framings."""
    lengths = head.values(b"content-length")
    encodings = head.values(b"transfer-encoding")
    if encodings:
        if lengths or len(encodings) != 1 or encodings[0].lower() != b"chunked":
            raise Refused("bad_request", "only a single 'Transfer-Encoding: chunked' without Content-Length")
        return "chunked", 0
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()) or (lengths and len(lengths[0]) > 15):
        raise Refused("bad_request", "bad Content-Length")
    return ("length", int(lengths[0])) if lengths and int(lengths[0]) else ("none", 0)


Send = Callable[[bytes], Awaitable[None]]


async def copy_body(reader: asyncio.StreamReader, send: Send, framing: str, length: int, chunk: int) -> None:
    """Forward one request body exactly as framed, never reading into the next request."""
    if framing == "length":
        await _copy_exact(reader, send, length, chunk)
    elif framing == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 15 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise Refused("bad_request", "bad chunk size")
            await send(line)
            size = int(size_text, 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = await reader.readuntil(b"\r\n")
                    await send(trailer)
                    if trailer == b"\r\n":
                        return
            await _copy_exact(reader, send, size, chunk)
            if await reader.readexactly(2) != b"\r\n":
                raise Refused("bad_request", "chunk not followed by CRLF")
            await send(b"\r\n")


async def _copy_exact(reader: asyncio.StreamReader, send: Send, n: int, chunk: int) -> None:
    while n > 0:
        data = await reader.read(min(n, chunk))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)
        await send(data)


def refusal(status: int, reason: str, detail: str) -> bytes:
    """The response a refused client gets: the reason on the status line, header and body."""
    text = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Forbidden")
    body = f"{reason}: {detail}\n".encode("ascii", "replace")
    return (f"HTTP/1.1 {status} {text}\r\nX-Sandbox-Egress: {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
