"""The bucket's layout: jobs/{job-id}/{input,output,logs,artifacts}/..., templates/..., shared/...

Object keys often carry names a job chose, so every key is checked before it reaches S3.
"""
from __future__ import annotations

from sandbox.errors import StorageError

CATEGORIES = ("input", "output", "logs", "artifacts")
DEFAULT_RETENTION_DAYS = {"input": 7, "output": 30, "logs": 30, "artifacts": 30}


def log_key(job_id: str, name: str) -> str:
    """Where a job's stdout, stderr and event log go."""
    return f"jobs/{job_id}/logs/{name}"


def output_key(job_id: str, relpath: str) -> str:
    """A collected workspace file: output/ and artifacts/ keep their prefix, other dirs go under artifacts/."""
    top = relpath.split("/", 1)[0]
    return f"jobs/{job_id}/{relpath}" if top in ("output", "artifacts") else f"jobs/{job_id}/artifacts/{relpath}"


def check_key(key: str) -> str:
    """The key unchanged if it is a safe object key, else StorageError (keys may carry job-chosen names)."""
    try:
        size = len(key.encode("utf-8"))
    except (UnicodeEncodeError, AttributeError) as e:
        raise StorageError(f"object key is not valid UTF-8 text: {key!r:.200}") from e
    if (not 0 < size <= 1024 or any(p in ("", ".", "..") for p in key.split("/"))
            or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key)):
        raise StorageError(f"object key must be 1..1024 bytes of '/'-separated names, none empty, '.' or '..', "
                           f"without control characters: {key!r:.200}")
    return key


def category_of(key: str) -> str | None:
    """'input'/'output'/'logs'/'artifacts' for jobs/{id}/{cat}/..., 'templates'/'shared' at the top."""
    parts = key.split("/")
    if parts[0] == "jobs":
        return parts[2] if len(parts) > 3 and parts[2] in CATEGORIES else None
    return parts[0] if len(parts) > 1 and parts[0] in ("templates", "shared") else None
