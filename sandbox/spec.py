"""JobSpec and its parts: the validated, normalised form of a submitted job."""
from __future__ import annotations

import base64
import itertools
import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from jsonschema import Draft202012Validator

from config.settings import Settings
from config.units import format_size, parse_bandwidth, parse_cpu, parse_size
from sandbox.errors import JobRejected

if TYPE_CHECKING:
    from sandbox.policy import Policy

DEFAULT_COLLECT_DIRS = ("output", "artifacts")


@dataclass(frozen=True)
class ResourceLimits:
    """Limits after defaults and operator maxima are applied."""

    cpu: float  # cores, e.g. 0.5
    memory_bytes: int
    disk_bytes: int
    pids: int
    bandwidth_bps: int = 10_000_000  # egress rate in bits/s, both directions together


@dataclass(frozen=True)
class NetworkPolicy:
    """Outbound is off unless the job asks and the operator allows each host."""

    outbound: bool = False
    allowed_hosts: tuple[str, ...] = ()
    blocked_ports: tuple[int, ...] = ()
    allowed_ports: tuple[int, ...] = (443,)  # plain HTTP needs 80 asked for explicitly


@dataclass(frozen=True)
class SetupSpec:
    """A command run while preparing, before the job's own, under its own network policy."""

    command: str
    argv: tuple[str, ...]
    timeout_s: float
    network: NetworkPolicy = field(default_factory=NetworkPolicy)


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
    callback_events: str = "terminal"  # or "all": every status transition is POSTed too
    collect: tuple[str, ...] = DEFAULT_COLLECT_DIRS
    setup: SetupSpec | None = None

    def setup_run(self) -> "JobSpec":
        """This job as the runtime runs its setup: the setup's argv, timeout and network policy."""
        assert self.setup is not None
        return replace(self, argv=self.setup.argv, timeout_s=self.setup.timeout_s, network=self.setup.network)

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
            network=_network_from_dict(raw["network"]),
            files=files,
            callback_url=raw.get("callback_url"),
            callback_events=raw.get("callback_events", "terminal"),
            collect=tuple(raw.get("collect", DEFAULT_COLLECT_DIRS)),
            setup=_setup_from_dict(raw.get("setup")),
        )


def _network_from_dict(raw: dict[str, Any]) -> NetworkPolicy:
    return NetworkPolicy(outbound=raw["outbound"], allowed_hosts=tuple(raw["allowed_hosts"]),
                         blocked_ports=tuple(raw["blocked_ports"]),
                         allowed_ports=tuple(raw.get("allowed_ports", (443,))))


def _setup_from_dict(raw: dict[str, Any] | None) -> SetupSpec | None:
    if raw is None:
        return None
    return SetupSpec(command=raw["command"], argv=tuple(raw["argv"]), timeout_s=float(raw["timeout_s"]),
                     network=_network_from_dict(raw["network"]))


# ---------------------------------------------------------------------------------------------
# Parsing: raw job JSON (hostile) -> JobSpec. Structure comes from schema/job.schema.json, meaning
# (units, maxima, commands, paths, hosts) from sandbox.policy. Every failure is a JobRejected.
# ---------------------------------------------------------------------------------------------

SCHEMA_PATH = Path(__file__).parent / "schema" / "job.schema.json"
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_DEPTH = 16  # the schema nests four levels; anything deeper is an attack on the parser
_RULES = {  # jsonschema keyword -> our rule name
    "additionalProperties": "unknown_field", "required": "required", "type": "type",
    "pattern": "pattern", "maxLength": "too_large", "maxItems": "too_large",
    "maxProperties": "too_large", "minLength": "empty", "minItems": "empty",
    "minimum": "out_of_range", "maximum": "out_of_range", "exclusiveMinimum": "out_of_range",
    "oneOf": "one_source", "propertyNames": "env_name",
}


@lru_cache(maxsize=1)
def job_schema() -> dict[str, Any]:
    """The published job contract (JSON Schema 2020-12)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    Draft202012Validator.check_schema(job_schema())
    return Draft202012Validator(job_schema())


def pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON pointer; long keys are cut so a hostile key cannot flood the error."""
    out = []
    for part in parts:
        text = str(part)
        text = text if len(text) <= 64 else text[:64] + "..."
        out.append("/" + text.replace("~", "~0").replace("/", "~1"))
    return "".join(out)


