"""The collect stage: logs and collected files uploaded to R2, each with a presigned download URL.

Split out of sandbox.lifecycle (the other stages) along its seam: everything here serves collect.
"""
from __future__ import annotations

import functools
import io
import json
import os
from typing import Any, Callable

from sandbox import parallel
from sandbox.errors import StorageError
from sandbox.events import escape_line
from sandbox.layout import check_key, log_key, output_key
from sandbox.services import Fresh, Services, finish_stage, job_spec, owned_handle, stage_start
from sandbox.state import JobStatus


def collect(svc: Services, job_id: str) -> None:
    """Upload logs, then every collected file to R2, each with a presigned download URL.

    Logs go first; a name or an object S3 refuses is skipped with its reason, never the whole stage;
    every handle of the workspace is closed before the stage ends, so destroy can unmount it.
    """
    # One round trip: the stage's start, written only when the command ran (an outcome), the job
    # has not ended and has not moved past collect (a stale copy); it answers the current record.
    fresh = Fresh(svc, "collect", JobStatus.COLLECTING, None)
    record = svc.store.transition(job_id, JobStatus.COLLECTING, also=stage_start(svc, "collect"),
                                  only_if=lambda r: fresh(r) and r.get("outcome") is not None)
    fresh.check(record)
    if record.get("outcome") is None:
        return
    handle = owned_handle(svc, record)
    opened_logs = svc.runtime.logs(handle)
    spec = job_spec(svc, job_id)
    collected = svc.runtime.collect(handle, spec.collect)  # (kills what is left of the job first)
    outputs: list[tuple[str, Callable[[], Any], int | None, str | None]] = []
    refused: list[dict[str, str]] = []
    taken: set[str] = set()
    try:
        for f in collected:
            key = output_key(job_id, f.relpath)
            shown = shown_path(f.relpath)
            try:
                # a name that displays as another one ('a\u202efdp.exe') is no name; nor is one with
                # U+FFFD, which is how an invalid byte of another name is shown
                if shown != f.relpath or "\ufffd" in f.relpath:
                    raise StorageError("name is not UTF-8 or has control, bidi, invisible or "
                                       "replacement characters")
                check_key(key)  # a job-chosen name: control characters or '..' never reach S3
                if key in taken:  # collect ["artifacts", "x"]: artifacts/x/f and x/f share a key
                    raise StorageError("its object key is taken by a file collected before it")
            except StorageError as e:
                refused.append({"path": f.relpath, "reason": str(e)})
                continue
            taken.add(key)
            outputs.append((key, f.open, f.size, f.relpath))
    finally:
        close = getattr(collected, "close", None)
        if close:
            close()  # the walk's directory handles pin the workspace mount: released on every path
    # An empty log is read once and stored as nothing (no PUT, presign or audit line): its entry says
    # so. Read after runtime.collect killed what was left, so no late write can follow the verdict.
    # A log file the runtime says is empty (fstat) gets its entry here: handing it to a helper
    # thread only to find nothing to read cost more worker CPU than the check (a wake-up and GIL
    # hand-offs). Logs of unknown size (a Fly agent's stream) go through the upload, which reads first.
    uploads: list[tuple[str, Callable[[], Any], int | None, str | None]] = []
    entries: dict[str, dict | None] = {}
    for name, fh in opened_logs.items():
        key = log_key(job_id, f"{name}.log")
        if _known_empty(fh):
            fh.close()
            entries[key] = empty_entry(key)
        else:
            entries[key] = None
            uploads.append((key, (lambda fh=fh: fh), None, None))
    events = json.dumps({key: record[key] for key in ("timeline", "stages", "security_events")}, indent=1).encode()
    entries[log_key(job_id, "events.json")] = None
    uploads.append((log_key(job_id, "events.json"), lambda: io.BytesIO(events), len(events), None))
    # Logs first, on their own: an output S3 refuses must never cost the job its logs.
    uploaded = iter(_upload_all(svc, job_id, uploads, skip_empty=True))
    logs = [entry if entry is not None else next(uploaded) for entry in entries.values()]
    artifacts = []
    for upload, entry in zip(outputs, _upload_all(svc, job_id, outputs, tolerate=True)):
        if isinstance(entry, Exception):  # refused by S3 or unreadable: this object only
            refused.append({"path": upload[3], "reason": str(entry)[:500]})
        else:
            artifacts.append(entry)
    # over a cap, links, devices, bad names: every job-chosen path in the record is shown escaped and cut
    skipped = listed_skips(list(getattr(collected, "skipped", [])) + refused, getattr(collected, "not_listed", 0))
    finish_stage(svc, job_id, "collect", also=lambda r: r.update(logs=logs, artifacts=artifacts,
                                                                  skipped_outputs=skipped))


