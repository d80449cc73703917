"""Metrics labels stay bounded under hostile input; log lines carry their context; settings are checked."""
from __future__ import annotations

import io
import json
import logging

import pytest

from config.settings import load_settings
from sandbox.errors import ConfigError
from sandbox.observability import logging as obs_logging
from sandbox.observability import metrics
from sandbox.observability.metrics import delivery_outcome, field_label, label_word


@pytest.mark.parametrize("pointer, label", [
    ("/environment/LD_PRELOAD", "/environment/*"),   # a job-chosen name never becomes a label value
    ("/files/17/path", "/files/*/path"),
    ("/files/3/\u202eevil", "/files/*/*"),
    ("/resources/memory", "/resources/memory"),
    ("/no/such/field/at/all", "/*"),
    ("", "/"),
    (None, "/"),
])
def test_rejected_field_labels_are_bounded(pointer, label):
    assert field_label(pointer) == label


@pytest.mark.parametrize("value, label", [("oom", "oom"), ("a b", "other"), ("x" * 41, "other"), (3, "other"),
                                          ("timed_out", "timed_out")])
def test_label_words_refuse_free_text(value, label):
    assert label_word(value) == label


def test_webhook_outcome_is_the_last_attempts():
    assert delivery_outcome([{"status_code": 500}, {"status_code": 204}]) == "delivered"
    assert delivery_outcome([{"status_code": 410}]) == "refused"
    assert delivery_outcome([{"status_code": 429}, {"status_code": None, "error": "timeout"}]) == "failed"
    assert delivery_outcome([]) == "failed"


def test_a_terminal_record_moves_each_metric_by_its_own_amount():
    def total(histogram):
        return histogram._sum.get()

    jobs = metrics.JOBS.labels(status="failed", runtime="local")._value.get()
    egress, cpu = total(metrics.EGRESS_BYTES), total(metrics.CPU_SECONDS)
    metrics.job_finished({"id": "j", "status": "failed", "created_at": 10.0, "finished_at": 12.5,
                          "stages": {"create": {"started_at": 10.25}},
                          "resources_used": {"cpu_seconds": 0.5, "memory_peak_bytes": True},  # a bool is no number
                          "security_events": [{"type": "pids_limit"}],
                          "network": {"totals": {"bytes_up": 100, "bytes_down": 900, "connections": 2}}}, "local")
    assert metrics.JOBS.labels(status="failed", runtime="local")._value.get() == jobs + 1
    assert total(metrics.EGRESS_BYTES) == egress + 1000
    assert total(metrics.CPU_SECONDS) == cpu + 0.5


def _capture(log_format: str) -> io.StringIO:
    stream = io.StringIO()
    obs_logging.configure(log_format, logging.INFO, stream=stream)
    obs_logging.set_node("n1@host")
    return stream


def test_json_lines_carry_the_context_and_audit_fields():
    stream = _capture("json")
    with obs_logging.bound(job_id="j-1", stage="execute", task_id="t-1"):
        logging.getLogger("sandbox.lifecycle").warning("limit hit: %s", "memory")
        logging.getLogger("sandbox.audit").info(json.dumps({"op": "put", "job_id": "j-1", "key": "jobs/j-1/x"}))
    logging.getLogger("sandbox.lifecycle").info("outside any task")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "limit hit: memory" and first["level"] == "WARNING"
    assert (first["job_id"], first["stage"], first["task_id"], first["node"]) == ("j-1", "execute", "t-1", "n1@host")
    assert second["audit"] is True and second["op"] == "put" and second["key"] == "jobs/j-1/x"
    assert "job_id" not in third and third["node"] == "n1@host"
    assert first["time"].endswith("Z")


def test_text_format_is_for_a_terminal():
    stream = _capture("text")
    with obs_logging.bound(job_id="j-2", stage="create"):
        logging.getLogger("sandbox.tasks").info("hello")
    assert stream.getvalue().rstrip().endswith("[j-2/create] hello")


