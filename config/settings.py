"""Settings: every SANDBOX_* variable, typed and checked once at start-up."""
from __future__ import annotations

import base64
import binascii
import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from config.units import parse_bandwidth, parse_cpu, parse_size
from sandbox.errors import ConfigError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ports(text: str) -> tuple[int, ...]:
    ports = tuple(int(p) for p in _csv(text))
    if any(not 1 <= p <= 65535 for p in ports):
        raise ValueError("ports must lie in 1-65535")
    return ports


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a whole number greater than zero")
    return value


def _spare_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 64:
        raise ValueError("must be a whole number from 0 (off) to 64")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a finite number greater than zero")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _redis_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
        raise ValueError(f"{text!r} is not a redis:// or rediss:// URL")
    return text


def _http_url(text: str) -> str:
    if not text:
        return text
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text


def _runtime(text: str) -> str:
    if text not in ("local", "fly"):
        raise ValueError("must be 'local' or 'fly'")
    return text


def _fly_regions(text: str) -> tuple[str, ...]:
    regions = _csv(text)
    if not regions or any(not r.isalnum() or not r.islower() for r in regions):
        raise ValueError("must be a comma-separated list of Fly region codes such as 'ams,fra'")
    return regions


def _cpu_kind(text: str) -> str:
    if text not in ("shared", "performance"):
        raise ValueError("must be 'shared' or 'performance'")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must lie in 1-65535")
    return value


