"""What the agent and its client agree on: sizes, stream names, the token check, the machine's env."""
from __future__ import annotations

import hashlib
import hmac

from config.settings import Settings

PROTOCOL = 2  # 2: event lines on /exec when asked ({"events": true}); in GET /health: a worker can tell an agent image built from other code
CHUNK = 64 * 1024  # every body moves in pieces of this size: memory stays flat whatever the size
STREAMS = ("stdout", "stderr")
NDJSON = "application/x-ndjson"
MAX_JSON_BODY_BYTES = 4 << 20  # POST /sandbox: a spec without its inline files (those come by PUT)
MAX_EVENT_LINE_BYTES = 4 * CHUNK  # one base64 data event of CHUNK bytes, with room to spare

# Operator settings the agent's LocalRuntime uses, copied from the worker into the machine's env so
# that limits and caps are the same on both runtimes. Nothing else: no Redis, R2 or Fly secrets.
FORWARDED_SETTINGS = (
    "SANDBOX_MAX_LOG_BYTES", "SANDBOX_MAX_OUTPUT_FILES", "SANDBOX_MAX_OUTPUT_FILE_BYTES",
    "SANDBOX_MAX_OUTPUT_BYTES", "SANDBOX_MAX_OPEN_FILES",
    # the egress proxy runs inside the machine (its LocalRuntime): the operator's network rules go along
    "SANDBOX_BLOCKED_PORTS", "SANDBOX_EGRESS_ALLOW_CIDRS", "SANDBOX_EGRESS_HOSTS", "SANDBOX_EGRESS_MAX_BYTES",
    "SANDBOX_EGRESS_MAX_CONNECTIONS", "SANDBOX_EGRESS_MAX_CONCURRENT", "SANDBOX_EGRESS_LOG_ENTRIES",
)


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


def machine_env(settings: Settings, token: str, job_id: str, listen: str | None = None) -> dict[str, str]:
    """The SANDBOX_* environment a job's machine needs to run the agent for `job_id` (FlyRuntime's)."""
    values = settings.redacted()
    env = {name: _env_text(values[name]) for name in FORWARDED_SETTINGS}
    env.update({"SANDBOX_RUNTIME": "local", "SANDBOX_AGENT_TOKEN_SHA256": token_digest(token),
                "SANDBOX_AGENT_JOB_ID": job_id, "SANDBOX_AGENT_KEEPALIVE": _env_text(settings.agent_keepalive_s)})
    if listen:
        env["SANDBOX_AGENT_LISTEN"] = listen
    return env


def _env_text(value: object) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):  # SANDBOX_EGRESS_HOSTS
        return ",".join(f"{name}={'|'.join(addresses)}" for name, addresses in value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
