"""A worker node SIGKILLed by PID mid-job: restarted, its reconcile ends the job at start-up; not
restarted, the stuck sweep ends it once the node's heartbeat is older than SANDBOX_NODE_DEAD_AFTER.
Either way the job ends exactly once, its command never runs twice, and nothing stays on the host."""
from __future__ import annotations

import json
import re

import requests

from sandbox.nodes import node_queue
from tasks.transport import held
from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean, sandbox_dirs
from tests.support.jobs import lines_of, normal_job_succeeds, record_of, wait_terminal

SLOW = "python3 -c \"import time; print('started', flush=True); time.sleep(20); print('finished', flush=True)\""


def submit_slow(fault_client, queue: str) -> tuple[str, object]:
    job_id = new_job_id("f-lost")
    pending = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": SLOW,
                                                                          "timeout": 60})], queue=queue)
    return job_id, pending


def test_a_killed_worker_restarted_under_its_name_ends_the_job_at_start_up(start_worker, fault_client,
                                                                           fault_redis_client, fault_work_dir):
    client = fault_redis_client
    node, queue = "fw-restart@host-r", "faults-restart"
    first = start_worker(node, queue=queue)
    job_id, pending = submit_slow(fault_client, queue)
    wait_for(lambda: lines_of(client, job_id, b"started") == 1, timeout_s=60)

    first.kill_by_pid()
    start_worker(node, queue=queue)  # the same node name: it reconciles before it consumes

    record = wait_terminal(client, job_id)
    assert record["status"] == "error" and record["error"]["code"] == "worker_lost", record
    assert pending.get(timeout=30)["status"] == "error"  # the submitter is told, not left waiting
    assert [t["status"] for t in record["timeline"]].count("error") == 1
    assert lines_of(client, job_id, b"started") == 1 and lines_of(client, job_id, b"finished") == 0
    assert_host_clean(fault_work_dir)
    normal_job_succeeds(fault_client, queue=queue)


def test_a_killed_worker_that_never_returns_has_its_job_ended_by_the_stuck_sweep(start_worker, fault_client,
                                                                                 fault_redis_client, fault_work_dir):
    client = fault_redis_client
    doomed = start_worker("fw-doomed@host-d", queue="faults-doomed")
    survivor = start_worker("fw-survivor@host-s", queue="faults-survivor")
    job_id, pending = submit_slow(fault_client, "faults-doomed")
    wait_for(lambda: lines_of(client, job_id, b"started") == 1, timeout_s=60)

    doomed.kill_by_pid()

    def swept() -> dict | None:
        # what beat does every SANDBOX_STUCK_SWEEP_INTERVAL, sent here to the surviving node
        fault_client.send_task("sandbox.sweep_stuck", queue="faults-survivor").get(timeout=30)
        record = record_of(client, job_id)
        return record if record.get("finished_at") else None

    record = wait_for(swept, timeout_s=60, interval_s=0.5)
    assert record["status"] == "error" and record["error"]["code"] == "worker_lost", record
    assert "fw-doomed@host-d" in record["error"]["message"]
    assert pending.get(timeout=30)["status"] == "error"
    assert lines_of(client, job_id, b"started") == 1 and lines_of(client, job_id, b"finished") == 0
    last = json.loads(client.get("sandbox:sweep:stuck:last"))
    assert last["node"] == survivor.node
    # the sandbox of the dead node is on this host's work dir: the survivor's orphan sweep takes it
    fault_client.send_task("sandbox.sweep_node", queue="faults-survivor")  # (its result is not stored)
    wait_for(lambda: not sandbox_dirs(fault_work_dir), timeout_s=30)
    assert_host_clean(fault_work_dir)
    normal_job_succeeds(fault_client, queue="faults-survivor")



QUICK = "python3 -c \"print('quick ran', flush=True)\""


def unacked_of(client, job_id: str) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(task, holder node) of every unacknowledged message of the job (taken, not finished)."""
    holders = {tag: holder for tag, holder, _ in held(client)}  # (tests/integration/test_unacked_holders.py)
    found = []
    for tag, entry in client.hgetall("unacked").items():
        headers = json.loads(entry)[0].get("headers") or {}
        if job_id in str(headers.get("argsrepr")):
            found.append((headers.get("task"), (holders.get(tag.decode()) or {}).get("node")))
    return found


def create_held_by(client, job_id: str) -> str | None:  # type: ignore[no-untyped-def]
    """The node whose process holds the job's create message unacknowledged."""
    return next((node for task, node in unacked_of(client, job_id) if task == "sandbox.create"), None)