def shown_path(relpath: str) -> str:
    """A job-chosen path as text that shows what it is: bad UTF-8, controls, bidi and zero-width escaped."""
    return escape_line(relpath.encode("utf-8", "surrogateescape"))


# The job record is kept for days, re-sent on every update and in every webhook: what a job names
# must not grow it. A skipped path (32 levels of 255-byte names) escaped ran to 48 KiB of JSON each.
SHOWN_PATH_CHARS = 512
SKIPPED_BUDGET_BYTES = 64 * 1024  # skipped_outputs as JSON, the closing "more not listed" entry aside


def listed_path(relpath: str) -> dict[str, Any]:
    """{"path": shown_path(relpath)} cut to SHOWN_PATH_CHARS + "…", with "cut": True if it was."""
    # Escaping only the head keeps the work bounded too. Invalid UTF-8 turns at most 3 characters
    # (surrogate-escaped bytes) into one U+FFFD, so a head of 4x the shown length always shows more
    # than SHOWN_PATH_CHARS when the path goes on past it: a cut is never missed.
    shown = shown_path(relpath[:4 * SHOWN_PATH_CHARS])
    if len(shown) <= SHOWN_PATH_CHARS:
        return {"path": shown}
    return {"path": shown[:SHOWN_PATH_CHARS] + "\u2026", "cut": True}


def listed_skips(skipped: list[dict[str, Any]], not_listed: int = 0) -> list[dict[str, Any]]:
    """`skipped` ({"path" as the job named it, "reason"}) as the record shows it: paths escaped and
    cut, at most SKIPPED_BUDGET_BYTES of them, then one {"path": "", "reason": "N more not listed",
    "not_listed": N} for the rest and the `not_listed` the walk did not keep."""
    shown: list[dict[str, Any]] = []
    used = 0
    for i, entry in enumerate(skipped):
        item = {**entry, **listed_path(str(entry["path"])), "reason": str(entry["reason"])[:500]}
        used += len(json.dumps(item))
        if used > SKIPPED_BUDGET_BYTES:
            not_listed += len(skipped) - i
            break
        shown.append(item)
    if not_listed:
        shown.append({"path": "", "reason": f"{not_listed} more not listed", "not_listed": not_listed})
    return shown


UPLOAD_THREADS = 4  # per collect: S3 PUTs are round trips, not CPU; a few at once cut collect's wall time


def _known_empty(fh: Any) -> bool:
    """The log is a file of 0 bytes now (after the collect's kill: nothing writes it any more)."""
    try:
        return os.fstat(fh.fileno()).st_size == 0
    except (AttributeError, OSError, ValueError):  # no file behind it (io.UnsupportedOperation is an OSError)
        return False


def empty_entry(key: str) -> dict:
    """The record's entry of an empty log: no object is stored, so there is no URL to fetch."""
    return {"key": key, "size": 0, "url": None}


def _upload_all(svc: Services, job_id: str, uploads: list[tuple[str, Callable[[], Any], int | None, str | None]],
                tolerate: bool = False, skip_empty: bool = False) -> list[Any]:
    """Upload every (key, opener, size, path) concurrently; entries in the same order. The first error
    raises, except with `tolerate`, where a refused or unreadable object is its entry's exception
    (a backend outage still raises: the stage is retried). With `skip_empty`, an empty source is not
    stored: its entry is `empty_entry`."""

    def one(upload: tuple[str, Callable[[], Any], int | None, str | None]) -> Any:
        try:
            return _upload(svc, job_id, *upload, skip_empty=skip_empty)
        except (StorageError, OSError) as e:  # (a TransientError is neither: it always raises)
            if not tolerate:
                raise
            return e

    # on the process's shared helper threads: starting threads per collect cost a third of its time
    return parallel.run_all([functools.partial(one, u) for u in uploads], UPLOAD_THREADS)


def _upload(svc: Services, job_id: str, key: str, opener: Callable[[], Any], size: int | None,
            path: str | None = None, skip_empty: bool = False) -> dict:
    fh = opener()
    try:
        written = svc.artifacts.upload(key, fh, job_id, size=size, skip_empty=skip_empty)
    finally:
        fh.close()
    if skip_empty and written == 0:
        return empty_entry(key)
    entry = {"key": key, "size": written, "url": svc.artifacts.presign_get(key, job_id)}
    if path is not None:
        entry["path"] = path
    return entry
