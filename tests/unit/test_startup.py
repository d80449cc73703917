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


def _boot_with(monkeypatch, redis_url: str):
    """Run the start-up handler against `redis_url`, its Celery-bound first steps left out."""
    from types import SimpleNamespace

    import tasks.nodes as node_start

    monkeypatch.setenv("SANDBOX_REDIS_URL", redis_url)
    monkeypatch.setattr(node_start, "consume_own_queues", lambda sender, instance: None)
    monkeypatch.setattr(node_start, "start_endpoint", lambda sender: None)
    instance = SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from={}))))
    node_start._start_node("boot@test", instance)


def test_a_start_up_that_cannot_reach_redis_stops_the_worker_instead_of_consuming(monkeypatch):
    # Celery only logs what a receiver raises and consumes anyway: a node with no heartbeat would
    # have its running jobs ended as lost. Nothing listens on the port: waited for, then SystemExit.
    import pytest

    import tasks.nodes as node_start
    from devstack.processes import free_port

    monkeypatch.setattr(node_start, "START_REDIS_WAIT_S", 0.3)
    with pytest.raises(SystemExit, match="refusing to start: ConnectionError"):
        _boot_with(monkeypatch, f"redis://127.0.0.1:{free_port()}/0")


def test_a_failing_start_up_step_stops_the_worker(monkeypatch):
    import pytest

    import tasks.nodes as node_start
    from devstack.processes import free_port

    def broken(*args, **kwargs):
        raise RuntimeError("the check broke")

    monkeypatch.setattr(node_start.nodes, "check_durability", broken)
    with pytest.raises(SystemExit, match="refusing to start: RuntimeError: the check broke"):
        _boot_with(monkeypatch, f"redis://127.0.0.1:{free_port()}/0")
