"""The composition root: Settings in, the services every stage works with out."""
from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from config.settings import Settings, load_settings
from sandbox.admission import Admission
from sandbox.events import EventBus
from sandbox.lifecycle import Services
from sandbox.runtimes.base import Runtime
from sandbox.state import JobStore
from sandbox.storage import ArtifactStore


def build_runtime(settings: Settings) -> Runtime:
    """The sandbox backend SANDBOX_RUNTIME names."""
    if settings.runtime == "fly":
        from sandbox.runtimes.fly import FlyRuntime

        return FlyRuntime(settings)
    from sandbox.runtimes.local import LocalRuntime  # needs bwrap and root: only where it runs

    return LocalRuntime(settings)


def redis_client(url: str) -> redis.Redis:
    """A client that rides out a Redis restart (about 30 s of retries) instead of failing the stage."""
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), 20)
    return redis.Redis.from_url(url, health_check_interval=30, retry=retry,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def build_services(settings: Settings | None = None, host: str | None = None) -> Services:
    """Everything a stage needs, with fresh connections (once per process, shared by its threads)."""
    settings = settings or load_settings()
    host = host or settings.node_name
    client = redis_client(settings.redis_url)
    events = EventBus.from_settings(client, settings)
    runtime = build_runtime(settings)
    # Admission counts what sandboxes take from this node; an unpinned runtime's live elsewhere.
    admission = Admission(client, host, settings) if getattr(runtime, "pinned", True) else None
    return Services(
        settings=settings,
        store=JobStore(client, events, ttl_s=settings.record_ttl_s, tombstone_ttl_s=settings.tombstone_ttl_s),
        runtime=runtime,
        artifacts=ArtifactStore(settings, actor=host),
        events=events,
        host=host,
        admission=admission,
    )
