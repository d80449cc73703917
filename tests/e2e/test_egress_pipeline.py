"""Outbound jobs through sandbox.submit on a real worker (threads pool): curl and Python requests reach
an allowed upstream with no job-side configuration, everything else is refused, and the final record
carries the connection log."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from celery import Celery

from tests.conftest import new_job_id
from tests.support.egress import upstream  # noqa: F401 (fixture)
from tests.support.netns import HOSTS, Upstream
from tests.support.services import Worker

QUEUE = "sandbox.egress-e2e"  # a queue of its own: the session's worker has no egress settings


@pytest.fixture(scope="module")
def egress_worker(stack_env: dict[str, str], celery_client: Celery, session_dir: Path,
                  upstream: Upstream) -> Iterator[Worker]:
    env = {**stack_env, "SANDBOX_ALLOWED_HOSTS": ",".join(HOSTS), "SANDBOX_EGRESS_HOSTS": upstream.host_map(),
           "SANDBOX_EGRESS_ALLOW_CIDRS": upstream.cidr}
    proc = Worker(env, node="egress@host-e", log_path=session_dir / "worker-egress.log", queue=QUEUE)
    proc.extra_args = ["--pool=threads"]
    proc.start(celery_client)
    yield proc
    proc.stop()


def _submit(celery_client: Celery, worker: Worker, job: dict[str, Any]) -> dict[str, Any]:
    result = celery_client.send_task("sandbox.submit", args=[json.dumps(job)], queue=QUEUE)
    try:
        return result.get(timeout=120)
    except Exception:
        print(worker.tail(80))
        raise


def _job(upstream: Upstream, command: str, **network: Any) -> dict[str, Any]:
    return {"id": new_job_id("egress"), "command": command, "timeout": 60,
            "network": {"outbound": True, **network},
            "environment": {"CURL_CA_BUNDLE": "/workspace/ca.pem", "REQUESTS_CA_BUNDLE": "/workspace/ca.pem"},
            "files": [{"path": "ca.pem", "content": upstream.ca_pem.decode()}]}


def test_curl_through_submit_fetches_the_allowed_host_and_the_record_logs_each_connection(
        celery_client: Celery, egress_worker: Worker, upstream: Upstream, redis_client: Any) -> None:
    job = _job(upstream, "curl -sS https://api.test/hello https://other.test/hello", allowed_hosts=["api.test"])
    record = _submit(celery_client, egress_worker, job)
    assert record["status"] == "failed"  # curl's second URL was refused, so curl exits non-zero
    net = record["network"]
    by_host = {e["host"]: e for e in net["connections"]}
    assert by_host["api.test"]["verdict"] == "allowed" and by_host["api.test"]["bytes_down"] > 0
    assert by_host["api.test"]["address"] == upstream.address and by_host["api.test"]["sni"] == "api.test"
    assert (by_host["other.test"]["verdict"], by_host["other.test"]["reason"]) == ("refused", "host_not_allowed")
    assert net["totals"]["connections"] == 2 and net["totals"]["refused"] == 1
    assert any(e["type"] == "egress_refused" for e in record["security_events"])
    stream = redis_client.xrange(f"sandbox:job:{job['id']}:events")
    live = [json.loads(fields[b"event"]) for _, fields in stream]
    network = [e for e in live if e.get("kind") == "network"]
    assert len(network) == 2 and {e["host"] for e in network} == {"api.test", "other.test"}  # live, per connection


def test_python_requests_through_submit_works_with_no_job_side_configuration(
        celery_client: Celery, egress_worker: Worker, upstream: Upstream) -> None:
    script = ("import requests\n"
              "r = requests.get('https://files.test/bytes/12345', timeout=20)\n"
              "print(r.status_code, len(r.content))\n")
    job = _job(upstream, "python3 fetch.py", allowed_hosts=["files.test"])
    job["files"].append({"path": "fetch.py", "content": script})
    record = _submit(celery_client, egress_worker, job)
    assert record["status"] == "succeeded", record.get("error")
    (entry,) = record["network"]["connections"]
    assert (entry["host"], entry["port"], entry["verdict"]) == ("files.test", 443, "allowed")
    assert entry["bytes_down"] > 12345


def test_a_setup_command_fetches_while_preparing_and_the_command_runs_without_network(
        celery_client: Celery, egress_worker: Worker, upstream: Upstream) -> None:
    job = _job(upstream, "cat dep.txt")
    del job["network"]  # the command itself: no network
    job["setup"] = {"command": "curl -sS -o dep.txt https://files.test/hello", "timeout": 30,
                    "network": {"outbound": True, "allowed_hosts": ["files.test"]}}
    record = _submit(celery_client, egress_worker, job)
    assert record["status"] == "succeeded", record.get("error")
    assert record["network"] is None
    (entry,) = record["setup"]["network"]["connections"]
    assert (entry["host"], entry["verdict"]) == ("files.test", "allowed")
    assert {log["key"].rsplit("/", 1)[1] for log in record["logs"]} >= {"stdout.log", "setup-stdout.log"}

    failing = _job(upstream, "cat dep.txt")
    del failing["network"]
    failing["setup"] = {"command": "curl -sS -f -o dep.txt https://other.test/hello",
                        "network": {"outbound": True, "allowed_hosts": ["files.test"]}}
    record = _submit(celery_client, egress_worker, failing)
    assert record["status"] == "failed" and record["error"]["code"] == "setup"
    assert record["setup"]["network"]["connections"][0]["reason"] == "host_not_allowed"
    (stdout,) = [log for log in record["logs"] if log["key"].endswith("/stdout.log")]
    assert stdout["size"] == 0  # the command never ran after its setup failed
