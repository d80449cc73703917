"""Peak worker memory while a 200 MB object moves through ArtifactStore, against the same run's baseline.

Run by hand or by `make bench`:   .venv/bin/python bench/storage_memory.py [--mb 200]
Each measurement runs in a fresh child process (peak RSS, VmHWM, is a per-process high-water mark):
  baseline  imports, client built, one tiny put and get: the floor every worker pays
  upload    ArtifactStore.upload of the file (streamed, equal-sized multipart parts)
  download  ArtifactStore.open_input copied to a file in 1 MiB chunks
  naive     put_object(Body=f.read()): what holding the object whole costs, for contrast
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "jobs/bench/input/blob.bin"
MIB = 1024 * 1024


def write_blob(path: Path, mb: int) -> str:
    """A file of mb MiB of incompressible data; returns its sha256."""
    digest = hashlib.sha256()
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(mb):
            chunk = i.to_bytes(8, "little") + block[8:]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM belongs to the current address space; ru_maxrss would also
    carry the forking parent's peak across exec (Linux keeps it in the signal struct)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(mode: str, path: str) -> dict:
    """Run one measurement in this process; returns rss figures in KiB and seconds."""
    sys.path.insert(0, str(ROOT))
    from config.settings import load_settings
    from sandbox.storage import ArtifactStore

    store = ArtifactStore(load_settings(), actor="bench")
    store.ensure_bucket()
    store.upload("jobs/bench/input/warm", io.BytesIO(b"warm"), "bench")
    with store.open_input("jobs/bench/input/warm", "bench") as f:
        f.read()
    baseline = peak_rss_kib()
    started = time.perf_counter()
    moved = 0
    if mode == "upload":
        with open(path, "rb") as f:
            moved = store.upload(KEY, f, "bench", size=os.fstat(f.fileno()).st_size)
    elif mode == "download":
        with store.open_input(KEY, "bench") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, MIB)
            moved = dst.tell()
    elif mode == "naive":
        with open(path, "rb") as f:
            body = f.read()
        store.client.put_object(Bucket=store.bucket, Key=KEY + ".naive", Body=body)
        moved = len(body)
    seconds = time.perf_counter() - started
    peak = peak_rss_kib()
    return {"mode": mode, "baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline,
            "bytes": moved, "seconds": seconds}


def run_child(mode: str, path: Path, env: dict[str, str]) -> dict:
    """One measurement in a fresh interpreter, so each peak is its own."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], env=env, check=True,
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Start a SeaweedFS, move one object up and down, print a table and JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sys.path.insert(0, str(ROOT))
    from devstack.seaweed import seaweed_server

    with tempfile.TemporaryDirectory() as tmp, seaweed_server(Path(tmp) / "seaweed") as server:
        env = {**os.environ, **server.env()}
        src, dst = Path(tmp) / "src.bin", Path(tmp) / "dst.bin"
        digest = write_blob(src, args.mb)
        rows = [run_child("baseline", src, env), run_child("upload", src, env),
                run_child("download", dst, env), run_child("naive", src, env)]
        with open(dst, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == digest, "download differs from upload"
    base = rows[0]["peak_kib"]
    print(f"{'mode':<10}{'peak MiB':>10}{'vs baseline':>13}{'growth MiB':>12}{'MiB/s':>8}")
    for r in rows:
        rate = r["bytes"] / MIB / r["seconds"] if r["bytes"] else 0.0
        print(f"{r['mode']:<10}{r['peak_kib'] / 1024:>10.1f}{r['peak_kib'] / base:>12.2f}x"
              f"{r['growth_kib'] / 1024:>12.1f}{rate:>8.0f}")
    print(json.dumps({"object_mib": args.mb, "rows": rows}))


if __name__ == "__main__":
    main()
