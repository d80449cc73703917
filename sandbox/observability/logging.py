"""Structured logs: one JSON object per line, carrying the job, stage, task and node in context."""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter

from sandbox.errors import ConfigError

# Set by the task wrapper (tasks.monitoring) for the task running in this thread; every line logged
# meanwhile carries them without anyone passing them by hand.
CONTEXT_FIELDS = ("job_id", "stage", "task_id", "node")
_context: contextvars.ContextVar[dict[str, str | None]] = contextvars.ContextVar("sandbox_log_context", default={})
_node = {"name": None}
AUDIT_LOGGER = "sandbox.audit"
FORMATS = ("text", "json")


def set_node(name: str | None) -> None:
    """The node every line of this process names (a process is one node)."""
    _node["name"] = name


def bind(**fields: str | None) -> contextvars.Token:
    """Add fields (job_id, stage, task_id) to this thread's log context; `unbind` with the token."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """`bind` for the length of a with block."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def current() -> dict[str, str | None]:
    """The log context of this thread, node included."""
    return {"node": _node["name"], **_context.get()}


class ContextFilter(logging.Filter):
    """Copies the context (and `audit` for the audit logger) onto every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        if record.name == AUDIT_LOGGER or record.name.startswith(AUDIT_LOGGER + "."):
            record.audit = True
        return True


class SandboxJsonFormatter(JsonFormatter):
    """time, level, logger, message, the context fields, and an audit line's own fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         json_ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                log_data[key] = value
        if getattr(record, "audit", False):
            log_data["audit"] = True
            event = _json_object(log_data.get("message"))
            if event is not None:  # audit messages are JSON objects: their fields become the line's
                log_data.update({k: v for k, v in event.items() if k not in ("time", "level", "logger", "message")})
        # Celery's own lines carry a `data` dict (task args repr among them): never repeat it.
        log_data.pop("data", None)


def _json_object(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str) or not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class TextFormatter(logging.Formatter):
    """A developer's terminal: the usual line, with the job id when there is one."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s: %(levelname)s/%(name)s]%(job)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job_id, stage = getattr(record, "job_id", None), getattr(record, "stage", None)
        record.job = f" [{job_id}{'/' + stage if stage else ''}]" if job_id else ""
        return super().format(record)


def configure(log_format: str, level: int | str = logging.INFO, stream: Any = None) -> logging.Handler:
    """Point the root logger at one stream handler in `log_format` (text|json); returns the handler."""
    if log_format not in FORMATS:
        raise ConfigError("SANDBOX_LOG_FORMAT", f"must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SandboxJsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