class _Duplicated(dict):  # type: ignore[type-arg]
    """An object that had a key twice; reported later, when its JSON pointer is known."""

    duplicate: str = ""


class _NotFinite:
    """NaN, Infinity or an overflowing number; reported later with its JSON pointer."""

    def __init__(self, text: str) -> None:
        self.text = text[:32]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            marked = _Duplicated(pairs)
            marked.duplicate = key
            return marked
        out[key] = value
    return out


def _finite_float(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)  # 1e999 never reaches parse_constant


def _show(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of a hostile value for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def load_json(raw: bytes | str, max_bytes: int) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, bounded size and depth."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as e:
            raise JobRejected("", "encoding", "the job is not valid UTF-8 text") from e
    if not isinstance(raw, (bytes, bytearray)):
        raise JobRejected("", "type", "a job must be a JSON object")
    if len(raw) > max_bytes:
        raise JobRejected("", "too_large", f"the job is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        text = bytes(raw).decode("utf-8")  # strict: json.loads would also guess UTF-16/32
    except UnicodeDecodeError as e:
        raise JobRejected("", "encoding", "the job is not valid UTF-8 text") from e
    if text.startswith("\ufeff"):
        raise JobRejected("", "encoding", "the job starts with a byte-order mark; send plain UTF-8")
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates,
                          parse_constant=_NotFinite, parse_float=_finite_float)
    except RecursionError as e:
        raise JobRejected("", "too_deep", "the job nests too deeply") from e
    except ValueError as e:  # JSONDecodeError, and int() beyond the digit limit
        raise JobRejected("", "invalid_json", f"the job is not valid JSON: {str(e)[:120]}") from e


def _check_values(value: Any, path: tuple[str | int, ...] = (), depth: int = 0) -> None:
    """Reject what JSON Schema cannot see: lone surrogates, NUL, non-finite numbers, odd types."""
    if depth > MAX_DEPTH:
        raise JobRejected(pointer(*path), "too_deep", "the job nests too deeply")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise JobRejected(pointer(*path), "encoding", "the text holds an unpaired surrogate (\\ud800-\\udfff)") from e
        # NUL can never reach argv, environ or a file name; inline file content may carry it
        if "\x00" in value and not (len(path) == 3 and path[0] == "files" and path[2] == "content"):
            raise JobRejected(pointer(*path), "nul_byte", "the text contains a NUL character")
    elif isinstance(value, _NotFinite):
        raise JobRejected(pointer(*path), "not_a_number", f"{value.text} is not allowed; numbers must be finite")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise JobRejected(pointer(*path), "not_a_number", "numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, dict):
        if isinstance(value, _Duplicated):
            raise JobRejected(pointer(*path, value.duplicate), "duplicate_key",
                              f"the key {_show(value.duplicate)} appears twice in one object")
        for key, item in value.items():
            if not isinstance(key, str):
                raise JobRejected(pointer(*path), "type", "object keys must be strings")
            _check_values(key, path + (key,), depth + 1)
            _check_values(item, path + (key,), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, path + (index,), depth + 1)
    elif not (value is None or isinstance(value, (bool, int))):
        raise JobRejected(pointer(*path), "type", f"{type(value).__name__} is not a JSON value")


def _too_many(doc: dict[str, Any], settings: Settings, schema: dict[str, Any] | None = None,
              path: tuple[str, ...] = ()) -> JobRejected | None:
    """The first array or object holding more items than the contract allows, checked by length
    before the schema: jsonschema reports every bad item of an array even past its maxItems, and
    kept one error (~12 KiB) per item: a 16 MB job of 1.2M `{"path": "a"}` files took 15 GiB."""
    schema = job_schema() if schema is None else schema
    if not path and isinstance(doc.get("files"), list) and len(doc["files"]) > settings.max_input_files:
        return JobRejected("/files", "too_many", f"{len(doc['files'])} files; the limit is {settings.max_input_files}")
    for key, sub in schema.get("properties", {}).items():
        value = doc.get(key)
        limit = sub.get("maxItems") if isinstance(value, list) else sub.get("maxProperties") if isinstance(value, dict) else None
        if limit is not None and len(value) > limit:
            return JobRejected(pointer(*path, key), "too_large", f"{pointer(*path, key)} holds {len(value)} items; at most {limit}")
        if isinstance(value, dict) and "properties" in sub:
            inner = _too_many(value, settings, sub, path + (key,))
            if inner is not None:
                return inner
    return None


MAX_SCHEMA_ERRORS = 100  # looked at to find the outermost one (the length checks bound the rest)


def _schema_error(doc: Any) -> JobRejected | None:
    errors = list(itertools.islice(_validator().iter_errors(doc), MAX_SCHEMA_ERRORS))
    if not errors:
        return None
    error = min(errors, key=lambda e: len(e.absolute_path))  # the outermost, in document order
    path = tuple(error.absolute_path)
    rule = _RULES.get(str(error.validator), str(error.validator))
    if "propertyNames" in error.relative_schema_path:
        rule = "env_name"
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = sorted(k for k in error.instance if k not in known)
        return JobRejected(pointer(*path, extra[0]), rule, f"unknown field {_show(extra[0])}; allowed: {', '.join(known)}")
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return JobRejected(pointer(*path, missing[0]), rule, f"the field {missing[0]!r} is required")
    if error.validator == "oneOf":
        return JobRejected(pointer(*path), rule, "a file needs exactly one of content, content_base64 or r2_key")
    if "propertyNames" in error.relative_schema_path:
        name = error.instance
        return JobRejected(pointer(*path, name), rule, f"environment name {_show(name)} must match [A-Z_][A-Z0-9_]* (at most 128 characters)")
    where = pointer(*path) or "the job"
    if error.validator == "type":
        return JobRejected(pointer(*path), rule, f"{where} must be of type {error.validator_value}")
    return JobRejected(pointer(*path), rule, f"{where}: {error.message[:160]}")


def _sized_object(raw: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """A job that arrived as an object, refused past the document limit as its JSON would be."""
    try:
        size = len(json.dumps(raw, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        size = 0  # not plain JSON (NaN, odd types, too deep): _check_values names what is wrong
    if size > max_bytes:
        raise JobRejected("", "too_large", f"the job is {size} bytes; the limit is {max_bytes}")
    return dict(raw)


def max_document_bytes(settings: Settings) -> int:
    """The largest raw job accepted: inline content as base64 plus room for everything else."""
    return settings.max_inline_bytes * 4 // 3 + 4 + 2 * 2**20


def parse_job(raw: bytes | str | dict[str, Any], settings: Settings, policy: "Policy | None" = None) -> JobSpec:
    """Validate a submitted job (raw bytes preferred, so parser tricks count) into a JobSpec."""
    from sandbox.policy import Policy  # policy imports this module's dataclasses

    if isinstance(raw, dict):
        # a job sent as an object was decoded before it got here (kombu, with a repeated key's last
        # value kept): only its size can still be checked as the raw bytes' is
        doc = _sized_object(raw, max_document_bytes(settings))
    else:
        doc = load_json(raw, max_document_bytes(settings))
    if not isinstance(doc, dict):
        raise JobRejected("", "type", "a job must be a JSON object")
    error = _too_many(doc, settings)
    if error is not None:
        raise error
    _check_values(doc)
    error = _schema_error(doc)
    if error is not None:
        raise error
    job_id = doc.get("id")
    if job_id is None:
        job_id = uuid.uuid4().hex
    elif not JOB_ID.fullmatch(job_id):  # the schema's "$" would accept a trailing newline
        raise JobRejected("/id", "pattern", "the id must match [A-Za-z0-9_-]{1,64}")
    policy = policy or Policy(settings)
    return JobSpec(
        id=job_id,
        command=doc["command"],
        argv=policy.check_command(doc["command"]),
        environment=policy.check_environment(doc.get("environment", {})),
        timeout_s=_timeout(doc.get("timeout"), settings),
        resources=_resources(doc.get("resources", {}), settings),
        network=policy.check_network(doc.get("network", {})),
        files=policy.check_files(doc.get("files", []), job_id),
        callback_url=policy.check_callback_url(doc.get("callback_url")),
        callback_events=_callback_events(doc),
        collect=policy.check_collect(doc.get("collect")),
        setup=_setup(doc.get("setup"), settings, policy),
    )


MAX_SETUP_TIMEOUT_S = 600.0  # runs inside prepare, whose hard time limit is 960 s (celeryconfig)


def _setup(doc: dict[str, Any] | None, settings: Settings, policy: "Policy") -> SetupSpec | None:
    if doc is None:
        return None
    try:
        argv = policy.check_command(doc["command"])
        network = policy.check_network(doc.get("network", {}))
    except JobRejected as e:  # the same rules as the job's own, reported under /setup
        raise JobRejected("/setup" + e.field, e.rule, e.message) from e
    timeout = doc.get("timeout", min(settings.default_timeout_s, MAX_SETUP_TIMEOUT_S))
    if timeout > min(settings.max_timeout_s, MAX_SETUP_TIMEOUT_S):
        raise JobRejected("/setup/timeout", "above_maximum",
                          f"setup timeout {_show(timeout)} s exceeds {min(settings.max_timeout_s, MAX_SETUP_TIMEOUT_S):g} s")
    return SetupSpec(command=doc["command"], argv=argv, timeout_s=float(timeout), network=network)


def _callback_events(doc: dict[str, Any]) -> str:
    events = doc.get("callback_events", "terminal")
    if events == "all" and not doc.get("callback_url"):
        raise JobRejected("/callback_events", "needs_callback_url", "\"all\" needs a callback_url to POST to")
    return events


def job_id_of(raw: bytes | str | dict[str, Any] | Any) -> str | None:
    """Best-effort id of a (possibly rejected) job, only if it is a valid, unambiguous id."""
    try:
        doc = raw if isinstance(raw, dict) else load_json(raw, 64 * 2**20)
    except JobRejected:
        return None
    if not isinstance(doc, dict) or isinstance(doc, _Duplicated):  # a repeated key may be the id
        return None
    job_id = doc.get("id")
    return job_id if isinstance(job_id, str) and JOB_ID.fullmatch(job_id) else None


def _timeout(value: Any, settings: Settings) -> float:
    if value is None:
        return float(settings.default_timeout_s)
    if value > settings.max_timeout_s:  # compare before float(): a huge int would overflow
        raise JobRejected("/timeout", "above_maximum", f"timeout {_show(value)} s exceeds the operator maximum of {settings.max_timeout_s:g} s")
    return float(value)


# The least a sandbox starts in: bwrap's child, its pid 1 and the command are three processes
# (pids 2: bwrap "Can't fork for pid 1"), and below ~1 MiB bwrap itself does not start. Measured on
# `ls`; 4 MiB leaves a margin. Smaller limits were accepted and ended `error` naming no field.
MIN_MEMORY_BYTES = 4 << 20
MIN_PIDS = 3


def _resources(doc: dict[str, Any], settings: Settings) -> ResourceLimits:
    cpu = _unit("/resources/cpu", doc.get("cpu"), parse_cpu, settings.default_cpu, settings.max_cpu, "SANDBOX_MAX_CPU")
    memory = _unit("/resources/memory", doc.get("memory"), parse_size, settings.default_memory_bytes,
                   settings.max_memory_bytes, "SANDBOX_MAX_MEMORY")
    if memory < MIN_MEMORY_BYTES:
        raise JobRejected("/resources/memory", "below_minimum",
                          f"memory {format_size(memory)} is below the {format_size(MIN_MEMORY_BYTES)} a sandbox needs to start")
    disk = _unit("/resources/disk", doc.get("disk"), parse_size, settings.default_disk_bytes,
                 settings.max_disk_bytes, "SANDBOX_MAX_DISK")
    pids = doc.get("pids", settings.default_pids)
    if pids > settings.max_pids:
        raise JobRejected("/resources/pids", "above_maximum", f"pids {_show(pids)} exceeds the operator maximum of {settings.max_pids}")
    if pids < MIN_PIDS:
        raise JobRejected("/resources/pids", "below_minimum",
                          f"pids {pids} is below the {MIN_PIDS} a sandbox needs (bwrap, its pid 1, the command)")
    bandwidth = _unit("/resources/bandwidth", doc.get("bandwidth"), parse_bandwidth, settings.default_bandwidth_bps,
                      settings.max_bandwidth_bps, "SANDBOX_MAX_BANDWIDTH")
    return ResourceLimits(cpu=cpu, memory_bytes=memory, disk_bytes=disk, pids=int(pids), bandwidth_bps=bandwidth)


def _unit(field_: str, text: str | None, parse: Callable[[str], Any], default: Any, maximum: Any, env: str) -> Any:
    if text is None:
        return default
    try:
        value = parse(text)
    except ValueError as e:
        raise JobRejected(field_, "bad_unit", str(e)) from e
    if value > maximum:
        shown = format_size(maximum) if isinstance(maximum, int) else f"{maximum:g}"
        raise JobRejected(field_, "above_maximum", f"{text} exceeds the operator maximum of {shown} ({env})")
    return value
