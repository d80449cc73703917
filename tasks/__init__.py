"""Thin Celery tasks over sandbox.lifecycle: the app, the stages, the canvas and the sweeps."""
from tasks.app import app
from tasks import monitoring, nodes, stages, sweeps  # noqa: E402,F401  (registers the tasks and signal hooks)

__all__ = ["app"]
