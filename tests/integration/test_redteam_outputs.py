"""Red-team attacks on collect from inside a job: what it names must neither grow the job record nor
pass one file off as another. Each test fails if the attack works."""
from __future__ import annotations

import json

import tracemalloc

from sandbox.runtimes.fsutil import MAX_SKIPPED
from tests.integration.test_local_runtime import make_spec
from tests.integration.test_redteam import collect_through_lifecycle

MiB = 1 << 20

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
    stop, listed, closing = skipped[0], skipped[1:-1], skipped[-1]
    assert stop["reason"].startswith("walk stopped") and stop["cut"]  # (the walk's own bound: below)
    assert listed and all(s["cut"] and s["reason"] == "too deep" for s in listed)
    assert all(len(s["path"]) == 513 and s["path"].startswith("output/\ufffd") and s["path"].endswith("\u2026")
               for s in listed)
    # 5 files at most (the fixture's cap): 2 * 5 + 1000 entries looked at, 32 of them the nested dirs
    left_out = 1 + (2 * 5 + 1000 - 32)
    assert closing == {"path": "", "reason": f"{left_out - 1 - len(listed)} more not listed",
                       "not_listed": left_out - 1 - len(listed)}


def test_two_collected_files_never_share_an_object_key(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: collect ["artifacts", "x"] maps artifacts/x/f and x/f to one key, jobs/{id}/artifacts/x/f:
    # the record would list two files (two paths, two sizes) whose URLs serve one object.
    script = ("import os; os.makedirs('artifacts/x'); os.makedirs('x')\n"
              "open('artifacts/x/f', 'w').write('A' * 10); open('x/f', 'w').write('B' * 3)\n")
    record, bucket = collect_through_lifecycle(runtime, settings, script, collect=("artifacts", "x"))
    assert [(a["path"], a["size"]) for a in record["artifacts"]] == [("artifacts/x/f", 10)]
    assert bucket.objects[record["artifacts"][0]["key"]] == b"A" * 10
    assert record["skipped_outputs"] == [{"path": "x/f", "reason": "its object key is taken by a file collected before it"}]


# 20,000 files of 200-byte invalid-UTF-8 names and a dir of more: far past any cap (the old walk
# held 10 MiB of them at once; this one about 1 MiB).
MANY = r"""
import os
os.makedirs('output/z/deeper')
fd = os.open('output', os.O_RDONLY)
pad = b'\xff' * 200
for n in range(20000):
    os.close(os.open(pad + b'%08d' % n, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
for n in range(3):
    open('output/z/deeper/f%d' % n, 'w').close()
"""


def test_collect_walk_stops_past_what_it_could_collect_or_list(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    # Attack: fill the collected dir with names (655k fit a 1 GiB image): collect's walk read and
    # sorted the whole directory and went on past every cap, 330 MiB of worker memory a walk.
    spec = make_spec(["/usr/bin/python3", "-c", MANY], disk=256 * MiB, timeout_s=120)
    handle = runtime.create(spec, "h")
    assert runtime.execute(handle, spec, lambda s, c: None).outcome == "succeeded", runtime.logs(handle)["stderr"].read()
    files = runtime.collect(handle, ("output", "output/z"))
    tracemalloc.start()
    try:
        collected = [f.relpath for f in files]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        files.close()
    max_entries = 2 * settings.max_output_files + MAX_SKIPPED
    assert files.entries == max_entries and len(collected) == settings.max_output_files
    assert files.skipped[0] == {"path": "output", "reason": f"walk stopped: more than {max_entries} entries"}
    # Which 1,010 names a directory yields first is the filesystem's order (ext4 hashes names with a
    # per-image seed): when "z" is among them it sorts first, and it and z/deeper are entries too.
    entered = 2 if any(p.startswith("output/z/") for p in collected) else 0
    assert len(files.skipped) == 1 + MAX_SKIPPED
    assert files.not_listed == max_entries - entered - MAX_SKIPPED - len(collected)
    assert peak < 4 * MiB, f"the walk of one job's output dir peaked at {peak / MiB:.0f} MiB of worker heap"


# An invalid byte is shown as U+FFFD: a second file literally named with U+FFFD would be uploaded
# under the very path shown for the refused one.
LOOKALIKE = ("import os; os.makedirs('output')\n"
             "open(b'output/report\\xff.pdf', 'w').write('real')\n"
             "open('output/report\\ufffd.pdf', 'w').write('decoy')\n")


def test_a_refused_name_never_shows_as_an_uploaded_one(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    record, _ = collect_through_lifecycle(runtime, settings, LOOKALIKE)
    skipped = {s["path"] for s in record["skipped_outputs"]}
    uploaded = {a["path"] for a in record["artifacts"]}
    assert "output/report\ufffd.pdf" in skipped  # both refused, shown alike
    assert not skipped & uploaded
    assert not any(a["path"].startswith("output/report") for a in record["artifacts"])
