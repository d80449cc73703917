"""Operations, end to end: a real worker (threads pool) runs a job of every ending; its /metrics moved by
exactly what those jobs did, every log line it wrote meanwhile is JSON with the right job id, and
Flower's task list says which job each stage belongs to and how the job ended."""
from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from sandbox.storage import ArtifactStore
from tests.conftest import new_job_id, wait_for
from tests.support.hooks import HookReceiver
from tests.support.jobs import record_of
from tests.support.services import Worker

QUEUE = "sandbox.obs"  # this worker's own intake: the session's worker must not take these jobs
ALLOC = "import sys\nb = []\nfor _ in range(400):\n    b.append(bytearray(1 << 20))\n"


@pytest.fixture(scope="module")
def obs_worker(stack_env: dict[str, str], celery_client: Any, session_dir: Path) -> Iterator[Worker]:
    proc = Worker({**stack_env, "SANDBOX_LOG_FORMAT": "json"}, node="obs@host-o",
                  log_path=session_dir / "worker-obs.log", concurrency=8, queue=QUEUE)
    proc.extra_args = ["--pool=threads"]  # decision 1: one process per node, so one registry
    proc.start(celery_client)
    yield proc
    proc.stop()


def scrape(worker: Worker) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{worker.metrics_url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def run_every_ending(celery_client: Any, redis_client: Any, hook_url: str) -> dict[str, dict]:
    """One job per terminal status (and one with a webhook); returns status -> final record."""
    def send(job: dict) -> Any:
        return celery_client.send_task("sandbox.submit", args=[json.dumps(job)], queue=QUEUE)

    ids = {s: new_job_id(s.replace("_", "")) for s in
           ("succeeded", "failed", "timed_out", "oom_killed", "cancelled", "rejected", "error", "hook")}
    pending = {
        "succeeded": send({"id": ids["succeeded"], "command": "python3 -c 'print(1)'"}),
        "failed": send({"id": ids["failed"], "command": "python3 -c 'import sys; sys.exit(3)'"}),
        "timed_out": send({"id": ids["timed_out"], "command": "sleep 30", "timeout": 1}),
        "oom_killed": send({"id": ids["oom_killed"], "command": "python3 alloc.py",
                            "resources": {"memory": "64Mi"}, "files": [{"path": "alloc.py", "content": ALLOC}]}),
        "cancelled": send({"id": ids["cancelled"], "command": "sleep 60", "timeout": 120}),
        "rejected": send({"id": ids["rejected"], "command": "ls", "resources": {"memory": "lots"}}),
        "error": send({"id": ids["error"], "command": "cat data.txt", "files": [
            {"path": "data.txt", "r2_key": f"jobs/{ids['error']}/input/missing.txt"}]}),
        "hook": send({"id": ids["hook"], "command": "ls", "callback_url": hook_url}),
    }
    wait_for(lambda: record_of(redis_client, ids["cancelled"]).get("status") == "running")
    # a rejection naming a running job's id is counted, and must not take that job's count
    pending["rejected_same_id"] = send({"id": ids["cancelled"], "command": "ls", "resources": {"memory": "lots"}})
    pending["rejected_same_id"].get(timeout=60)
    celery_client.send_task("sandbox.cancel", args=[ids["cancelled"]], queue=QUEUE).get(timeout=30)
    return {status: result.get(timeout=120) for status, result in pending.items()}


@pytest.fixture(scope="module")
def mixed_run(obs_worker: Worker, celery_client: Any, redis_url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    with HookReceiver() as hook:
        before = scrape(obs_worker)
        log_start = obs_worker.log_path.stat().st_size
        records = run_every_ending(celery_client, client, hook.url)
        # The job's own notify goes to the shared `sandbox` queue (any worker may deliver it); this one
        # is sent to this worker, so its delivery is counted here.
        celery_client.send_task("sandbox.notify", args=[records["hook"]["id"]], queue=QUEUE).get(timeout=60)
        wait_for(lambda: hook.posts, timeout_s=60)
        wait_for(lambda: moved(before, scrape(obs_worker), "sandbox_webhook_deliveries_total",
                               outcome="delivered") == 1, timeout_s=30)
        after = scrape(obs_worker)
    lines = obs_worker.log_path.read_bytes()[log_start:].decode("utf-8", "replace").splitlines()
    return {"before": before, "after": after, "records": records, "lines": lines}


def test_every_ending_reaches_its_status(mixed_run):
    assert {s: r["status"] for s, r in mixed_run["records"].items()} == {
        "succeeded": "succeeded", "failed": "failed", "timed_out": "timed_out", "oom_killed": "oom_killed",
        "cancelled": "cancelled", "rejected": "rejected", "error": "error", "hook": "succeeded",
        "rejected_same_id": "rejected"}


def test_counters_moved_by_exactly_the_jobs_that_ran(mixed_run, runtime_name):
    before, after, records = mixed_run["before"], mixed_run["after"], mixed_run["records"]
    jobs = "sandbox_jobs_total"
    for status, expected in (("succeeded", 2), ("failed", 1), ("timed_out", 1), ("oom_killed", 1),
                             ("cancelled", 1), ("rejected", 2), ("error", 1)):
        assert moved(before, after, jobs, status=status, runtime=runtime_name) == expected, status
    assert moved(before, after, "sandbox_rejections_total", field="/resources/memory",
                 rule=records["rejected"]["error"]["rule"]) == 2
    assert moved(before, after, "sandbox_stage_failures_total", stage="prepare") == 1
    for kind, expected in (("timeout", 1), ("oom", 1), ("rejected", 2)):
        assert moved(before, after, "sandbox_security_events_total", type=kind) == expected, kind
    assert moved(before, after, "sandbox_webhook_deliveries_total", outcome="delivered") == 1


def test_histograms_observed_each_job_once(mixed_run):
    before, after, records = mixed_run["before"], mixed_run["after"], mixed_run["records"]
    ran = [r for r in records.values() if r["status"] != "rejected"]
    for stage in ("create", "prepare", "execute", "collect", "cleanup"):
        # every stage task runs for every job that got past submit (later ones skip, but run)
        assert moved(before, after, "sandbox_stage_duration_seconds_count", stage=stage) == len(ran), stage
    for status in ("succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error"):
        expected = sum(1 for r in ran if r["status"] == status)
        assert moved(before, after, "sandbox_job_duration_seconds_count", status=status) == expected
    assert moved(before, after, "sandbox_queue_wait_seconds_count") == len(ran)
    measured = [r for r in ran if "cpu_seconds" in r["resources_used"]]
    assert len(measured) >= 5  # everything that executed
    assert moved(before, after, "sandbox_job_cpu_seconds_count") == len(measured)
    assert moved(before, after, "sandbox_job_memory_peak_bytes_count") == len(measured)
    oom_peak = records["oom_killed"]["resources_used"]["memory_peak_bytes"]
    assert moved(before, after, "sandbox_job_memory_peak_bytes_sum") == pytest.approx(
        sum(r["resources_used"]["memory_peak_bytes"] for r in measured))
    assert 32 * 2**20 < oom_peak <= 64 * 2**20
    # a 10 ms bucket exists and the 1 h one holds everything
    assert ("sandbox_stage_duration_seconds_bucket", (("le", "0.01"), ("stage", "create"))) in after


def test_gauges_sampled_from_redis_at_scrape_time(obs_worker, redis_client):
    redis_client.lpush("sandbox.dead", json.dumps({"at": 1, "queue": "x", "reason": "test setup"}))
    try:
        after = scrape(obs_worker)
        assert after[("sandbox_redis_up", ())] == 1
        assert after[("sandbox_dead_letters", ())] >= 1
        assert ("sandbox_queue_messages", (("queue", QUEUE),)) in after
        assert ("sandbox_queue_messages", (("queue", "sandbox.node.obs@host-o"),)) in after
        assert after[("sandbox_redis_aof_enabled", ())] == 1  # the test Redis runs with AOF, as production's must
        assert after[("sandbox_live_sandboxes", (("node", "obs@host-o"),))] == 0
    finally:
        redis_client.lrem("sandbox.dead", 1, json.dumps({"at": 1, "queue": "x", "reason": "test setup"}))


def test_healthz_answers_while_the_worker_consumes(obs_worker):
    answer = requests.get(f"{obs_worker.metrics_url}/healthz", timeout=5)
    assert answer.status_code == 200 and answer.json()["node"] == "obs@host-o"


def test_every_log_line_is_json_and_stage_lines_carry_their_job(mixed_run):
    lines, records = mixed_run["lines"], mixed_run["records"]
    assert len(lines) > 50
    parsed = [json.loads(line) for line in lines]  # raises on the first line that is not JSON
    assert all({"time", "level", "logger", "message", "node"} <= set(p) for p in parsed)
    ids = {r["id"] for r in records.values()}
    by_task: dict[str, set] = defaultdict(set)
    for p in parsed:
        if p.get("stage"):
            assert p.get("job_id") in ids, p
            by_task[p["task_id"]].add(p["job_id"])
        key = p.get("key") or ""
        if p.get("audit") and key.startswith("jobs/"):
            assert p["job_id"] == key.split("/")[1], p  # the context and the event name the same job
    assert by_task and all(len(jobs) == 1 for jobs in by_task.values())
    stage_jobs = {j for jobs in by_task.values() for j in jobs}
    assert stage_jobs == ids - {records["rejected"]["id"]}  # (rejected_same_id shares the cancelled job's id)
    audits = [p for p in parsed if p.get("audit")]
    assert {"reject", "put", "security_event", "cancel"} <= {p.get("op") for p in audits}


def test_audit_trail_is_uploaded_beside_the_jobs_logs(mixed_run, stack_env):
    record = mixed_run["records"]["oom_killed"]
    store = ArtifactStore(load_settings(stack_env), actor="test")
    body = io.BytesIO()
    store.client.download_fileobj(store.bucket, f"jobs/{record['id']}/logs/audit.jsonl", body)
    lines = [json.loads(line) for line in body.getvalue().decode().splitlines()]
    assert all(line["audit"] is True and line["job_id"] == record["id"] for line in lines)
    assert any(line.get("op") == "security_event" and line.get("type") == "oom" for line in lines)
    # (its stdout and stderr are empty, so never stored: events.json is the put every job makes)
    assert any(line.get("op") == "put" and line["key"].endswith("events.json") for line in lines)


def test_the_trail_of_a_job_without_security_events_is_whole(mixed_run, stack_env):
    # (its count's claim and the trail's read share a round trip: the read must still see every line)
    record = mixed_run["records"]["succeeded"]
    assert not record.get("security_events")
    store = ArtifactStore(load_settings(stack_env), actor="test")
    body = io.BytesIO()
    store.client.download_fileobj(store.bucket, f"jobs/{record['id']}/logs/audit.jsonl", body)
    lines = [json.loads(line) for line in body.getvalue().decode().splitlines()]
    stored = {line["key"].rsplit("/", 1)[-1] for line in lines if line.get("op") == "put"}
    assert {"stdout.log", "events.json"} <= stored, lines
    assert all(line["job_id"] == record["id"] for line in lines)


def test_one_celery_line_per_task_with_its_job_and_no_received_lines(mixed_run, stack_env):
    parsed = [json.loads(line) for line in mixed_run["lines"]]
    # "Task … received" is off at INFO (Flower's task-received event says it); the outcome line stays
    assert not [p for p in parsed if p["logger"] == "celery.worker.strategy" and p["level"] == "INFO"]
    job_id = mixed_run["records"]["succeeded"]["id"]
    ended = {p["stage"]: p for p in parsed if p["logger"] == "celery.app.trace" and p.get("job_id") == job_id and p.get("stage")
             and " succeeded in " in p["message"]}
    # a local node admitting the job at once builds it inside submit: no create task, so no create line
    tasks = {"prepare", "execute", "collect", "cleanup"} | ({"create"} if stack_env.get("SANDBOX_RUNTIME") == "fly" else set())
    assert set(ended) == tasks
    assert all(p["node"] == "obs@host-o" and p["task_id"] in p["message"] for p in ended.values())


def test_flower_says_which_job_each_stage_is_for_and_how_it_ended(obs_worker, celery_client, stack_env,
                                                                   session_dir):
    from tests.e2e.test_operations import start_flower

    # a local node admitting the job at once builds it inside submit: no create task, no create row
    stages = ("sandbox.prepare", "sandbox.execute", "sandbox.collect", "sandbox.cleanup")
    if stack_env.get("SANDBOX_RUNTIME") == "fly":
        stages = ("sandbox.create", *stages)
    with start_flower(stack_env, session_dir / "flower-obs.db") as (base, auth):
        # Flower knows a worker only from its events: once it lists ours, it hears every task event
        wait_for(lambda: obs_worker.node in requests.get(f"{base}/api/workers?refresh=1", auth=auth, timeout=10).json())
        ok_id, bad_id = new_job_id("flowerok"), new_job_id("flowerbad")
        for job in ({"id": ok_id, "command": "ls"}, {"id": bad_id, "command": "python3 -c 'raise SystemExit(3)'",
                                                     "environment": {"API_TOKEN": "never-shown"}}):
            celery_client.send_task("sandbox.submit", args=[json.dumps(job)], queue=QUEUE).get(timeout=60)

        def rows(job_id: str) -> dict:
            found = requests.get(f"{base}/api/tasks", params={"search": job_id}, auth=auth, timeout=10).json()
            done = [t for t in found.values() if t["name"] == "sandbox.cleanup" and t["state"] == "SUCCESS"]
            return found if done and len(found) >= len(stages) else {}

        bad = {t["name"]: t for t in wait_for(lambda: rows(bad_id), timeout_s=30).values()}
        ok = {t["name"]: t for t in wait_for(lambda: rows(ok_id), timeout_s=30).values()}
    # submit's row becomes cleanup's: the chain's last task takes the submit task's id (Celery's replace)
    assert set(bad) == set(stages)
    assert all(bad[name]["state"] == "SUCCESS" for name in stages)  # a failing program is data, not a failure
    assert {name: bad[name]["args"] for name in stages} == {name: f"job={bad_id}" for name in stages}
    assert bad["sandbox.cleanup"]["result"] == f"job={bad_id} status=failed exit=3 reason='exited with status 3'"
    assert ok["sandbox.cleanup"]["result"] == f"job={ok_id} status=succeeded exit=0"
    assert not any("never-shown" in json.dumps(t) for t in bad.values())  # env never reaches Flower


def test_a_job_cancelled_before_its_submit_ran_is_counted_once(obs_worker, celery_client) -> None:  # type: ignore[no-untyped-def]
    # Its submit returns the terminal record and no cleanup ever runs: it was never counted.
    job_id = new_job_id("precancel")
    answer = celery_client.send_task("sandbox.cancel", args=[job_id], queue=QUEUE).get(timeout=30)
    assert answer["cancelled"] is False and "submitted later" in answer["message"], answer
    before = scrape(obs_worker)
    record = celery_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": "ls"})],
                                     queue=QUEUE).get(timeout=60)
    assert record["status"] == "cancelled", record

    def counted() -> float:
        after = scrape(obs_worker)
        return sum(moved(before, after, "sandbox_jobs_total", status="cancelled", runtime=r) for r in ("local", "fly"))

    wait_for(lambda: counted() >= 1, timeout_s=30)  # (the hook runs after the result is stored)
    assert counted() == 1
