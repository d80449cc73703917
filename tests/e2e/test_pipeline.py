"""End to end: jobs through a real worker process, real Redis, real SeaweedFS and real sandboxes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sandbox.state import ACTIVE_SET
from tests.conftest import new_job_id
from tests.e2e.conftest import sandbox_left

ROOT = Path(__file__).resolve().parents[2]
HELLO = json.loads((ROOT / "examples" / "hello.json").read_text())


def assert_cleaned_up(record: dict, stack_env: dict, redis_client) -> None:
    """Its sandbox (directory or machine) is gone and nothing in Redis claims the job still runs."""
    assert not sandbox_left(record["id"], stack_env), "sandbox left behind"
    assert redis_client.zscore(ACTIVE_SET, record["id"]) is None
    assert record["finished_at"] is not None


def test_hello_job_succeeds_with_outputs_and_logs_in_s3(submit, stack_env, redis_client):
    job = {**HELLO, "id": new_job_id("hello")}
    record = submit(job)

    assert record["status"] == "succeeded", record
    assert record["exit_code"] == 0
    assert [t["status"] for t in record["timeline"]] == [
        "queued", "creating", "preparing", "running", "collecting", "cleaning", "succeeded"]
    [artifact] = record["artifacts"]
    assert artifact["key"] == f"jobs/{job['id']}/output/greeting.txt"
    assert requests.get(artifact["url"], timeout=10).text == "Hello, sandbox!\n"
    logs = {entry["key"].rsplit("/", 1)[1]: entry for entry in record["logs"]}
    assert requests.get(logs["stdout.log"]["url"], timeout=10).text == "Hello, sandbox!\n"
    assert "wrote output/greeting.txt" in requests.get(logs["stderr.log"]["url"], timeout=10).text
    events = requests.get(logs["events.json"]["url"], timeout=10).json()
    assert [t["status"] for t in events["timeline"]][:4] == ["queued", "creating", "preparing", "running"]
    assert set(record["stages"]) == {"create", "prepare", "execute", "collect", "cleanup"}
    assert all(stage["duration_s"] >= 0 for stage in record["stages"].values())
    assert record["resources_used"]["cpu_seconds"] > 0
    assert_cleaned_up(record, stack_env, redis_client)


def test_nonzero_exit_ends_failed_with_its_exit_code(submit, stack_env, redis_client):
    record = submit({"id": new_job_id("fail"), "command": "python3 -c 'import sys; sys.exit(3)'"})
    assert record["status"] == "failed"
    assert record["exit_code"] == 3
    assert_cleaned_up(record, stack_env, redis_client)


def test_timeout_ends_timed_out(submit, stack_env, redis_client):
    record = submit({"id": new_job_id("slow"), "command": "sleep 30", "timeout": 1})
    assert record["status"] == "timed_out"
    assert_cleaned_up(record, stack_env, redis_client)


def test_memory_over_the_limit_ends_oom_killed(submit, stack_env, redis_client):
    alloc = "python3 -c 'b = [bytearray(1 << 20) for _ in range(400)]; print(\"survived\")'"
    record = submit({"id": new_job_id("oom"), "command": alloc, "resources": {"memory": "64Mi"}})
    assert record["status"] == "oom_killed", record
    assert any(e["type"] == "oom" for e in record["security_events"])
    assert_cleaned_up(record, stack_env, redis_client)


def test_rejected_job_names_the_field_and_never_reaches_a_sandbox(submit, stack_env, redis_client):
    job_id = new_job_id("bad")
    record = submit({"id": job_id, "command": "cat /etc/passwd", "resources": {"memory": "lots"}})
    assert record["status"] == "rejected"
    assert record["error"]["field"] == "/resources/memory"
    assert record["stages"] == {} and record["sandbox"] is None
    assert json.loads(redis_client.get(f"sandbox:job:{job_id}"))["status"] == "rejected"
    assert redis_client.get(f"sandbox:job:{job_id}:spec") is None
    assert_cleaned_up(record, stack_env, redis_client)


def test_missing_r2_input_fails_prepare_and_still_destroys_the_sandbox(submit, stack_env, redis_client):
    job_id = new_job_id("noinput")
    record = submit({"id": job_id, "command": "cat data.txt",
                     "files": [{"path": "data.txt", "r2_key": f"jobs/{job_id}/input/missing.txt"}]})
    assert record["status"] == "error"
    assert record["error"]["stage"] == "prepare"
    assert "missing.txt" in record["error"]["message"]
    assert "execute" not in record["stages"]
    assert_cleaned_up(record, stack_env, redis_client)


def test_r2_input_is_streamed_into_the_workspace(submit, s3, stack_env, redis_client):
    job_id = new_job_id("r2in")
    s3.client().put_object(Bucket=s3.bucket, Key=f"jobs/{job_id}/input/data.txt", Body=b"from r2\n")
    record = submit({"id": job_id, "command": "cat data.txt",
                     "files": [{"path": "data.txt", "r2_key": f"jobs/{job_id}/input/data.txt"}]})
    assert record["status"] == "succeeded", record
    stdout = next(e for e in record["logs"] if e["key"].endswith("stdout.log"))
    assert requests.get(stdout["url"], timeout=10).content == b"from r2\n"


def test_an_empty_log_is_in_the_record_as_empty_and_never_stored(submit, s3, stack_env, redis_client):
    # Given a job that writes stdout and nothing on stderr (both runtimes: on fly the logs are streams)
    record = submit({"id": new_job_id("quiet"), "command": "python3 -c 'print(1)'"})
    assert record["status"] == "succeeded", record
    logs = {entry["key"].rsplit("/", 1)[1]: entry for entry in record["logs"]}
    assert list(logs) == ["stdout.log", "stderr.log", "events.json"]  # every log named, in order
    # Then stderr says it is empty, with no URL to fetch, and no object was written for it
    assert logs["stderr.log"] == {"key": f"jobs/{record['id']}/logs/stderr.log", "size": 0, "url": None}
    stored = {o["Key"] for o in s3.client().list_objects_v2(
        Bucket=s3.bucket, Prefix=f"jobs/{record['id']}/logs/").get("Contents", [])}
    assert f"jobs/{record['id']}/logs/stderr.log" not in stored
    assert f"jobs/{record['id']}/logs/stdout.log" in stored
    assert requests.get(logs["stdout.log"]["url"], timeout=10).content == b"1\n"
    assert logs["stdout.log"]["size"] == 2


def test_same_job_id_submitted_twice_runs_once(submit, celery_client, redis_client):
    job = {"id": new_job_id("twice"), "command": "python3 -c 'print(1)'"}
    first = submit(job)
    second = submit(job)
    assert first["status"] == second["status"] == "succeeded"
    assert second["stages"]["execute"]["attempts"] == 1
    assert second["stages"]["execute"]["started_at"] == first["stages"]["execute"]["started_at"]


def test_cli_submit_wait_prints_the_record_and_exits_by_status(worker, stack_env, tmp_path):
    env = {**os.environ, **stack_env}
    ok = subprocess.run([sys.executable, "-m", "sandbox", "submit", str(ROOT / "examples" / "hello.json"), "--wait",
                         "--timeout", "120"], cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert ok.returncode == 0, ok.stderr.decode()
    assert json.loads(ok.stdout)["status"] == "succeeded"
    assert b"status: running" in ok.stderr and b"Hello, sandbox!" in ok.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"command": "python3 -c 'raise SystemExit(2)'"}))
    failed = subprocess.run([sys.executable, "-m", "sandbox", "submit", str(bad), "--wait", "--timeout", "120"],
                            cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["status"] == "failed"


@pytest.mark.runtimes("local")
def test_cli_submit_refuses_a_duplicate_key_that_validate_refuses_in_a_file_without_an_id(worker, stack_env, tmp_path):
    # Without an id the CLI adds one; it must not re-serialise the file on the way (json.loads
    # keeps the last "command", and that job ran).
    job = tmp_path / "dup.json"
    job.write_bytes(b'{"command": "python3 -c \'raise SystemExit(5)\'", "command": "ls"}')
    env = {**os.environ, **stack_env}
    checked = subprocess.run([sys.executable, "-m", "sandbox", "validate", str(job)], cwd=ROOT, env=env,
                             capture_output=True, timeout=60)
    assert checked.returncode == 2 and json.loads(checked.stdout)["error"]["rule"] == "duplicate_key"
    done = subprocess.run([sys.executable, "-m", "sandbox", "submit", str(job), "--wait", "--timeout", "120"],
                          cwd=ROOT, env=env, capture_output=True, timeout=180)
    record = json.loads(done.stdout)
    assert done.returncode == 2, (record, done.stderr.decode())
    assert record["status"] == "rejected" and record["error"]["rule"] == "duplicate_key", record
    assert record["error"]["field"] == "/command"


def test_hostile_output_names_are_skipped_with_a_reason_and_the_rest_is_kept(submit):
    code = ("import os; os.makedirs('output'); open('output/ok.txt','w').write('fine'); "
            "open('output/bad\\x01name','w').write('x'); os.symlink('/etc/passwd','output/link')")
    record = submit({"id": new_job_id("names"), "command": f'python3 -c "{code}"'})
    assert record["status"] == "succeeded", record
    assert [a["path"] for a in record["artifacts"]] == ["output/ok.txt"]
    reasons = {s["path"]: s["reason"] for s in record["skipped_outputs"]}
    assert any("bad" in path for path in reasons) and any("link" in path for path in reasons), reasons


def test_outbound_request_without_operator_hosts_is_rejected_by_name(celery_client, worker, stack_env, tmp_path):
    # The session's worker allows no hosts, so this is rejected by name; an accepted outbound job's
    # network_unavailable note is checked in tests/integration/test_submit.py.
    record = celery_client.send_task("sandbox.submit", args=[json.dumps(
        {"id": new_job_id("net"), "command": "ls", "network": {"outbound": True}})]).get(timeout=60)
    assert record["status"] == "rejected" and record["error"]["field"].startswith("/network")
