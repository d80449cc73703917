"""The Celery app, the queues a node consumes, and the services its threads share."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

from celery import Celery

from config.wiring import build_services
from sandbox.lifecycle import Services
from sandbox.nodes import node_queue

# The task class only swaps in the Request that tells Flower which job a task is for (tasks.monitoring).
app = Celery("sandbox", task_cls="tasks.monitoring:SandboxTask")
app.config_from_object("celeryconfig")


log = logging.getLogger("sandbox.tasks")
_node = {"name": os.environ.get("SANDBOX_NODE_NAME", "")}
_services: dict[int, Services] = {}
_services_lock = threading.Lock()
CREATE_SUFFIX = ".create"


def create_queue(intake: str) -> str:
    """Where the creates of jobs submitted through `intake` wait for a node that admits them."""
    return intake if intake.endswith(CREATE_SUFFIX) else f"{intake}{CREATE_SUFFIX}"


def consumed_queues(node: str, intakes: Sequence[str] = ("sandbox",)) -> list[str]:
    """Every queue a node consumes, in the order it drains them (queue_order_strategy "priority"):
    its in-flight jobs' stages first, then submits and the rest, new jobs' creates last."""
    intakes = [q for q in dict.fromkeys([*intakes, "celery"]) if q != node_queue(node) and not q.endswith(CREATE_SUFFIX)]
    return [node_queue(node), *intakes, *(create_queue(q) for q in intakes)]


def consume_own_queues(node: str, worker: Any) -> None:
    """Name this process's node and make `worker` consume the node's queues (at start-up, before it
    consumes: tasks.nodes runs it first)."""
    _node["name"] = node
    queues = worker.app.amqp.queues
    queues.select(consumed_queues(node, list(queues.consume_from)))  # -Q names the intakes


def services() -> Services:
    """This process's services, built on first use and shared by its pool threads."""
    pid = os.getpid()
    services_now = _services.get(pid)
    if services_now is None:
        with _services_lock:
            if pid not in _services:
                _services.clear()  # built before a fork: connections must not cross it
                _services[pid] = build_services(host=_node["name"] or None)
            services_now = _services[pid]
    return services_now
