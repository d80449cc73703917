"""A no-op task, loaded into the benchmark's worker with `--include bench.noop` (never in production)."""
from tasks.app import app


@app.task(name="bench.noop")
def noop(value: object = None) -> object:
    return value
