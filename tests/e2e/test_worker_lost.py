"""A worker killed outright during execute: the job is not lost and its command never runs twice."""
from __future__ import annotations

import json
import time

from kombu import Connection

from tests.conftest import new_job_id, wait_for
from tests.e2e.conftest import sandbox_left
from tests.support.jobs import record_of
from tests.support.services import Worker

NODE = "w-lost@host-c"
QUEUE = "sandbox-lost-test"  # its own intake, so the session's worker never takes this job


def restore_unacked_now(redis_url: str) -> None:
    """What a worker's restore sweep does once the visibility timeout has passed, without the wait.

    The real timeout must exceed the longest stage (over 16 minutes); a channel whose visibility
    timeout is 1 s runs the very same kombu restore on messages unacknowledged for over 1 s.
    """
    with Connection(redis_url, transport_options={"visibility_timeout": 1}) as conn:
        time.sleep(1.5)
        conn.default_channel.qos.restore_visible(num=1000)


def test_killed_worker_mid_execute_ends_error_without_rerunning(celery_client, stack_env, session_dir,
                                                                 redis_client, redis_url):
    first = Worker(stack_env, node=NODE, log_path=session_dir / "worker-lost-1.log", queue=QUEUE)
    first.start(celery_client)
    job_id = new_job_id("lost")
    job = {"id": job_id, "timeout": 10, "command": "python3 -c \"import time; print('started', flush=True); time.sleep(8)\""}
    celery_client.send_task("sandbox.submit", args=[json.dumps(job)], queue=QUEUE)
    wait_for(lambda: redis_client.xlen(f"sandbox:job:{job_id}:logs") >= 1, timeout_s=60)
    first.kill()  # SIGKILL to the whole worker: no errback, no cleanup, the execute message stays unacked
    restore_unacked_now(redis_url)

    second = Worker(stack_env, node=NODE, log_path=session_dir / "worker-lost-2.log", queue=QUEUE)
    second.start(celery_client)
    try:
        record = wait_for(lambda: (r := record_of(redis_client, job_id)).get("finished_at") and r, timeout_s=300)
    finally:
        second.stop()

    assert record["status"] == "error", record
    # the restarted node's reconcile ends it at start-up (before, only the redelivered execute did)
    assert record["error"]["code"] == "worker_lost" and "not run again" in record["error"]["message"]
    started = [e for _, e in redis_client.xrange(f"sandbox:job:{job_id}:logs") if b"started" in e.get(b"line", b"")]
    assert len(started) == 1  # the redelivered execute did not start the command again
    assert not sandbox_left(job_id, stack_env), "the sandbox was not destroyed"
