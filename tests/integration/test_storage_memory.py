"""A 200 MB object moves through ArtifactStore with the worker's memory bounded (peak RSS, VmHWM, in a child process)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from tests.support.seaweed import seaweed_or_skip

ROOT = Path(__file__).resolve().parents[2]
OBJECT_MIB = 200
BOUND_MIB = 64  # a few 8 MiB parts in flight; holding the object whole would add 200 MiB


def _bench():
    spec = importlib.util.spec_from_file_location("storage_memory", ROOT / "bench" / "storage_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_200mb_upload_and_download_keep_worker_memory_bounded(tmp_path: Path) -> None:
    bench = _bench()
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    digest = bench.write_blob(src, OBJECT_MIB)
    with seaweed_or_skip(tmp_path / "seaweed") as server:
        env = {**os.environ, **server.env()}
        up = bench.run_child("upload", src, env)
        down = bench.run_child("download", dst, env)
        naive = bench.run_child("naive", src, env)
    assert up["bytes"] == down["bytes"] == OBJECT_MIB * 1024 * 1024
    with open(dst, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest
    # The streamed paths grow by a bounded amount; the naive control proves the probe can see 200 MiB.
    assert up["growth_kib"] < BOUND_MIB * 1024, up
    assert down["growth_kib"] < BOUND_MIB * 1024, down
    assert naive["growth_kib"] > OBJECT_MIB // 2 * 1024, naive
