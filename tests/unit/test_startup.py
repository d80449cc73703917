"""A worker's start-up is one handler whose steps run in a stated order, not receivers of one signal
spread over modules (their order was the order the modules happened to be imported in)."""
from __future__ import annotations

from celery import signals


def _receivers(signal: signals.Signal) -> list[str]:
    import tasks  # noqa: F401 - connects every handler, as `celery -A tasks worker` does

    return [f"{r.__module__}.{r.__qualname__}" for r in signal._live_receivers(None)]


def test_start_up_is_one_handler_and_worker_ready_only_marks_the_node_consuming():
    assert _receivers(signals.celeryd_after_setup) == ["tasks.nodes._start_node"]
    assert _receivers(signals.worker_ready) == ["tasks.monitoring._consuming"]
