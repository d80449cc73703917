"""Gauges sampled at scrape time: from Redis (cluster-wide) and from this node's runtime."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sandbox.observability.cluster import Cluster

log = logging.getLogger("sandbox.observability")
_ADMISSION = (("cpu", "cpu_cores"), ("memory_bytes", "memory_bytes"), ("disk_bytes", "disk_bytes"),
              ("sandboxes", "sandboxes"))


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class ClusterCollector(Collector):
    """Every worker exports the same cluster-wide view (no node label): query with max(), see docs."""

    def __init__(self, cluster: Cluster, fresh_s: float) -> None:
        self.cluster = cluster
        self.fresh_s = fresh_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = _gauge("sandbox_redis_up", "1 if this node could read the cluster's state from Redis.")
        try:
            families = list(self._sample(time.time()))
        except Exception as e:  # noqa: BLE001 - a scrape must answer even when Redis does not
            log.warning("could not sample Redis for metrics: %s: %s", type(e).__name__, e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _sample(self, now: float) -> Iterator[GaugeMetricFamily]:
        c = self.cluster
        depth = _gauge("sandbox_queue_messages", "Messages waiting in a broker queue.", ("queue",))
        age = _gauge("sandbox_queue_oldest_message_age_seconds", "Age of the oldest waiting message "
                     "(sent-at header, else when any node or health first saw it at the head).", ("queue",))
        consumers = _gauge("sandbox_queue_consumers", "Live nodes whose heartbeat lists the queue.", ("queue",))
        for q in c.queues(self.fresh_s, now):
            depth.add_metric([q.name], q.messages)
            age.add_metric([q.name], q.oldest_age_s or 0.0)
            consumers.add_metric([q.name], len(q.consumers))
        yield from (depth, age, consumers)
        beat_age = _gauge("sandbox_node_heartbeat_age_seconds", "Seconds since a node's last heartbeat "
                          "(kept growing for a node that died; absent for one stopped on purpose).", ("node",))
        nodes_up = _gauge("sandbox_nodes_live", "Nodes with a fresh heartbeat.")
        beats = c.heartbeats(now)
        for b in beats:
            if b.age_s is not None:
                beat_age.add_metric([b.node], b.age_s)
        nodes_up.add_metric([], sum(1 for b in beats if b.live(self.fresh_s)))
        yield from (beat_age, nodes_up)
        yield from self._admission([b.node for b in beats])
        dead = _gauge("sandbox_dead_letters", f"Entries in the dead-letter list {'sandbox.dead'}.")
        dead.add_metric([], c.dead_letters())
        active = _gauge("sandbox_jobs_active", "Jobs not yet terminal (queued to cleaning).")
        active.add_metric([], c.active_jobs())
        yield from (dead, active)
        last = _gauge("sandbox_sweep_last_run_timestamp_seconds", "When beat's sweep last ran.", ("sweep",))
        for name, entry in c.last_sweeps().items():
            if entry and isinstance(entry.get("at"), (int, float)):
                last.add_metric([name], float(entry["at"]))
        yield last
        yield from self._redis(c.redis_facts())

    def _admission(self, nodes: list[str]) -> Iterator[GaugeMetricFamily]:
        admitted = {k: _gauge(f"sandbox_node_admitted_{n}", f"Admitted {n.replace('_', ' ')} on a node.", ("node",))
                    for k, n in _ADMISSION}
        capacity = {k: _gauge(f"sandbox_node_capacity_{n}", f"Node capacity, {n.replace('_', ' ')}.", ("node",))
                    for k, n in _ADMISSION}
        for node in nodes:
            used, limits = self.cluster.admission(node)
            for key, _ in _ADMISSION:
                admitted[key].add_metric([node], used[key])
                if key in limits:
                    capacity[key].add_metric([node], limits[key])
        yield from admitted.values()
        yield from capacity.values()

    def _redis(self, facts: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
        for name, doc, value in (
            ("sandbox_redis_aof_enabled", "1 if Redis appends every write to its AOF.", facts["aof_enabled"]),
            ("sandbox_redis_persistence_ok", "0 if Redis's last RDB save or AOF write failed.",
             facts["rdb_last_bgsave_ok"] and facts["aof_last_write_ok"]),
            ("sandbox_redis_noeviction", "1 if Redis's maxmemory-policy is noeviction (never drops "
             "queued messages or job records).", facts["maxmemory_policy"] == "noeviction"),
            ("sandbox_redis_used_memory_bytes", "Redis used_memory.", facts["used_memory_bytes"]),
            ("sandbox_redis_maxmemory_bytes", "Redis maxmemory (0: none).", facts["maxmemory_bytes"]),
        ):
            g = _gauge(name, doc)
            g.add_metric([], float(value))
            yield g


class NodeCollector(Collector):
    """This node's sandboxes, from its runtime: live, and past their expiry (a leak); and its creates
    waiting for admission (`waiting_creates` answers None where the runtime has no admission: Fly)."""

    def __init__(self, node: str, list_sandboxes: Callable[[], list[Any]],
                 waiting_creates: Callable[[], int | None] = lambda: None) -> None:
        self.node = node
        self.list_sandboxes = list_sandboxes
        self.waiting_creates = waiting_creates

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._waiting()
        live = _gauge("sandbox_live_sandboxes", "Sandboxes that exist on this node.", ("node",))
        expired = _gauge("sandbox_expired_sandboxes", "Sandboxes on this node past their expiry "
                         "(created + timeout + 15 min): the orphan sweep should have destroyed them.", ("node",))
        try:
            infos = self.list_sandboxes()
        except Exception as e:  # noqa: BLE001
            log.warning("could not list sandboxes for metrics: %s: %s", type(e).__name__, e)
            return
        now = time.time()
        live.add_metric([self.node], len(infos))
        expired.add_metric([self.node], sum(1 for i in infos if i.expires_at < now))
        yield from (live, expired)

    def _waiting(self) -> Iterator[GaugeMetricFamily]:
        # a create holds its task (and a worker thread) while it waits: a queue that does not move
        # while this is above 0 is a node full of admitted sandboxes, not a stuck worker
        try:
            count = self.waiting_creates()
        except Exception as e:  # noqa: BLE001 - the scrape still answers with the rest
            log.warning("could not count creates waiting for admission: %s: %s", type(e).__name__, e)
            return
        if count is None:
            return
        waiting = _gauge("sandbox_admission_waiting_creates", "Creates of this worker process waiting for "
                         "its node's admission (capacity) now.", ("node",))
        waiting.add_metric([self.node], count)
        yield waiting
