"""The Celery app, the per-node queue, and the per-process services."""
from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init

from config.wiring import build_services
from sandbox.lifecycle import Services

# The task class only swaps in the Request that tells Flower which job a task is for (tasks.monitoring).
app = Celery("sandbox", task_cls="tasks.monitoring:SandboxTask")
app.config_from_object("celeryconfig")

log = logging.getLogger("sandbox.tasks")
_node = {"name": os.environ.get("SANDBOX_NODE_NAME", "")}
_services: dict[int, Services] = {}


def node_queue(node: str) -> str:
    """The queue only `node` consumes: every stage after create runs where the sandbox is."""
    return f"sandbox.node.{node}"


@celeryd_after_setup.connect
def _consume_own_queue(sender: str, instance, **_: object) -> None:
    _node["name"] = sender
    instance.app.amqp.queues.select_add(node_queue(sender))


@worker_process_init.connect
def _fresh_services(**_: object) -> None:
    # Connections must not cross a fork: each pool process builds its own clients.
    _services.clear()


def services() -> Services:
    """This process's services, built on first use (after the fork)."""
    pid = os.getpid()
    if pid not in _services:
        _services.clear()
        _services[pid] = build_services(host=_node["name"] or None)
    return _services[pid]