def test_bad_log_format_or_metrics_port_stops_start_up_by_name():
    with pytest.raises(ConfigError, match="SANDBOX_LOG_FORMAT"):
        load_settings({"SANDBOX_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="SANDBOX_METRICS_PORT"):
        load_settings({"SANDBOX_METRICS_PORT": "70000"})
    assert load_settings({"SANDBOX_METRICS_PORT": "0"}).metrics_port == 0  # 0: no endpoint


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class _Sweeps:
    """The two things check_beat reads from Redis, as a cluster would return them."""

    def __init__(self, started: dict | None, last: dict) -> None:
        self.started, self.last = started, last

    def beat_started(self) -> dict | None:
        return self.started

    def last_sweeps(self) -> dict:
        return {name: self.last.get(name) for name in ("orphans", "stuck", "artifacts")}


PERIODS = {"orphans": 60.0, "stuck": 15.0, "artifacts": 3600.0}


@pytest.mark.parametrize("started_ago_s, last_ago_s, status, words", [
    (300, {"orphans": 30, "stuck": 5}, "ok", "artifacts not due yet"),  # a 5-minute-old stack
    (3 * 3600, {"orphans": 30, "stuck": 5}, "degraded", "sweep artifacts has not run since beat started"),
    (60, {"orphans": 30, "stuck": 5, "artifacts": 5 * 3600}, "ok", "artifacts 18000 s ago"),  # beat restarted
    (None, {"orphans": 30, "stuck": 5}, "degraded", "no beat start is recorded"),
    (None, {"orphans": 30, "stuck": 5, "artifacts": 600}, "ok", "stuck 5 s ago"),  # a beat older than the key
    (10 * 3600, {"orphans": 30, "stuck": 200, "artifacts": 600}, "degraded", "sweep stuck last ran 200 s ago"),
])
def test_beat_counts_a_sweep_missed_only_a_period_and_grace_after_it_was_due(started_ago_s, last_ago_s, status, words):
    from sandbox.observability.health import check_beat

    now = 10**9
    started = None if started_ago_s is None else {"at": now - started_ago_s, "periods_s": {"stuck": 15}}
    last = {name: {"at": now - ago} for name, ago in last_ago_s.items()}
    check = check_beat(_Sweeps(started, last), now, PERIODS)
    assert check.status == status and words in check.detail, check


def test_beat_sends_exactly_the_sweeps_health_checks_at_the_periods_it_judges_them_by():
    # One list of sweeps (sandbox.nodes): beat's schedule, health's "missed sweep" check and the
    # metrics' last-run gauge cannot disagree about which sweeps exist or how often they run.
    import celeryconfig
    from sandbox import nodes
    from sandbox.observability.cluster import Cluster

    class _Redis:
        def mget(self, keys: list[str]) -> list[None]:
            self.keys = keys
            return [None] * len(keys)

    settings = load_settings({"SANDBOX_ORPHAN_SWEEP_INTERVAL": "42", "SANDBOX_STUCK_SWEEP_INTERVAL": "7"})
    periods = nodes.sweep_periods(settings)
    assert periods == {"orphans": 42.0, "stuck": 7.0, "artifacts": nodes.ARTIFACTS_SWEEP_PERIOD_S}
    assert {e["task"]: e["schedule"] for e in nodes.beat_schedule(settings).values()} == \
        {nodes.sweep_task(name): period for name, period in periods.items()}
    assert {e["task"] for e in celeryconfig.beat_schedule.values()} == {nodes.sweep_task(n) for n in periods}
    assert set(Cluster(_Redis()).last_sweeps()) == set(periods)


def test_celery_reprs_only_the_head_of_what_returns_a_job_record():
    # Celery reprs every return value for its success line and task-succeeded event, where a job
    # record is replaced anyway ("(the job record)", the job's summary): only its head is made.
    from celery.utils.saferepr import saferepr

    import tasks.stages  # noqa: F401 - registers the tasks
    from tasks.app import app
    from tasks.monitoring import RECORD_REPR_CHARS

    record = {"id": "j-1", "status": "succeeded", "logs": {n: {"key": f"jobs/j-1/logs/{n}", "url": "u" * 300}
                                                           for n in ("stdout.log", "stderr.log", "events.json")}}
    for name in ("sandbox.cleanup", "sandbox.submit"):
        size = app.tasks[name].resultrepr_maxsize
        assert size == RECORD_REPR_CHARS and len(saferepr(record, size)) < 2 * RECORD_REPR_CHARS
    assert app.tasks["sandbox.notify"].resultrepr_maxsize == app.tasks["sandbox.collect"].resultrepr_maxsize == 1024


def test_the_node_gauges_show_waiting_creates_only_where_there_is_admission():
    from sandbox.observability.gauges import NodeCollector

    def names(collector: NodeCollector) -> dict[str, list]:
        return {f.name: [(s.labels, s.value) for s in f.samples] for f in collector.collect()}

    with_admission = names(NodeCollector("n@h", lambda: [], lambda: 2))
    assert with_admission["sandbox_admission_waiting_creates"] == [({"node": "n@h"}, 2)]
    assert "sandbox_admission_waiting_creates" not in names(NodeCollector("n@h", lambda: []))  # Fly: none

    def broken() -> int:
        raise RuntimeError("services not built yet")

    # a count that cannot be read leaves the gauge out; the scrape still answers the rest
    assert set(names(NodeCollector("n@h", lambda: [], broken))) == {"sandbox_live_sandboxes",
                                                                    "sandbox_expired_sandboxes"}
