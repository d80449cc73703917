"""Prometheus metrics of the service, and the hooks that move them (no Celery, no Redis here).

One worker node is one process (Celery's threads pool), so the default registry is the node's.
Counters move once per job, from its terminal record (tasks.monitoring makes sure of "once").
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from prometheus_client import Counter, Histogram

# 10 ms .. 1 h: a no-op stage (ms) and a job at the operator's maximum timeout (1 h) both resolve.
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BYTES_BUCKETS = tuple(float(4**n * 1024) for n in range(0, 13))  # 1 KiB .. 16 GiB, x4
CPU_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200)

JOBS = Counter("sandbox_jobs", "Jobs that reached a terminal status.", ["status", "runtime"])
REJECTIONS = Counter("sandbox_rejections", "Jobs rejected by validation, by field (JSON pointer, "
                     "indices and free names as *) and rule.", ["field", "rule"])
SECURITY_EVENTS = Counter("sandbox_security_events", "Security events on job records (limits hit, "
                          "rejections), by type.", ["type"])
WEBHOOKS = Counter("sandbox_webhook_deliveries", "Webhook deliveries by final outcome "
                   "(delivered, refused: a 4xx, failed: gave up after retries).", ["outcome"])
STAGE_FAILURES = Counter("sandbox_stage_failures", "Jobs ended as error by a stage that failed "
                         "(create: sandbox create failures; cleanup: destroy failures).", ["stage"])
SWEPT = Counter("sandbox_swept", "What beat's sweeps ended: orphans (sandboxes destroyed), "
                "stuck (jobs ended as error).", ["sweep"])
RESTORED = Counter("sandbox_messages_restored", "Unacknowledged messages a dead worker process held, "
                   "given back to their queues: at its node's restart (startup), or by the stuck sweep "
                   "once its node's heartbeat stopped (sweep).", ["by"])
STAGE_SECONDS = Histogram("sandbox_stage_duration_seconds", "Wall time of one stage task.", ["stage"],
                          buckets=DURATION_BUCKETS_S)
JOB_SECONDS = Histogram("sandbox_job_duration_seconds", "Submit to terminal status.", ["status"],
                        buckets=DURATION_BUCKETS_S)
QUEUE_WAIT_SECONDS = Histogram("sandbox_queue_wait_seconds", "Submit accepted to create started.",
                               buckets=DURATION_BUCKETS_S)
CPU_SECONDS = Histogram("sandbox_job_cpu_seconds", "CPU time a job used.", buckets=CPU_BUCKETS_S)
MEMORY_PEAK = Histogram("sandbox_job_memory_peak_bytes", "A job's peak memory.", buckets=BYTES_BUCKETS)
BYTES_WRITTEN = Histogram("sandbox_job_bytes_written", "Bytes a job wrote to its disk.", buckets=BYTES_BUCKETS)
EGRESS_BYTES = Histogram("sandbox_job_egress_bytes", "Bytes up and down through the egress proxy, per job "
                         "that had outbound network.", buckets=BYTES_BUCKETS)

_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "schema" / "job.schema.json").read_text())
_LABEL_WORD = re.compile(r"[A-Za-z0-9_]{1,40}")


def label_word(value: Any) -> str:
    """A label value from code-chosen words only; anything else (hostile text) becomes 'other'."""
    return value if isinstance(value, str) and _LABEL_WORD.fullmatch(value) else "other"


def field_label(pointer: Any) -> str:
    """A rejected field's JSON pointer with indices and job-chosen names as '*' (bounded labels)."""
    if not isinstance(pointer, str) or not pointer:
        return "/"
    node: dict[str, Any] | None = _SCHEMA
    shown = []
    for part in pointer.lstrip("/").split("/"):
        props = (node or {}).get("properties", {})
        if part in props:
            shown.append(part)
            node = props[part]
        else:
            shown.append("*")
            node = (node or {}).get("items") if part.isdigit() else None
            if node and "$ref" in node:
                node = _SCHEMA.get("$defs", {}).get(node["$ref"].rsplit("/", 1)[-1])
            if node is None:
                break
    return "/" + "/".join(shown)


def job_finished(record: dict[str, Any], runtime: str) -> None:
    """Count a terminal record: status, rejection, security events, failures, durations, resources."""
    status = label_word(record.get("status"))
    JOBS.labels(status=status, runtime=runtime).inc()
    error = record.get("error") or {}
    if status == "rejected":
        REJECTIONS.labels(field=field_label(error.get("field")), rule=label_word(error.get("rule"))).inc()
    elif status == "error" and error.get("stage"):
        STAGE_FAILURES.labels(stage=label_word(error["stage"])).inc()
    for event in record.get("security_events") or []:
        SECURITY_EVENTS.labels(type=label_word(event.get("type"))).inc()
    if record.get("finished_at") and record.get("created_at") and status != "rejected":
        JOB_SECONDS.labels(status=status).observe(max(0.0, record["finished_at"] - record["created_at"]))
    create = (record.get("stages") or {}).get("create") or {}
    if create.get("started_at") and record.get("created_at"):
        QUEUE_WAIT_SECONDS.observe(max(0.0, create["started_at"] - record["created_at"]))
    _resources(record.get("resources_used") or {})
    totals = (record.get("network") or {}).get("totals") or {}
    if totals:  # the egress proxy's totals, on jobs that had outbound network
        EGRESS_BYTES.observe(sum(v for k in ("bytes_up", "bytes_down") if _count(v := totals.get(k))))


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _resources(used: dict[str, Any]) -> None:
    for histogram, key in ((CPU_SECONDS, "cpu_seconds"), (MEMORY_PEAK, "memory_peak_bytes"),
                           (BYTES_WRITTEN, "bytes_written")):
        value = used.get(key)
        if _count(value):
            histogram.observe(value)


def stage_finished(stage: str, duration_s: float) -> None:
    STAGE_SECONDS.labels(stage=label_word(stage)).observe(duration_s)


def delivery_outcome(attempts: list[dict[str, Any]]) -> str:
    """delivered, refused (the receiver said 4xx) or failed (errors until the attempts ran out)."""
    last = attempts[-1] if attempts else {}
    code = last.get("status_code")
    if isinstance(code, int) and 200 <= code < 300:
        return "delivered"
    if isinstance(code, int) and 400 <= code < 500 and code not in (408, 429):
        return "refused"
    return "failed"


def webhooks_delivered(attempts: Iterable[dict[str, Any]]) -> None:
    """Count each delivery (a delivery id's attempts) by how it ended."""
    by_delivery: dict[str, list[dict[str, Any]]] = {}
    for attempt in attempts:
        by_delivery.setdefault(str(attempt.get("delivery_id")), []).append(attempt)
    for tries in by_delivery.values():
        WEBHOOKS.labels(outcome=delivery_outcome(tries)).inc()


def swept(sweep: str, count: int) -> None:
    SWEPT.labels(sweep=label_word(sweep)).inc(count)


def restored(by: str, count: int) -> None:
    RESTORED.labels(by=label_word(by)).inc(count)
