"""Two beats at once (or a beat restarted mid-sweep) send every sweep twice; each sweep's Redis lock
lets one run per period do the work."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from tests.faults.conftest import LOG_DIR
from tests.support.services import ROOT, stop_process

PERIOD_S = 2.0


def test_two_beats_never_run_one_sweep_twice_in_a_period(start_worker, fault_env, fault_redis_client, tmp_path):
    env = {**fault_env, "SANDBOX_STUCK_SWEEP_INTERVAL": str(PERIOD_S), "SANDBOX_ORPHAN_SWEEP_INTERVAL": "3600"}
    worker = start_worker("fw-beat@host-b", **env)
    started = time.monotonic()
    beats = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "beat", "-s", str(tmp_path / f"beat{i}"),
                               "--loglevel", "INFO"], cwd=ROOT, env={**os.environ, **env},
                              stdout=open(LOG_DIR / f"beat{i}.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True) for i in range(2)]
    try:
        time.sleep(9)
    finally:
        for beat in beats:
            stop_process(beat)
    time.sleep(1)  # the last sends are consumed
    # beats keep sending until they have stopped, which takes longer on a loaded machine
    elapsed_s = time.monotonic() - started

    # beat's sweeps come through the control queue and run on the consumer's side threads
    results = re.findall(r"side task sweep_stuck\[[^\]]+\] returned (None|\[.*?\])", worker.tail(5000))
    ran, skipped = results.count("[]"), results.count("None")
    print(f"sweep_stuck sent {len(results)} times by two beats: ran {ran}, skipped {skipped}")
    assert skipped >= 2, results  # both beats sent it...
    # ...but runs were at least the lock's life (0.9 of the period, sandbox.sweeps.sweep_lock) apart
    assert 1 <= ran <= elapsed_s / (0.9 * PERIOD_S) + 1, (ran, elapsed_s)
    last = json.loads(fault_redis_client.get("sandbox:sweep:stuck:last"))
    assert last["node"] == worker.node and last["count"] == 0
