"""The Runtime protocol every sandbox backend implements, and the values it trades in."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import IO, Any, Callable, Iterator, Protocol

from sandbox.spec import JobSpec

# stream name ("stdout" | "stderr"), raw bytes as the job wrote them
OutputSink = Callable[[str, bytes], None]

OUTCOMES = ("succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error")


@dataclass
class SandboxHandle:
    """What a stage needs to find a sandbox again; JSON-able so it can live in the job record."""

    sandbox_id: str
    job_id: str
    runtime: str
    host: str  # the worker node that owns it; every later stage must run there
    created_at: float
    expires_at: float
    data: dict[str, Any] = field(default_factory=dict)  # backend-specific, JSON-able

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SandboxHandle":
        return cls(**raw)


@dataclass
class ExecResult:
    """How a job's command ended. A failing program is data here, not an exception."""

    outcome: str  # one of OUTCOMES
    exit_code: int | None
    signal: int | None
    duration_s: float
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    resources_used: dict[str, Any] = field(default_factory=dict)
    security_events: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    network: dict[str, Any] | None = None  # the egress connection log and totals, if outbound was on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OutputFile:
    """One regular file the job left under a collected directory, opened without following links."""

    relpath: str  # relative to the workspace, e.g. "output/result.txt"
    size: int
    open: Callable[[], IO[bytes]]


@dataclass
class SandboxInfo:
    """A sandbox found by listing the backend, for sweeps."""

    sandbox_id: str
    job_id: str
    host: str
    created_at: float
    expires_at: float


class Runtime(Protocol):
    """A sandbox backend. Every method is idempotent: a stage may be redelivered."""

    name: str
    # True: a sandbox lives on the worker node that created it, so the stages after create run on
    # that node's queue and count against its admission. False: any worker may run any stage.
    pinned: bool

    def create(self, spec: JobSpec, host: str) -> SandboxHandle:
        """Make an isolated, empty sandbox for the job (no network unless the policy allows it)."""

    def put_file(self, handle: SandboxHandle, relpath: str, src: IO[bytes], mode: int) -> int:
        """Stream one input file into the workspace at `relpath`; returns bytes written."""

    def execute(self, handle: SandboxHandle, spec: JobSpec, sink: OutputSink) -> ExecResult:
        """Run the job's argv once, feeding output to `sink` as it comes, enforcing every limit."""

    def logs(self, handle: SandboxHandle) -> dict[str, IO[bytes]]:
        """The captured (capped) stdout and stderr, opened for reading."""

    def collect(self, handle: SandboxHandle, dirs: tuple[str, ...]) -> Iterator[OutputFile]:
        """Regular files under `dirs` of the workspace; only after every sandbox process is dead."""

    def kill(self, handle: SandboxHandle) -> None:
        """Stop every process of the sandbox now (cancel); the sandbox stays for collect/destroy."""

    def destroy(self, handle: SandboxHandle) -> None:
        """Remove the sandbox and everything it held; a missing sandbox is not an error."""

    def list_sandboxes(self) -> list[SandboxInfo]:
        """Every sandbox this backend (on this host, for local) holds, for sweeps."""

    def reap_incomplete(self, older_than: float) -> list[str]:
        """Tear down half-created sandboxes (invisible to list_sandboxes) older than `older_than`."""
