"""Reading the server name (SNI) out of a TLS ClientHello without terminating TLS."""
from __future__ import annotations

import asyncio

MAX_HELLO_BYTES = 64 * 1024  # a ClientHello with post-quantum key shares is a few KiB; never more
# A fatal TLS alert, access_denied (49): what a client shows when the tunnel is refused after 200.
ACCESS_DENIED_ALERT = b"\x15\x03\x01\x00\x02\x02\x31"


class NotTLS(ValueError):
    """The bytes are not a well-formed TLS ClientHello."""


async def read_client_hello(reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
    """(the raw records read, the SNI host name or None); NotTLS if it is not a ClientHello."""
    raw = bytearray()
    handshake = bytearray()
    needed: int | None = None
    while needed is None or len(handshake) < needed:
        header = await reader.readexactly(5)
        kind, length = header[0], int.from_bytes(header[3:5], "big")
        if kind != 0x16 or header[1] != 0x03 or length == 0 or length > 16384 + 2048:
            raise NotTLS("not a TLS handshake record")
        body = await reader.readexactly(length)
        raw += header + body
        handshake += body
        if len(raw) > MAX_HELLO_BYTES:
            raise NotTLS("ClientHello too large")
        if needed is None and len(handshake) >= 4:
            if handshake[0] != 0x01:
                raise NotTLS("first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(handshake[1:4], "big")
    return bytes(raw), server_name(bytes(handshake[4:needed]))


def server_name(hello: bytes) -> str | None:
    """The host_name entry of the server_name extension of a ClientHello body, lower case."""
    try:
        pos = 2 + 32  # client_version, random
        pos += 1 + hello[pos]  # session_id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher_suites
        pos += 1 + hello[pos]  # compression_methods
        if pos == len(hello):
            return None  # no extensions at all
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        if end > len(hello):
            raise NotTLS("extensions overrun the ClientHello")
        names: list[str] = []
        while pos + 4 <= end:
            ext_type = int.from_bytes(hello[pos:pos + 2], "big")
            ext_len = int.from_bytes(hello[pos + 2:pos + 4], "big")
            data = hello[pos + 4:pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type == 0:
                names += _host_names(data)
        if pos != end:
            raise NotTLS("malformed extensions")
    except IndexError as e:
        raise NotTLS("truncated ClientHello") from e
    if len(names) > 1:
        raise NotTLS("more than one server name")
    return names[0] if names else None


def _host_names(data: bytes) -> list[str]:
    total = int.from_bytes(data[0:2], "big")
    pos, end, names = 2, 2 + total, []
    if end != len(data):
        raise NotTLS("malformed server_name extension")
    while pos + 3 <= end:
        name_type, length = data[pos], int.from_bytes(data[pos + 1:pos + 3], "big")
        name = data[pos + 3:pos + 3 + length]
        pos += 3 + length
        if name_type == 0:
            if len(name) != length or not all(0x21 <= c < 0x7f for c in name):
                raise NotTLS("server name is not printable ASCII")
            names.append(name.decode("ascii").lower())
    return names
