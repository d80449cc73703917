"""Red-team attacks on collect from inside a job: what it names must neither grow the job record nor
pass one file off as another. Each test fails if the attack works."""
from __future__ import annotations

import json

from tests.integration.test_redteam import collect_through_lifecycle

# 32 nested dirs of 255 bytes of invalid UTF-8 under output/, then 1,100 dirs at the bottom, each
# one "too deep": 1,100 skipped entries whose paths escape to ~48 KiB of JSON each (50 MB in all).
DEEP = r"""
import os
name = b'\xff' * 255
os.mkdir('output')
cur = os.open('output', os.O_RDONLY)
for _ in range(32):
    os.mkdir(name, dir_fd=cur)
    nxt = os.open(name, os.O_RDONLY, dir_fd=cur); os.close(cur); cur = nxt
for i in range(1100):
    os.mkdir(name[:-8] + b'%08d' % i, dir_fd=cur)
"""


def test_skipped_outputs_cannot_grow_the_job_record(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: a job names what collect leaves out, so long and so many that its record (kept in
    # Redis for days, re-sent on every update and webhook) runs to tens of MiB.
    record, _ = collect_through_lifecycle(runtime, settings, DEEP)
    skipped = record["skipped_outputs"]
    assert len(json.dumps(skipped)) < 80 * 1024, len(json.dumps(skipped))
    assert len(json.dumps(record)) < 128 * 1024
    listed, closing = skipped[:-1], skipped[-1]
    assert listed and all(s["cut"] and s["reason"] == "too deep" for s in listed)
    assert all(len(s["path"]) == 513 and s["path"].startswith("output/\ufffd") and s["path"].endswith("\u2026")
               for s in listed)
    assert closing == {"path": "", "reason": f"{1100 - len(listed)} more not listed", "not_listed": 1100 - len(listed)}


def test_two_collected_files_never_share_an_object_key(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: collect ["artifacts", "x"] maps artifacts/x/f and x/f to one key, jobs/{id}/artifacts/x/f:
    # the record would list two files (two paths, two sizes) whose URLs serve one object.
    script = ("import os; os.makedirs('artifacts/x'); os.makedirs('x')\n"
              "open('artifacts/x/f', 'w').write('A' * 10); open('x/f', 'w').write('B' * 3)\n")
    record, bucket = collect_through_lifecycle(runtime, settings, script, collect=("artifacts", "x"))
    assert [(a["path"], a["size"]) for a in record["artifacts"]] == [("artifacts/x/f", 10)]
    assert bucket.objects[record["artifacts"][0]["key"]] == b"A" * 10
    assert record["skipped_outputs"] == [{"path": "x/f", "reason": "its object key is taken by a file collected before it"}]
