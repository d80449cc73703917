"""Thin Celery tasks over sandbox.lifecycle: the app, the stages, the canvas and the sweeps."""
from tasks.app import app

__all__ = ["app"]
