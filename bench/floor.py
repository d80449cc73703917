"""The floor issue 10 names for a trivial job, as five tasks: loaded into the benchmark's worker with
`--include bench.floor` (never in production), sent on the same queue as the no-op chain.

Issue 10 asks a trivial job's overhead to approach "a 5-task chain + a bare bwrap+cgroup start + the
S3 writes". `chain(*floor_signatures(client)).apply_async().get()` runs exactly that, with the
product's own primitives, in the order of the job's stages:

  bench.floor.cgroup   (submit+create) a fresh cgroup with the trivial job's default limits
                       (sandbox/runtimes/cgroups.py through the worker's LocalRuntime), a plain empty
                       directory for /workspace and /tmp in the run dir (no disk image), and a host
                       uid from the product's UidPool (one symlink: concurrent floors must not share
                       a uid any more than sandboxes do)
  bench.noop           (prepare)
  bench.floor.run      (execute) `ls` in bubblewrap as an execute with nothing pre-started spawns
                       it: executor.spawn_gated (the launcher that joins the cgroup and drops to the
                       uid; the product's argv builder bwrap.job_argv, which needs no disk
                       image, only a directory with mnt/workspace and mnt/tmp: the job's namespaces
                       with --unshare-user, read-only /usr and the shared /etc, /proc, --dev,
                       seccomp), held on its gate until ready, released; then its stdout and stderr
                       read to EOF and its exit awaited
  bench.floor.store    (collect+cleanup's upload) the S3 writes a trivial job makes, one PUT each
                       through the product's DirectS3 to the configured bucket: events.json, and
                       audit.jsonl; stdout.log only when `ls` printed something (collect stores no
                       empty log, and an empty workspace lists nothing)
  bench.floor.remove   (cleanup) kill and remove the cgroup, free the uid, remove the directory

Left out on purpose (what the job adds above its floor): the disk image (clone, loop mount,
unmount, unlink), the job record and its status events, admission, validation, the pre-start,
live logs, usage accounting, presigned URLs and the audit lines in Redis. Each task returns a
small dict with its wall time added (`task_ms`); results are stored as the no-op chain's are
(Celery's default), the chain's caller reads only the last.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from celery import Celery
from celery.canvas import Signature

from config.settings import Settings
from sandbox.layout import log_key
from sandbox.runtimes import bwrap, cgroups, executor, hostetc
from sandbox.runtimes.local import LocalRuntime
from sandbox.s3client import sse_c_key, sse_headers
from sandbox.spec import JobSpec, parse_job
from tasks.app import app, services

PREFIX = "floor-"  # never a job's (theirs are sbx-<job id>): the floors and the product's sweeps never meet
_NAME = re.compile(r"floor-[0-9a-f]{16}")
RUN_TIMEOUT_S = 30.0


def floor_signatures(client: Celery, queue: str | None = None) -> list[Signature]:
    """The five tasks, in order, for `chain(*...)`; on `queue` when given, else the client's default."""
    options = {"queue": queue} if queue else {}
    return [client.signature(name, **options) for name in
            ("bench.floor.cgroup", "bench.noop", "bench.floor.run", "bench.floor.store", "bench.floor.remove")]


@functools.lru_cache(maxsize=4)
def trivial_spec(settings: Settings) -> JobSpec:
    """The benchmark's trivial job (`ls`) as submit would parse it: its argv and default limits.
    Parsed once per process: validation is the job's cost, not the floor's."""
    return parse_job({"id": "floor", "command": "ls"}, settings)


def _runtime() -> LocalRuntime:
    rt = services().runtime
    if not isinstance(rt, LocalRuntime):
        raise RuntimeError("the floor is a local sandbox start: run the benchmark's worker with SANDBOX_RUNTIME=local")
    return rt


def _dir(rt: LocalRuntime, name: str) -> str:
    if not _NAME.fullmatch(name):  # our own name back from the broker: still, never a path from outside
        raise ValueError(f"not a floor name: {name!r:.80}")
    return os.path.join(rt.run_dir, name)


def make(rt: LocalRuntime, spec: JobSpec) -> dict[str, Any]:
    """A floor sandbox: directory, uid, cgroup. Undone on any failure half-way."""
    name = PREFIX + uuid.uuid4().hex[:16]
    d = _dir(rt, name)
    with _removed_on_error(rt, name):
        os.mkdir(d, 0o711)  # the uid's bwrap must reach mnt/ (as create's sandbox directory)
        uid = rt.uids.allocate(name)
        os.mkdir(os.path.join(d, "mnt"), 0o755)
        for sub in ("workspace", "tmp"):  # as mount_image leaves the disk's own two directories
            os.mkdir(os.path.join(d, "mnt", sub), 0o755)
            os.chown(os.path.join(d, "mnt", sub), uid, uid, follow_symlinks=False)
        r = spec.resources
        rt.cgroups.create(name, cgroups.CgroupLimits(r.cpu, r.memory_bytes, r.pids))
    return {"name": name, "uid": uid}


