"""Collect never fails because of a job-chosen name or one object: logs first, a refused name is
skipped with its reason, and no loop device or mount survives even a collect that does fail."""
from __future__ import annotations

import json

from tests.conftest import new_job_id
from tests.faults.conftest import assert_host_clean

HOSTILE = r"output/sbx\..\..\win.txt"
WRITER = ("python3 -c \"import os; os.makedirs('output', exist_ok=True); "
          "open(r'" + HOSTILE + "', 'w').write('x'); open('output/ok.txt', 'w').write('ok'); print('done')\"")


def test_a_hostile_output_name_never_fails_collect(start_worker, fault_client, fault_work_dir):
    start_worker("fw-collect@host-o", queue="faults-collect")
    job_id = new_job_id("f-name")
    record = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": WRITER})],
                                    queue="faults-collect").get(timeout=90)
    assert record["status"] == "succeeded", record
    assert {e["key"].rsplit("/", 1)[1] for e in record["logs"]} >= {"stdout.log", "stderr.log"}
    kept = {a["path"] for a in record["artifacts"]}
    skipped = {s["path"]: s["reason"] for s in record["skipped_outputs"]}
    assert "output/ok.txt" in kept
    assert HOSTILE in kept or (HOSTILE in skipped and skipped[HOSTILE]), (kept, skipped)
    print("hostile name:", "uploaded" if HOSTILE in kept else f"skipped: {skipped.get(HOSTILE)}")
    assert_host_clean(fault_work_dir)


def test_no_loop_device_survives_a_collect_that_fails(start_worker, fault_client, fault_work_dir):
    # S3 refuses every write of this worker (wrong secret): collect fails on its first upload
    start_worker("fw-refused@host-q", queue="faults-refused", SANDBOX_CLOUDFLARE_SECRET_KEY="wrong-secret-key")
    job_id = new_job_id("f-refused")
    record = fault_client.send_task("sandbox.submit", args=[json.dumps({"id": job_id, "command": WRITER})],
                                    queue="faults-refused").get(timeout=90)
    assert record["status"] == "error" and record["error"]["stage"] == "collect", record
    assert_host_clean(fault_work_dir)  # no dir, mount, loop device, cgroup, uid or process left
