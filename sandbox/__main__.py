"""`python -m sandbox`: submit, show, validate, cancel and follow jobs (see `--help`)."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from config import load_settings
from sandbox.errors import JobRejected, SandboxError

EXIT_OK, EXIT_FAILED, EXIT_REJECTED = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="submit a job file; with --wait, follow it to its end")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="print status and log lines on stderr, the record on stdout")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    sub.add_parser("show", help="print a job record").add_argument("id")
    sub.add_parser("validate", help="check a job file exactly as sandbox.submit would").add_argument("file", type=Path)
    sub.add_parser("cancel", help="cancel a job at any stage").add_argument("id")
    p = sub.add_parser("logs", help="print a job's log lines")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true", help="keep following until the job ends")
    sub.add_parser("config", help="print the settings in force (secrets masked)")
    p = sub.add_parser("health", help="check Redis, S3, workers, beat and queues; exit 0 ok, 1 degraded, 2 down")
    p.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    p = sub.add_parser("dead-letters", help="list the messages no worker could run (newest first)")
    p.add_argument("--limit", type=int, default=20, help="how many to list")
    p.add_argument("--show", type=int, metavar="INDEX", help="print one entry whole")
    p.add_argument("--drop", metavar="DEAD_ID", help="remove one entry by its dead_id (an INDEX for entries without one)")
    p.add_argument("--drop-all", action="store_true", help="remove every entry")
    args = parser.parse_args(argv)
    _configure_logging()
    import redis
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError

    try:
        return COMMANDS[args.command](args)
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as e:
        from sandbox.observability.health import where

        print(f"error: Redis unreachable at {where(load_settings().redis_url)}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except CeleryTimeout:
        print("error: no answer from a worker: is one running? (python -m sandbox health)", file=sys.stderr)
        return EXIT_FAILED


def _configure_logging() -> None:
    import logging
    import os

    from sandbox.observability import logging as obs_logging

    # The CLI's own service-side lines (warnings, errors) in the format operators chose; a bad value
    # is reported by load_settings where it matters, so fall back to json here.
    log_format = os.environ.get("SANDBOX_LOG_FORMAT", "json")
    obs_logging.configure(log_format if log_format in obs_logging.FORMATS else "json", logging.WARNING)


def _health(args: argparse.Namespace) -> int:
    from sandbox.observability import health
    from sandbox.storage import ArtifactStore

    settings = load_settings()
    checks = health.run(settings, lambda: ArtifactStore(settings, actor="health", max_attempts=1, timeout_s=5.0))
    print(json.dumps(health.as_json(checks), indent=2) if args.json else health.table(checks))
    return health.EXIT_CODES[health.worst(checks)]


def _validate(args: argparse.Namespace) -> int:
    from sandbox.lifecycle import validate

    try:
        spec = validate(args.file.read_bytes(), load_settings())
    except JobRejected as e:
        print(json.dumps({"valid": False, "error": e.as_dict()}, indent=2))
        return EXIT_REJECTED
    print(json.dumps({"valid": True, "id": spec.id, "argv": list(spec.argv)}, indent=2))
    return EXIT_OK


def _with_id(raw: bytes, max_bytes: int | None = None) -> tuple[str, str | None]:
    """The job text to send, and its id; a job without one gets a fresh id so it can be followed.

    The file's text is sent as it is, the id spliced in after its opening brace: never parsed and
    written out again, which would drop a duplicate key, turn NaN into a number the worker then
    reads, or grow the document past the size limit, so `submit` refuses exactly what `validate`
    refuses. A document the strict loader refuses goes unchanged (the worker records why); one
    the id would push past `max_bytes` (default: the settings' limit) goes without an id.
    """
    from sandbox.spec import _check_values, load_json, max_document_bytes

    text = raw.decode("utf-8", errors="strict")
    limit = max_document_bytes(load_settings()) if max_bytes is None else max_bytes
    try:
        job = load_json(raw, limit)
        _check_values(job)  # duplicate keys, NaN, lone surrogates, NUL: what load_json leaves marked
    except JobRejected:
        return text, None
    if not isinstance(job, dict):
        return text, None
    if "id" in job:
        return text, job["id"] if isinstance(job["id"], str) else None
    job_id = uuid.uuid4().hex
    start = len(text) - len(text.lstrip(" \t\n\r")) + 1  # just past the opening brace
    empty = text[start:].lstrip(" \t\n\r").startswith("}")
    member = f'"id":"{job_id}"' + ("" if empty else ",")
    if len(raw) + len(member) > limit:
        return text, None
    return text[:start] + member + text[start:], job_id


def _submit(args: argparse.Namespace) -> int:
    from tasks import app

    text, job_id = _with_id(args.file.read_bytes())
    # the run of Redis the job goes to, read before the send: the wait then sees every restart after
    # it, also one that came before the wait's first check
    client, run_id = None, None
    if args.wait and job_id:
        import redis

        from sandbox.nodes import redis_run_id

        client = redis.Redis.from_url(load_settings().redis_url, socket_timeout=5)
        run_id = redis_run_id(client)
    # Flower shows a task's args: the job's environment and files must never be among them
    result = app.send_task("sandbox.submit", args=[text], argsrepr=f"job={job_id or '?'}")
    print(f"submitted job {job_id or '?'} (task {result.id})", file=sys.stderr)
    if not args.wait:
        print(json.dumps({"id": job_id, "task_id": result.id}))
        return EXIT_OK
    if job_id:
        threading.Thread(target=_print_progress, args=(job_id,), daemon=True).start()
    try:
        record = _wait(result, job_id, args.timeout, client, run_id)
    except SandboxError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a stage hit its hard time limit: the record still says why
        if not job_id:
            raise
        print(f"the submit task ended with {type(e).__name__}: {e}; reading the job record", file=sys.stderr)
        record = _store().get(job_id)
    print(json.dumps(record, indent=2))
    return {"succeeded": EXIT_OK, "rejected": EXIT_REJECTED}.get(record.get("status"), EXIT_FAILED)


def _wait(result: Any, job_id: str | None, timeout_s: float | None, client: Any, run_id: str | None) -> dict:
    """The final record; a job Redis lost (a restart without its data) is an error, not a hang.
    `run_id`: the run of Redis (`client`'s) the job was sent to, read before the send."""
    import time

    import redis
    from celery.exceptions import TimeoutError as ResultTimeout

    from sandbox.nodes import SubmissionWatch

    if not job_id:
        return result.get(timeout=timeout_s, propagate=True)
    watch = SubmissionWatch(client, job_id, result.id, run_id=run_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        try:
            return result.get(timeout=2.0, propagate=True)
        except ResultTimeout:
            pass
        except (redis.RedisError, OSError, RuntimeError):  # Redis restarting under the result backend
            time.sleep(1.0)
        state = watch.check()
        if state and state[0] == "ended":
            return state[1]
        if state and state[0] == "vanished":
            raise SandboxError(state[1])
    raise SandboxError(f"job {job_id} did not end within {timeout_s} s")


def _bus() -> Any:
    import redis

    from sandbox.events import EventBus

    settings = load_settings()
    return EventBus.from_settings(redis.Redis.from_url(settings.redis_url), settings)


def _print_progress(job_id: str) -> None:
    for kind, _entry_id, item in _bus().follow(job_id):
        if kind == "logs":
            print(f"[{item['stream']}] {item['line']}", file=sys.stderr, flush=True)
        elif item.get("type") == "status":
            print(f"status: {item['status']}", file=sys.stderr, flush=True)
        else:
            print(f"event: {json.dumps(item)}", file=sys.stderr, flush=True)


def _logs(args: argparse.Namespace) -> int:
    bus = _bus()
    entries = (e for kind, _id, e in bus.follow(args.id) if kind == "logs") if args.follow else (
        e for _id, e in bus.read_logs(args.id))
    for entry in entries:
        print(f"[{entry['stream']}] {entry['line']}", flush=True)
    return EXIT_OK


def _store() -> Any:
    import redis

    from sandbox.state import JobStore

    return JobStore(redis.Redis.from_url(load_settings().redis_url))


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(_store().get(args.id), indent=2))
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    from tasks import app

    answer = app.send_task("sandbox.cancel", args=[args.id]).get(timeout=60)
    print(json.dumps(answer, indent=2))
    return EXIT_OK if answer.get("cancelled") else EXIT_FAILED


def _config(args: argparse.Namespace) -> int:
    print(json.dumps(load_settings().redacted(), indent=2, default=list))
    return EXIT_OK


def _dead_letters(args: argparse.Namespace) -> int:
    import redis

    from sandbox import deadletters

    client = redis.Redis.from_url(load_settings().redis_url)
    if args.drop_all or args.drop is not None:
        count = deadletters.drop(client, None if args.drop_all else args.drop)
        print(json.dumps({"dropped": count}))
        return EXIT_OK if count else EXIT_FAILED
    if args.show is not None:
        found = deadletters.entries(client, args.show, 1)
        if not found:
            print(f"error: no dead letter at index {args.show}", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(found[0], indent=2))
        return EXIT_OK
    listed = deadletters.entries(client, 0, args.limit)
    print(json.dumps({"total_recorded": deadletters.total(client), "kept": client.llen(deadletters.DEAD_LIST),
                      "entries": [{k: e.get(k) for k in ("index", "at", "queue", "reason", "task", "id")}
                                  for e in listed]}, indent=2))
    return EXIT_OK


COMMANDS = {"submit": _submit, "show": _show, "validate": _validate, "cancel": _cancel, "logs": _logs,
            "config": _config, "health": _health, "dead-letters": _dead_letters}

if __name__ == "__main__":
    sys.exit(main())
