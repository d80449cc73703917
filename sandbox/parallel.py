"""Run a few blocking calls at once on a per-process pool of helper threads, the caller working too."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

# Helpers shared by every caller in the process. Starting threads per call (a ThreadPoolExecutor
# per collect) cost a third of a trivial job's collect under the GIL. Kept under botocore's
# default 10 pooled connections, since the calls are mostly S3 PUTs on one shared client.
HELPER_THREADS = 8
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """This process's helper pool (a fork must not inherit its parent's threads)."""
    pid = os.getpid()
    with _pools_lock:
        pool = _pools.get(pid)
        if pool is None:
            _pools.clear()
            pool = _pools[pid] = ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="sandbox-parallel")
        return pool


def run_all(calls: Sequence[Callable[[], Any]], max_parallel: int) -> list[Any]:
    """Every call's result, in order; at most `max_parallel` run at once; the first failure (in
    order) raises once all have ended. The caller runs calls itself, so a busy pool only slows
    this down, never blocks it: a call is taken by whichever thread gets to it first."""
    n = len(calls)
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n
    lock = threading.Lock()
    done = threading.Condition(lock)
    state = {"next": 0, "finished": 0}

    def drain() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= n:
                    return
                state["next"] = i + 1
            try:
                results[i] = calls[i]()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, in order
                errors[i] = exc
            with lock:
                state["finished"] += 1
                done.notify_all()

    helpers = min(max_parallel, n) - 1
    try:
        for _ in range(max(helpers, 0)):
            _pool().submit(drain)
    except RuntimeError:  # the interpreter is shutting down: the caller does the rest alone
        pass
    drain()
    with lock:
        done.wait_for(lambda: state["finished"] == n)
    for error in errors:
        if error is not None:
            raise error
    return results
