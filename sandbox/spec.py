"""JobSpec and its parts: the validated, normalised form of a submitted job."""
from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_COLLECT_DIRS = ("output", "artifacts")


@dataclass(frozen=True)
class ResourceLimits:
    """Limits after defaults and operator maxima are applied."""

    cpu: float  # cores, e.g. 0.5
    memory_bytes: int
    disk_bytes: int
    pids: int


@dataclass(frozen=True)
class NetworkPolicy:
    """Outbound is off unless the job asks and the operator allows each host."""

    outbound: bool = False
    allowed_hosts: tuple[str, ...] = ()
    blocked_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class JobFile:
    """One input file: exactly one of `content` (bytes) or `r2_key`."""

    path: str
    content: bytes | None = None
    r2_key: str | None = None
    mode: int = 0o644


@dataclass(frozen=True)
class JobSpec:
    """A job that passed validation; `argv[0]` is an absolute path inside the base image."""

    id: str
    command: str
    argv: tuple[str, ...]
    environment: dict[str, str]
    timeout_s: float
    resources: ResourceLimits
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    files: tuple[JobFile, ...] = ()
    callback_url: str | None = None
    collect: tuple[str, ...] = DEFAULT_COLLECT_DIRS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (file content as base64) for storing beside the job record."""
        raw = asdict(self)
        raw["files"] = [
            {**f, "content": None if f["content"] is None else base64.b64encode(f["content"]).decode()}
            for f in raw["files"]
        ]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "JobSpec":
        """Inverse of to_dict (trusted input: our own stored form)."""
        files = tuple(
            JobFile(
                path=f["path"],
                content=None if f["content"] is None else base64.b64decode(f["content"]),
                r2_key=f["r2_key"],
                mode=f["mode"],
            )
            for f in raw["files"]
        )
        return cls(
            id=raw["id"],
            command=raw["command"],
            argv=tuple(raw["argv"]),
            environment=dict(raw["environment"]),
            timeout_s=float(raw["timeout_s"]),
            resources=ResourceLimits(**raw["resources"]),
            network=NetworkPolicy(
                outbound=raw["network"]["outbound"],
                allowed_hosts=tuple(raw["network"]["allowed_hosts"]),
                blocked_ports=tuple(raw["network"]["blocked_ports"]),
            ),
            files=files,
            callback_url=raw.get("callback_url"),
            collect=tuple(raw.get("collect", DEFAULT_COLLECT_DIRS)),
        )