def one_slot_holding_a_create(start_worker, fault_client, client, node: str, queue: str):  # type: ignore[no-untyped-def]
    """A node with one sandbox slot, busy with a slow job, holding the next job's create while it
    waits for admission: (that worker, slow job, its pending result, next job, its pending result)."""
    worker = start_worker(node, queue=queue, SANDBOX_NODE_MAX_SANDBOXES="1")
    slow_id, slow_pending = submit_slow(fault_client, queue)
    wait_for(lambda: lines_of(client, slow_id, b"started") == 1, timeout_s=60)
    next_id = new_job_id("f-held")
    next_pending = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": next_id, "command": QUICK})],
                                          queue=queue)
    wait_for(lambda: create_held_by(client, next_id) == node, timeout_s=30)
    assert record_of(client, next_id)["status"] == "queued"
    return worker, slow_id, slow_pending, next_id, next_pending


def test_a_killed_worker_restarted_gives_back_the_create_it_held_at_start_up(start_worker, fault_client,
                                                                             fault_redis_client, fault_work_dir):
    # What a killed process had taken and not begun used to wait out the visibility timeout (here
    # SANDBOX_MAX_TIMEOUT + 30 min = 40 min): the next job stayed `queued` long after the restart.
    client = fault_redis_client
    node, queue = "fw-held@host-h", "faults-held"
    first, slow_id, slow_pending, next_id, next_pending = one_slot_holding_a_create(
        start_worker, fault_client, client, node, queue)

    first.kill_by_pid()
    second = start_worker(node, queue=queue, SANDBOX_NODE_MAX_SANDBOXES="1")
    metrics = requests.get(f"{second.metrics_url}/metrics", timeout=10).text
    assert re.search(r'^sandbox_messages_restored_total\{by="startup"\} [1-9]', metrics, re.M), metrics

    record = wait_terminal(client, next_id, timeout_s=60)
    assert record["status"] == "succeeded", record
    assert next_pending.get(timeout=30)["status"] == "succeeded"
    assert lines_of(client, next_id, b"quick ran") == 1
    lost = wait_terminal(client, slow_id)
    assert lost["status"] == "error" and lost["error"]["code"] == "worker_lost", lost
    assert slow_pending.get(timeout=30)["status"] == "error"
    assert lines_of(client, slow_id, b"started") == 1 and lines_of(client, slow_id, b"finished") == 0
    # every message the dead process held went back (its slow job's execute too: dropped as ended)
    wait_for(lambda: not unacked_of(client, slow_id) and not unacked_of(client, next_id), timeout_s=30)
    assert_host_clean(fault_work_dir)


def test_a_create_held_by_a_node_that_never_returns_goes_to_another_node(start_worker, fault_client,
                                                                         fault_redis_client, fault_work_dir):
    client = fault_redis_client
    queue = "faults-held-away"
    doomed, slow_id, _, next_id, next_pending = one_slot_holding_a_create(
        start_worker, fault_client, client, "fw-held-doomed@host-hd", queue)
    survivor = start_worker("fw-held-survivor@host-hs", queue=queue)

    doomed.kill_by_pid()

    def swept() -> dict | None:
        fault_client.send_task("sandbox.sweep_stuck", queue=node_queue(survivor.node)).get(timeout=30)
        record = record_of(client, next_id)
        return record if record.get("finished_at") else None

    record = wait_for(swept, timeout_s=60, interval_s=0.5)
    assert record["status"] == "succeeded", record
    assert record["sandbox"]["host"] == survivor.node
    metrics = requests.get(f"{survivor.metrics_url}/metrics", timeout=10).text
    assert re.search(r'^sandbox_messages_restored_total\{by="sweep"\} [1-9]', metrics, re.M), metrics
    assert next_pending.get(timeout=30)["status"] == "succeeded"
    assert lines_of(client, next_id, b"quick ran") == 1
    assert record_of(client, slow_id)["status"] == "error"  # ended by the same sweep, as before
    # the dead node's begun execute stays unacknowledged: routed to its own queue, nobody would take it
    assert [h["queue"] for _, h, current in held(client) if current and h and h["node"] == doomed.node] \
        == [node_queue(doomed.node)]


def test_a_worker_stopped_on_purpose_leaves_no_heartbeat_to_page_for_and_a_killed_one_does(
        start_worker, fault_redis_client):
    # sandbox:nodes:last_beat keeps a dead node's heartbeat age growing (SandboxHeartbeatStale); a
    # warm shutdown removes the node's entry, so a node taken out of service does not page
    from sandbox.nodes import LAST_BEATS_KEY

    client = fault_redis_client
    stopped, killed = start_worker("fw-stopped@host-x"), start_worker("fw-killed@host-y")
    wait_for(lambda: client.hexists(LAST_BEATS_KEY, stopped.node) and client.hexists(LAST_BEATS_KEY, killed.node))
    stopped.stop()  # SIGTERM: Celery's warm shutdown
    killed.kill_by_pid()
    assert not client.hexists(LAST_BEATS_KEY, stopped.node)
    assert client.hexists(LAST_BEATS_KEY, killed.node)
    client.hdel(LAST_BEATS_KEY, killed.node)
