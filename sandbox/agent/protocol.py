"""What the agent and its client agree on: sizes, stream names, states and the token check."""
from __future__ import annotations

import hashlib
import hmac

CHUNK = 64 * 1024  # every body moves in pieces of this size: memory stays flat whatever the size
STREAMS = ("stdout", "stderr")
NDJSON = "application/x-ndjson"
MAX_JSON_BODY_BYTES = 4 << 20  # POST /sandbox: a spec without its inline files (those come by PUT)
MAX_EVENT_LINE_BYTES = 4 * CHUNK  # one base64 data event of CHUNK bytes, with room to spare


def token_digest(token: str) -> str:
    """sha256 hex of an agent token: what the machine holds, so its config never holds the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(authorization: str | None, expected_digest: str) -> bool:
    """True when `Authorization: Bearer <t>` carries the token whose digest is `expected_digest`.

    Both sides are compared as sha256 digests with hmac.compare_digest: constant time in the
    token's content and its length, so neither leaks through response timing.
    """
    if not authorization or not expected_digest:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(token_digest(presented.strip()).encode(), expected_digest.encode())
