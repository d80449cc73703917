"""The worker's memory does not grow with what a job writes: 300 MB of stdout, a few MiB of Python heap."""
from __future__ import annotations

import tracemalloc

from tests.integration.test_local_runtime import make_spec

OUTPUT_BYTES = 300 * 1024 * 1024
HEAP_BOUND_BYTES = 16 * 1024 * 1024


def test_300mb_of_output_leaves_the_worker_heap_bounded(runtime) -> None:
    spec = make_spec(["/bin/sh", "-c", f"head -c {OUTPUT_BYTES} /dev/zero"], timeout_s=60)
    handle = runtime.create(spec, "h")
    seen = {"bytes": 0}
    tracemalloc.start()
    try:
        result = runtime.execute(handle, spec, lambda stream, chunk: seen.__setitem__("bytes", seen["bytes"] + len(chunk)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.outcome == "succeeded" and result.stdout_bytes == OUTPUT_BYTES
    assert result.stdout_truncated
    assert peak < HEAP_BOUND_BYTES, f"the worker's heap peaked at {peak} bytes while relaying the output"