def _presign_ttl(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 7 * 24 * 3600:
        raise ValueError("must lie between 1 second and 7 days (604800)")
    return value


def _sse_c_key(text: str) -> str:
    if text and len(base64.b64decode(text, validate=True)) != 32:
        raise ValueError("must be base64 of exactly 32 bytes")
    return text


def _absolute_path(text: str) -> str:
    if text and (not text.startswith("/") or ".." in text.split("/")):
        raise ValueError("must be an absolute path without '..'")
    return text


def _listen_address(text: str) -> str:
    host, port = split_host_port(text)
    if host in ("", "0.0.0.0", "::", "*"):
        raise ValueError("must name one interface (the machine's private address), never all of them")
    return text


def split_host_port(text: str) -> tuple[str, int]:
    """('host', port) from 'host:port' or '[v6]:port'; ValueError when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:  # 0: any free port
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [addr]:port")
    return host, int(port_text)


def _sha256_hex(text: str) -> str:
    if text and (len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower())):
        raise ValueError("must be 64 hex digits (sha256 of the agent token)")
    return text.lower()


def _host_map(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    from sandbox.egress.rules import parse_host_map  # late: that module imports the policy, which imports us

    return tuple(sorted(parse_host_map(text).items()))


def _cidrs(text: str) -> tuple[Any, ...]:
    from sandbox.egress.rules import parse_cidrs

    return parse_cidrs(text)


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return text


def _port_or_off(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port 1-65535, or 0 for no metrics endpoint")
    return value


def _auto_size(text: str) -> int:
    """A size, or 0 for "" (then derived from the host in load_settings)."""
    return parse_size(text) if text.strip() else 0


def _auto_cpu(text: str) -> float:
    """Cores, or 0 for "" (then derived from the host in load_settings)."""
    return parse_cpu(text) if text.strip() else 0.0


def host_cpus() -> float:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return float(len(os.sched_getaffinity(0)))


def host_memory_bytes() -> int:
    """MemTotal less what the worker, Redis clients and the kernel need: max(1 GiB, 10 %)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return max(total // 2, total - max(1 << 30, total // 10))


def free_disk_bytes(path: str) -> int:
    """Free bytes (for unprivileged use) on the filesystem holding `path` or its nearest existing parent."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _setting(env: str, default: str, parse: Callable[[str], Any] = str, secret: bool = False) -> Any:
    return field(default=None, metadata={"env": env, "default": default, "parse": parse, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Operator configuration. Sizes in bytes, times in seconds, cpu in cores."""

    redis_url: str = _setting("SANDBOX_REDIS_URL", "redis://localhost:6379/0", _redis_url)
    cloudflare_account_id: str = _setting("SANDBOX_CLOUDFLARE_ACCOUNT_ID", "")
    cloudflare_access_key: str = _setting("SANDBOX_CLOUDFLARE_ACCESS_KEY", "", secret=True)
    cloudflare_secret_key: str = _setting("SANDBOX_CLOUDFLARE_SECRET_KEY", "", secret=True)
    r2_endpoint: str = _setting("SANDBOX_R2_ENDPOINT", "", _http_url)
    r2_bucket: str = _setting("SANDBOX_R2_BUCKET", "chronos-synapse")
    presign_ttl_s: int = _setting("SANDBOX_PRESIGN_TTL", "3600", _presign_ttl)
    fly_api_token: str = _setting("SANDBOX_FLY_API_TOKEN", "", secret=True)
    fly_api_url: str = _setting("SANDBOX_FLY_API_URL", "https://api.machines.dev/v1", _http_url)
    fly_app: str = _setting("SANDBOX_FLY_APP", "")
    fly_image: str = _setting("SANDBOX_FLY_IMAGE", "")
    fly_regions: tuple[str, ...] = _setting("SANDBOX_FLY_REGIONS", "ams", _fly_regions)
    fly_cpu_kind: str = _setting("SANDBOX_FLY_CPU_KIND", "shared", _cpu_kind)
    fly_start_timeout_s: float = _setting("SANDBOX_FLY_START_TIMEOUT", "120", _positive_float)
    fly_agent_port: int = _setting("SANDBOX_FLY_AGENT_PORT", "8080", _port)
    # the per-machine agent tokens are HMACs of this and the machine's name (see docs/fly.md)
    fly_agent_secret: str = _setting("SANDBOX_FLY_AGENT_SECRET", "", secret=True)
    fly_retry_budget_s: float = _setting("SANDBOX_FLY_RETRY_BUDGET", "60", _positive_float)
    runtime: str = _setting("SANDBOX_RUNTIME", "local", _runtime)
    default_cpu: float = _setting("SANDBOX_DEFAULT_CPU", "0.5", parse_cpu)
    default_memory_bytes: int = _setting("SANDBOX_DEFAULT_MEMORY", "512Mi", parse_size)
    default_disk_bytes: int = _setting("SANDBOX_DEFAULT_DISK", "1Gi", parse_size)
    default_timeout_s: float = _setting("SANDBOX_DEFAULT_TIMEOUT", "300", _positive_float)
    default_pids: int = _setting("SANDBOX_DEFAULT_PIDS", "128", _positive_int)
    max_cpu: float = _setting("SANDBOX_MAX_CPU", "2", parse_cpu)
    max_memory_bytes: int = _setting("SANDBOX_MAX_MEMORY", "4Gi", parse_size)
    max_disk_bytes: int = _setting("SANDBOX_MAX_DISK", "10Gi", parse_size)
    max_timeout_s: float = _setting("SANDBOX_MAX_TIMEOUT", "3600", _positive_float)
    max_pids: int = _setting("SANDBOX_MAX_PIDS", "1024", _positive_int)
    allowed_commands: tuple[str, ...] = _setting("SANDBOX_ALLOWED_COMMANDS", "ls,cat,grep,curl,wget", _csv)
    blocked_ports: tuple[int, ...] = _setting("SANDBOX_BLOCKED_PORTS", "22,25,465,587,2375,2376,3306,5432,6379,11211,27017", _ports)
    allowed_hosts: tuple[str, ...] = _setting("SANDBOX_ALLOWED_HOSTS", "", _csv)
    max_log_bytes: int = _setting("SANDBOX_MAX_LOG_BYTES", "1Mi", parse_size)
    max_output_files: int = _setting("SANDBOX_MAX_OUTPUT_FILES", "1000", _positive_int)
    max_output_file_bytes: int = _setting("SANDBOX_MAX_OUTPUT_FILE_BYTES", "1Gi", parse_size)
    max_output_bytes: int = _setting("SANDBOX_MAX_OUTPUT_BYTES", "2Gi", parse_size)
    max_input_files: int = _setting("SANDBOX_MAX_INPUT_FILES", "100", _positive_int)
    max_inline_bytes: int = _setting("SANDBOX_MAX_INLINE_BYTES", "10Mi", parse_size)
    work_dir: str = _setting("SANDBOX_WORK_DIR", "/var/lib/sandbox")
    # Per-sandbox volatile state (sandbox/runtimes/rundir.py): "" is <work dir>/run, a tmpfs the
    # runtime mounts at start-up; only the disk images stay on the work dir's file system.
    run_dir: str = _setting("SANDBOX_RUN_DIR", "", _absolute_path)
    # The first host uid of the range jobs run as: not a system account (65534 is "nobody", whose
    # per-uid kernel counters host daemons share), and clear of /etc/subuid ranges.
    sandbox_uid: int = _setting("SANDBOX_UID", "1000000", _positive_int)
    sandbox_uid_count: int = _setting("SANDBOX_UID_COUNT", "1024", _positive_int)  # one uid per live sandbox
    cgroup_parent: str = _setting("SANDBOX_CGROUP_PARENT", "", _absolute_path)
    # cgroup2 favordynmods at start-up (sandbox/runtimes/dynmods.py): ~0.1 ms cgroup joins instead of 5-17 ms
    cgroup_favor_dynmods: bool = _setting("SANDBOX_CGROUP_FAVOR_DYNMODS", "true", _bool)
    max_open_files: int = _setting("SANDBOX_MAX_OPEN_FILES", "1024", _positive_int)
    # spawn each job's bwrap at create, held before its command until execute (runtimes/prestart.py)
    prestart: bool = _setting("SANDBOX_PRESTART", "true", _bool)
    # fresh template clones kept ready per disk size, so create renames one instead of copying (runtimes/spares.py)
    spare_images: int = _setting("SANDBOX_SPARE_IMAGES", "2", _spare_count)
    record_ttl_s: int = _setting("SANDBOX_RECORD_TTL", "604800", _positive_int)
    node_name: str = _setting("SANDBOX_NODE_NAME", "")
    visibility_timeout_override_s: int = _setting("SANDBOX_VISIBILITY_TIMEOUT", "0", int)
    max_log_line_bytes: int = _setting("SANDBOX_MAX_LOG_LINE_BYTES", "4Ki", parse_size)
    max_log_lines: int = _setting("SANDBOX_MAX_LOG_LINES", "10000", _positive_int)
    r2_sse_c_key: str = _setting("SANDBOX_R2_SSE_C_KEY", "", _sse_c_key, secret=True)
    retention_days_input: int = _setting("SANDBOX_RETENTION_DAYS_INPUT", "7", _positive_int)
    retention_days_output: int = _setting("SANDBOX_RETENTION_DAYS_OUTPUT", "30", _positive_int)
    retention_days_logs: int = _setting("SANDBOX_RETENTION_DAYS_LOGS", "30", _positive_int)
    retention_days_artifacts: int = _setting("SANDBOX_RETENTION_DAYS_ARTIFACTS", "30", _positive_int)
    webhook_secret: str = _setting("SANDBOX_WEBHOOK_SECRET", "", secret=True)
    webhook_allowed_hosts: tuple[str, ...] = _setting("SANDBOX_WEBHOOK_ALLOWED_HOSTS", "", _csv)
    webhook_timeout_s: float = _setting("SANDBOX_WEBHOOK_TIMEOUT", "5", _positive_float)
    webhook_max_attempts: int = _setting("SANDBOX_WEBHOOK_MAX_ATTEMPTS", "5", _positive_int)
    webhook_backoff_max_s: float = _setting("SANDBOX_WEBHOOK_BACKOFF_MAX", "30", _positive_float)
    # The in-machine agent (python -m sandbox.agent, inside a Fly Machine); workers ignore these.
    # fly-local-6pn is the machine's private (6PN) address in its /etc/hosts: never a public one.
    agent_listen: str = _setting("SANDBOX_AGENT_LISTEN", "fly-local-6pn:8080", _listen_address)
    agent_token: str = _setting("SANDBOX_AGENT_TOKEN", "", secret=True)
    agent_token_sha256: str = _setting("SANDBOX_AGENT_TOKEN_SHA256", "", _sha256_hex, secret=True)
    agent_job_id: str = _setting("SANDBOX_AGENT_JOB_ID", "")  # when set, the only job it accepts
    agent_keepalive_s: float = _setting("SANDBOX_AGENT_KEEPALIVE", "5", _positive_float)
    agent_unclaimed_exit_s: float = _setting("SANDBOX_AGENT_UNCLAIMED_EXIT", "600", _positive_float)
    # internal networks a callback host name may resolve into (a listed IP literal needs none)
    webhook_allow_cidrs: tuple[Any, ...] = _setting("SANDBOX_WEBHOOK_ALLOW_CIDRS", "", _cidrs)
    webhook_ca_bundle: str = _setting("SANDBOX_WEBHOOK_CA_BUNDLE", "", _absolute_path)  # a private CA's receivers
    # egress (docs/network.md): internal networks a proxy may reach (never by default), names the
    # operator resolves statically ("api.test=10.203.0.2|10.203.0.6,..."), rates in bits/s
    egress_allow_cidrs: tuple[Any, ...] = _setting("SANDBOX_EGRESS_ALLOW_CIDRS", "", _cidrs)
    egress_hosts: tuple[tuple[str, tuple[str, ...]], ...] = _setting("SANDBOX_EGRESS_HOSTS", "", _host_map)
    default_bandwidth_bps: int = _setting("SANDBOX_DEFAULT_BANDWIDTH", "10Mbps", parse_bandwidth)
    max_bandwidth_bps: int = _setting("SANDBOX_MAX_BANDWIDTH", "1Gbps", parse_bandwidth)
    egress_max_bytes: int = _setting("SANDBOX_EGRESS_MAX_BYTES", "1Gi", parse_size)  # per stage (setup, command), up + down
    egress_max_connections: int = _setting("SANDBOX_EGRESS_MAX_CONNECTIONS", "1000", _positive_int)
    egress_max_concurrent: int = _setting("SANDBOX_EGRESS_MAX_CONCURRENT", "32", _positive_int)
    egress_log_entries: int = _setting("SANDBOX_EGRESS_LOG_ENTRIES", "200", _positive_int)
    log_format: str = _setting("SANDBOX_LOG_FORMAT", "json", _log_format)
    # Loopback by default: /metrics and /healthz carry no auth (job ids, queue names, node names).
    metrics_host: str = _setting("SANDBOX_METRICS_HOST", "127.0.0.1")
    metrics_port: int = _setting("SANDBOX_METRICS_PORT", "9540", _port_or_off)
    queue_age_max_s: float = _setting("SANDBOX_QUEUE_AGE_MAX", "300", _positive_float)  # health: older is degraded
    # Admission (sandbox/admission.py): what this node may hand out; "" derives it from the host.
    node_cpu: float = _setting("SANDBOX_NODE_CPU", "", _auto_cpu)  # cores
    node_memory_bytes: int = _setting("SANDBOX_NODE_MEMORY", "", _auto_size)
    node_disk_bytes: int = _setting("SANDBOX_NODE_DISK", "", _auto_size)  # default: the work dir's free space
    cpu_overcommit: float = _setting("SANDBOX_CPU_OVERCOMMIT", "4", _positive_float)  # cgroup quotas cap each job
    node_max_sandboxes: int = _setting("SANDBOX_NODE_MAX_SANDBOXES", "64", _positive_int)
    # submit builds the sandbox itself when its node admits the job at once (one Celery hop fewer)
    create_in_submit: bool = _setting("SANDBOX_CREATE_IN_SUBMIT", "true", _bool)
    # Reliability under faults (docs/reliability.md)
    max_deliveries: int = _setting("SANDBOX_MAX_DELIVERIES", "3", _positive_int)
    require_durable_redis: bool = _setting("SANDBOX_REQUIRE_DURABLE_REDIS", "false", _bool)
    heartbeat_interval_s: float = _setting("SANDBOX_HEARTBEAT_INTERVAL", "10", _positive_float)
    node_dead_after_s: float = _setting("SANDBOX_NODE_DEAD_AFTER", "60", _positive_float)
    stuck_sweep_interval_s: float = _setting("SANDBOX_STUCK_SWEEP_INTERVAL", "15", _positive_float)
    orphan_sweep_interval_s: float = _setting("SANDBOX_ORPHAN_SWEEP_INTERVAL", "60", _positive_float)
    dead_letter_max: int = _setting("SANDBOX_DEAD_LETTER_MAX", "10000", _positive_int)
    max_message_bytes: int = _setting("SANDBOX_MAX_MESSAGE_BYTES", "64Mi", parse_size)

    @property
    def s3_endpoint(self) -> str:
        """SANDBOX_R2_ENDPOINT, or R2's endpoint for the account."""
        if self.r2_endpoint:
            return self.r2_endpoint
        return f"https://{self.cloudflare_account_id}.r2.cloudflarestorage.com"

    @property
    def retention_days(self) -> dict[str, int]:
        """Days each jobs/{id}/<category>/ object is kept before the expiry sweep deletes it."""
        return {"input": self.retention_days_input, "output": self.retention_days_output,
                "logs": self.retention_days_logs, "artifacts": self.retention_days_artifacts}

    @property
    def tombstone_ttl_s(self) -> int:
        """How long a finished job id stays reserved: its longest artifact retention."""
        return max(self.retention_days.values()) * 86400

    @property
    def visibility_timeout_s(self) -> int:
        """Longer than the longest stage (execute at the maximum timeout) plus margins for I/O."""
        return self.visibility_timeout_override_s or int(self.max_timeout_s) + 1800

    def redacted(self) -> dict[str, Any]:
        """Every setting by variable name, secrets masked, for logs and `python -m sandbox config`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = "***" if f.metadata["secret"] and value else value
        return out


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; ConfigError names the first bad variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        env, default, parse = f.metadata["env"], f.metadata["default"], f.metadata["parse"]
        raw = environ.get(env, default)
        try:
            values[f.name] = parse(raw)
        except (TypeError, ValueError, binascii.Error) as e:
            raise ConfigError(env, f"bad value {raw!r}: {e}") from e
    settings = Settings(**values)
    _check_consistency(settings)
    if not settings.node_name:
        object.__setattr__(settings, "node_name", socket.gethostname())
    for name, derive in (("node_cpu", host_cpus), ("node_memory_bytes", host_memory_bytes),
                         ("node_disk_bytes", lambda: free_disk_bytes(settings.work_dir))):
        if not getattr(settings, name):
            object.__setattr__(settings, name, derive())
    return settings


EXECUTE_HARD_MARGIN_S = 120  # execute's hard time limit is the job's timeout + this (tasks.stages)
LONGEST_OTHER_STAGE_S = 960  # prepare's and collect's hard time limit (celeryconfig)
# a worker's threads beyond node_max_sandboxes (celeryconfig); DirectS3's pool keeps one socket each
WORKER_HEADROOM_THREADS = 16


def _check_consistency(s: Settings) -> None:
    pairs = (
        ("SANDBOX_DEFAULT_CPU", s.default_cpu, s.max_cpu),
        ("SANDBOX_DEFAULT_MEMORY", s.default_memory_bytes, s.max_memory_bytes),
        ("SANDBOX_DEFAULT_DISK", s.default_disk_bytes, s.max_disk_bytes),
        ("SANDBOX_DEFAULT_TIMEOUT", s.default_timeout_s, s.max_timeout_s),
        ("SANDBOX_DEFAULT_PIDS", s.default_pids, s.max_pids),
        ("SANDBOX_DEFAULT_BANDWIDTH", s.default_bandwidth_bps, s.max_bandwidth_bps),
    )
    for env, default, maximum in pairs:
        if default > maximum:
            raise ConfigError(env, f"default {default} exceeds the operator maximum {maximum}")
    longest_stage_s = max(s.max_timeout_s + EXECUTE_HARD_MARGIN_S, LONGEST_OTHER_STAGE_S)
    if s.visibility_timeout_override_s and s.visibility_timeout_override_s <= longest_stage_s:
        raise ConfigError("SANDBOX_VISIBILITY_TIMEOUT", f"must exceed the longest stage ({longest_stage_s:.0f} s), "
                          "or a healthy stage would be delivered twice")
    # one host uid per concurrent sandbox: never root (SANDBOX_UID > 0), and below 2^31 (uid_t, and
    # (uid_t)-1 means "no change" to setreuid)
    if s.sandbox_uid >= 2**31:
        raise ConfigError("SANDBOX_UID", f"{s.sandbox_uid} must be below 2^31")
    if s.sandbox_uid + s.sandbox_uid_count > 2**31:
        raise ConfigError("SANDBOX_UID_COUNT", f"the range {s.sandbox_uid}..{s.sandbox_uid + s.sandbox_uid_count - 1} "
                          "must end below 2^31")
    work, run = os.path.abspath(s.work_dir), os.path.abspath(s.run_dir or s.work_dir + "/run")
    if run == work or work.startswith(run.rstrip("/") + "/"):
        raise ConfigError("SANDBOX_RUN_DIR", f"{s.run_dir} must not be SANDBOX_WORK_DIR or above it "
                          "(its tmpfs would hide the disk images)")
    if s.node_dead_after_s < 2 * s.heartbeat_interval_s:
        raise ConfigError("SANDBOX_NODE_DEAD_AFTER", f"must be at least twice SANDBOX_HEARTBEAT_INTERVAL "
                          f"({s.heartbeat_interval_s:g} s), or one late heartbeat declares a live node dead")
    if s.runtime == "fly":
        _check_fly(s)


def _check_fly(s: Settings) -> None:
    required = (("SANDBOX_FLY_APP", s.fly_app), ("SANDBOX_FLY_API_TOKEN", s.fly_api_token),
                ("SANDBOX_FLY_IMAGE", s.fly_image), ("SANDBOX_FLY_AGENT_SECRET", s.fly_agent_secret))
    for env, value in required:
        if not value:
            raise ConfigError(env, "the fly runtime (SANDBOX_RUNTIME=fly) needs it")
    if len(s.fly_agent_secret) < 32:
        raise ConfigError("SANDBOX_FLY_AGENT_SECRET", "must be at least 32 characters (agent tokens derive from it)")
