"""One exception tree for the whole service.

SandboxError
 ├── JobRejected          the caller's fault: never retried, names the field (a JSON pointer) and the rule
 ├── ConfigError          a bad operator setting: stops start-up, names the variable
 ├── TransientError       a backend hiccup worth retrying (with backoff)
 │    ├── StorageUnavailable   S3/R2 unreachable, throttled or 5xx
 │    └── RuntimeUnavailable   the sandbox backend is busy or unreachable (Fly 408/429/5xx, capacity)
 │         └── AgentUnavailable the in-machine agent did not answer, was busy (429, 502-504), or broke a stream
 ├── StorageError         a permanent storage failure (missing key, access denied, wrong SSE-C key)
 ├── SandboxFailure       the sandbox could not be created, prepared or run (not the job's own exit)
 │    └── AgentConflict    the agent refused a request that does not fit its state (409; `reason` says which)
 ├── PlacementError       a stage ran on a host other than the one holding its sandbox
 ├── StaleDelivery        a copy of a stage message: the job moved past the stage, or another task ran or runs it
 └── JobNotFound          no record for that job id

A job that exits non-zero, times out or hits a limit is not an exception: it is the job's outcome,
carried by ExecResult and the JobRecord.
"""
from __future__ import annotations


class SandboxError(Exception):
    """Base of every error this service raises on purpose."""

    code = "error"


class JobRejected(SandboxError):
    """The job failed validation; `field` is a JSON pointer, `rule` a short machine-readable name."""

    code = "rejected"

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(f"{field or '/'}: {message} [{rule}]")
        self.field = field
        self.rule = rule
        self.message = message

    def as_dict(self) -> dict[str, str]:
        """The `error` object of a rejected job record."""
        return {"code": "rejected", "field": self.field, "rule": self.rule, "message": self.message}


class ConfigError(SandboxError):
    """An operator setting is missing or malformed; `variable` names it."""

    code = "config"

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class TransientError(SandboxError):
    """A temporary backend failure; the stage is retried with backoff."""

    code = "transient"


class StorageUnavailable(TransientError):
    """The object store did not answer, throttled us, or failed with a 5xx."""

    code = "storage_unavailable"


class RuntimeUnavailable(TransientError):
    """The sandbox backend is busy, rate-limited or unreachable."""

    code = "runtime_unavailable"


class AgentUnavailable(RuntimeUnavailable):
    """The agent inside a Fly Machine did not answer, was busy (429, 502-504), or a stream ended early."""

    code = "agent_unavailable"


class StorageError(SandboxError):
    """A permanent object-store failure (missing key, access denied, wrong encryption key)."""

    code = "storage"


class SandboxFailure(SandboxError):
    """The sandbox itself failed (not the job's command)."""

    code = "sandbox"


class AgentConflict(SandboxFailure):
    """The agent answered 409: the request does not fit its state; `reason` is its code (e.g. `running`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PlacementError(SandboxError):
    """A stage ran on a host that does not hold the job's sandbox."""

    code = "placement"


class StaleDelivery(SandboxError):
    """A stage message arrived for a job that already moved past that stage (or, for execute, while
    another live task runs the command): a duplicate, which must change nothing and send nothing on."""

    code = "stale_delivery"


class JobNotFound(SandboxError):
    """No job record exists for the id."""

    code = "not_found"
