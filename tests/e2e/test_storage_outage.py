"""S3 down while a job collects: the stage retries with backoff and, once S3 is back, nothing is lost."""
from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import new_job_id, wait_for
from tests.support.jobs import record_of

pytestmark = pytest.mark.runtimes("local")  # nothing here depends on the runtime


def test_collect_retries_through_an_s3_outage_and_loses_no_output(celery_client, worker, s3, redis_client):
    job_id = new_job_id("outage")
    job = {"id": job_id, "command": "python3 -c \"import os; os.makedirs('output'); open('output/r.txt','w').write('kept')\""}
    s3.stop()
    try:
        pending = celery_client.send_task("sandbox.submit", args=[json.dumps(job)])
        wait_for(lambda: record_of(redis_client, job_id).get("stages", {}).get("collect", {}).get("attempts", 0) >= 1, timeout_s=60)
    finally:
        s3.start()
    final = pending.get(timeout=180)

    # botocore's own retries or the stage's Celery retries (whichever the outage's length needs)
    # carry the upload through; either way the job ends succeeded with every output.
    assert final["status"] == "succeeded", final
    [artifact] = final["artifacts"]
    assert requests.get(artifact["url"], timeout=10).text == "kept"