def run(rt: LocalRuntime, spec: JobSpec, ctx: dict[str, Any]) -> dict[str, Any]:
    """`ls` in the floor sandbox: exit code, stdout and stderr (each cut to 4 KiB)."""
    name, uid = ctx["name"], int(ctx["uid"])
    d = _dir(rt, name)
    with _removed_on_error(rt, name):
        meta = {"uid": uid, "etc": hostetc.shared_etc(rt.work_dir, bwrap.INSIDE_UID)}
        proc, gate = executor.spawn_gated(rt, d, meta, name, spec)
        try:
            gate.wait_ready()  # as execute: the launcher joined the cgroup, bwrap said its child's pid
            gate.release()
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        except BaseException:
            gate.shut()  # (a no-op once released)
            rt.cgroups.kill(name)
            proc.kill()
            proc.communicate()
            raise
    return {**ctx, "exit_code": proc.returncode, "stdout": stdout[:4096].decode(errors="replace"),
            "stderr": stderr[:4096].decode(errors="replace")}


def store(rt: LocalRuntime, settings: Settings, ctx: dict[str, Any]) -> dict[str, Any]:
    """The trivial job's S3 writes, one PUT each: {key: bytes} of what was stored."""
    name = ctx["name"]
    _dir(rt, name)  # the name is a key below too: checked first
    with _removed_on_error(rt, name):
        artifacts = services().artifacts
        headers = sse_headers(sse_c_key(settings))
        bodies = {"events.json": _events_body(ctx)}
        if ctx.get("stdout"):  # collect stores no empty log
            bodies["stdout.log"] = ctx["stdout"].encode()
        bodies["audit.jsonl"] = _audit_body(name, bodies, settings)
        written = {}
        for object_name, body in bodies.items():
            key = log_key(name, object_name)
            artifacts.direct.put(artifacts.bucket, key, body, headers)
            written[key] = len(body)
    return {**ctx, "stored": written}


def _events_body(ctx: dict[str, Any]) -> bytes:
    """An events.json of the job's shape and size (~1 KiB: seven statuses, five stages)."""
    now = time.time()
    statuses = ("queued", "creating", "preparing", "running", "collecting", "cleaning", "succeeded")
    stages = ("create", "prepare", "execute", "collect", "cleanup")
    return json.dumps({"timeline": [{"status": s, "at": now} for s in statuses],
                       "stages": {s: {"attempts": 1, "host": "bench@host", "pid": os.getpid(), "started_at": now,
                                      "finished_at": now, "duration_s": 0.001} for s in stages},
                       "security_events": [], "exit_code": ctx.get("exit_code")}, indent=1).encode()


def _audit_body(name: str, bodies: dict[str, bytes], settings: Settings) -> bytes:
    """An audit.jsonl of the job's shape and size (~1 KiB): a put and a presign line per object."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    lines = []
    for object_name, body in bodies.items():
        for op, size in (("put", len(body)), ("presign", None)):
            lines.append(json.dumps({"actor": "bench@host", "at": at, "job_id": name, "key": log_key(name, object_name),
                                     "op": op, "outcome": "ok", "size": size,
                                     **({"ttl_s": settings.presign_ttl_s} if op == "presign" else {})},
                                    sort_keys=True).encode() + b"\n")
    put_line = lines[0].replace(b"events.json", b"audit.jsonl")  # the trail's own put, as the job's has
    return b"".join([*lines, put_line])


def remove(rt: LocalRuntime, ctx: dict[str, Any]) -> dict[str, Any]:
    """Kill and remove the cgroup, free the uid, remove the directory; a missing part is fine."""
    name = ctx["name"]
    d = _dir(rt, name)
    rt.cgroups.kill(name)
    rt.cgroups.remove(name)
    rt.uids.release(name, ctx.get("uid"))
    if os.path.isdir(d):
        shutil.rmtree(d)  # fd-based: never follows a link out of the directory
    return {**ctx, "removed": True}


@contextmanager
def _removed_on_error(rt: LocalRuntime, name: str) -> Iterator[None]:
    """A floor whose task fails ends its chain: nothing later removes it, so the failing task does."""
    try:
        yield
    except BaseException:
        try:
            remove(rt, {"name": name, "uid": None})
        except Exception:  # noqa: BLE001 - the error on its way out is the one to report
            pass
        raise


def _timed(step: str, ctx: dict[str, Any], work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """work()'s result with its wall time added to ctx's task_ms (read as the job's stage durations are)."""
    start = time.perf_counter()
    out = work()
    return {**out, "task_ms": {**ctx.get("task_ms", {}), step: (time.perf_counter() - start) * 1e3}}


@app.task(name="bench.floor.cgroup")
def floor_cgroup(_: object = None) -> dict[str, Any]:
    rt = _runtime()
    return _timed("cgroup", {}, lambda: make(rt, trivial_spec(rt.settings)))


@app.task(name="bench.floor.run")
def floor_run(ctx: dict[str, Any]) -> dict[str, Any]:
    rt = _runtime()
    return _timed("run", ctx, lambda: run(rt, trivial_spec(rt.settings), ctx))


@app.task(name="bench.floor.store")
def floor_store(ctx: dict[str, Any]) -> dict[str, Any]:
    rt = _runtime()
    return _timed("store", ctx, lambda: store(rt, rt.settings, ctx))


@app.task(name="bench.floor.remove")
def floor_remove(ctx: dict[str, Any]) -> dict[str, Any]:
    rt = _runtime()
    return _timed("remove", ctx, lambda: remove(rt, ctx))
