"""Beat's sweeps against a real Redis and real sandboxes: they find work by labels, not memory."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import redis

from sandbox import nodes, sweeps
from sandbox.lifecycle import Services
from sandbox.spec import JobSpec, ResourceLimits
from sandbox.state import JobStatus, JobStore, new_record
from tests.conftest import new_job_id, running_redis, wait_for


HOST = "sweeper@host"


@pytest.fixture
def services(runtime, settings, redis_client) -> Services:
    return Services(settings=settings, store=JobStore(redis_client), runtime=runtime, artifacts=None,
                    events=None, host=HOST)


def spec_for(job_id: str) -> JobSpec:
    return JobSpec(id=job_id, command="ls", argv=("/usr/bin/ls",), environment={}, timeout_s=5,
                   resources=ResourceLimits(cpu=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20, pids=32))


def test_orphan_sweep_destroys_sandboxes_of_ended_or_vanished_jobs_at_once(services):
    ended, running, vanished = new_job_id("ended"), new_job_id("running"), new_job_id("vanished")
    for job_id, status in ((ended, JobStatus.SUCCEEDED), (running, JobStatus.RUNNING)):
        services.store.create(new_record(job_id, status))
    handles = {job_id: services.runtime.create(spec_for(job_id), HOST) for job_id in (ended, running, vanished)}

    destroyed = sweeps.sweep_orphans(services, now=time.time() + sweeps.YOUNG_S)  # no 5-minute grace

    assert sorted(destroyed) == sorted([handles[ended].sandbox_id, handles[vanished].sandbox_id])
    assert [info.job_id for info in services.runtime.list_sandboxes()] == [running]
    # a job that waits in a backlog before execute has no age: it is never swept
    assert sweeps.sweep_orphans(services, now=time.time() + 10**6) == []


def test_orphan_sweep_covers_every_sandbox_in_its_work_dir_whatever_node_it_names(services):
    job_id = new_job_id("elsewhere")
    services.runtime.create(spec_for(job_id), "another@host")  # e.g. the node's name before a rename
    assert sweeps.sweep_orphans(services, now=time.time() + sweeps.YOUNG_S) != []
    assert services.runtime.list_sandboxes() == []


def test_expiry_counts_from_the_start_of_execute_and_ends_the_job(services):
    waited, ran = new_job_id("waited"), new_job_id("ran")
    old = time.time() - 10**5  # created long ago: it waited in a backlog
    for job_id in (waited, ran):
        services.store.create(new_record(job_id, JobStatus.RUNNING, now=old))
        services.runtime.create(spec_for(job_id), HOST)
    now = time.time()
    services.store.update(waited, lambda r: r["stages"].update(execute={"host": HOST, "started_at": now}))
    services.store.update(ran, lambda r: r["stages"].update(execute={"host": HOST, "started_at": old}))

    destroyed = sweeps.sweep_orphans(services)

    assert destroyed == [f"sbx-{ran}"]
    assert services.store.get(ran)["status"] == "error"
    assert services.store.get(waited)["status"] == "running"


def test_a_terminal_job_whose_own_stage_still_works_on_it_keeps_its_sandbox(services):
    job_id = new_job_id("collecting")
    services.store.create(new_record(job_id, JobStatus.CANCELLED))
    services.runtime.create(spec_for(job_id), HOST)
    services.store.update(job_id, lambda r: r["stages"].update(collect={"host": HOST, "started_at": time.time()}))
    assert sweeps.sweep_orphans(services, booted_at=time.time() - 60) == []
    # the same stage begun by a process of this node that died (before this one booted): destroyed
    assert sweeps.sweep_orphans(services, booted_at=time.time() + 1) == [f"sbx-{job_id}"]


def test_a_cancelled_job_whose_collect_and_cleanup_are_still_queued_keeps_its_sandbox(services):
    job_id = new_job_id("queuedcollect")
    services.store.create(new_record(job_id, JobStatus.RUNNING))
    services.runtime.create(spec_for(job_id), HOST)
    now = time.time()
    services.store.update(job_id, lambda r: r["stages"].update(
        execute={"host": HOST, "started_at": now - 1, "finished_at": now}))
    services.store.transition(job_id, JobStatus.CANCELLED)  # its collect (the logs) waits for a slot

    assert sweeps.sweep_orphans(services) == []
    late = now + services.settings.visibility_timeout_s + sweeps.GRACE_S + 1  # that message is lost
    assert sweeps.sweep_orphans(services, now=late) == [f"sbx-{job_id}"]


def _judging_nodes(services: Services, dead_after_s: float = 1.0) -> Services:
    """The services with a short dead-after time, once this Redis has been up that long (before,
    a missing heartbeat may be a restart's: nodes.heartbeats_tell)."""
    wait_for(lambda: nodes.heartbeats_tell(services.store.redis, dead_after_s), timeout_s=dead_after_s + 5)
    return dataclasses.replace(services, settings=dataclasses.replace(services.settings, node_dead_after_s=dead_after_s))


def test_stuck_sweep_ends_started_jobs_of_dead_nodes_and_never_queued_ones(services):
    services = _judging_nodes(services)

    lost, alive, queued = new_job_id("lost"), new_job_id("alive"), new_job_id("queued")
    for job_id, node in ((lost, "gone@host"), (alive, "live@host")):
        services.store.create(new_record(job_id, JobStatus.RUNNING))
        services.store.update(job_id, lambda r, n=node: r["stages"].update(
            execute={"host": n, "started_at": time.time()}))
    services.store.create(new_record(queued, JobStatus.QUEUED, now=time.time() - 10**6))
    nodes.beat(services.store.redis, "live@host", ["sandbox"], time.time(), dead_after_s=60)

    ended = [r["id"] for r in sweeps.sweep_stuck(services, max_idle_s=10**7)]

    assert lost in ended and alive not in ended and queued not in ended
    record = services.store.get(lost)
    assert record["status"] == "error" and record["error"]["code"] == "worker_lost"
    assert "gone@host" in record["error"]["message"]
    assert services.store.get(alive)["status"] == "running"
    assert lost not in [r["id"] for r in sweeps.sweep_stuck(services, max_idle_s=10**7)]  # ended once


def test_a_redis_younger_than_the_dead_after_time_makes_no_node_dead(services, tmp_path):
    # Redis back from an outage longer than the dead-after time has let every heartbeat expire: until
    # the nodes beat again, every live node looks dead. The sweep must not end their jobs then.
    servers = running_redis(tmp_path)
    fresh = redis.Redis.from_url(next(servers).url)
    try:
        services = dataclasses.replace(services, store=JobStore(fresh))
        job_id = new_job_id("young")
        services.store.create(new_record(job_id, JobStatus.RUNNING))
        services.store.update(job_id, lambda r: r["stages"].update(execute={"host": "quiet@host", "started_at": time.time()}))
        young = dataclasses.replace(services, settings=dataclasses.replace(services.settings, node_dead_after_s=60.0))
        assert not nodes.heartbeats_tell(fresh, 60.0)  # (a Redis started a moment ago)
        assert sweeps.sweep_stuck(young, max_idle_s=10**7) == []
        assert services.store.get(job_id)["status"] == "running"
        # the same node, once this Redis has been up longer than the dead-after time: dead
        assert [r["id"] for r in sweeps.sweep_stuck(_judging_nodes(services), max_idle_s=10**7)] == [job_id]
    finally:
        fresh.close()
        next(servers, None)  # stops it


def test_reconcile_ends_what_a_dead_process_of_this_node_ran_and_nothing_else(services):
    lost, fresh = new_job_id("lost"), new_job_id("fresh")
    booted_at = time.time()
    for job_id, started in ((lost, booted_at - 30), (fresh, booted_at + 1)):
        services.store.create(new_record(job_id, JobStatus.RUNNING))
        handle = services.runtime.create(spec_for(job_id), HOST)
        services.store.update(job_id, lambda r, s=started, h=handle: r.update(
            sandbox=h.to_dict(), stages={"execute": {"host": HOST, "started_at": s}}))

    ended, destroyed = sweeps.reconcile(services, booted_at)

    assert [r["id"] for r in ended] == [lost] and destroyed == [f"sbx-{lost}"]
    assert services.store.get(lost)["status"] == "error"
    assert services.store.get(fresh)["status"] == "running"
    assert [i.job_id for i in services.runtime.list_sandboxes()] == [fresh]


def test_one_sweep_run_per_period_however_many_beats_send_it(redis_client):
    name = new_job_id("sweep")
    assert sweeps.sweep_lock(redis_client, name, period_s=30)
    assert not sweeps.sweep_lock(redis_client, name, period_s=30)


def test_a_failed_destroy_still_ends_the_job_and_the_sweep_destroys_later(services, monkeypatch):
    from sandbox import lifecycle
    from sandbox.errors import SandboxFailure

    job_id = new_job_id("stubborn")
    services.store.create(new_record(job_id, JobStatus.RUNNING))
    handle = services.runtime.create(spec_for(job_id), HOST)
    services.store.update(job_id, lambda r: r.update(sandbox=handle.to_dict()))

    def refuse(handle):  # noqa: ANN001 - a destroy that fails, as a busy mount would make it
        raise SandboxFailure("workspace is still mounted")

    real_destroy = services.runtime.destroy
    monkeypatch.setattr(services.runtime, "destroy", refuse)
    record = lifecycle.fail(services, job_id, "cleanup", SandboxFailure("workspace is still mounted"))
    assert record["status"] == "error" and record["error"]["stage"] == "cleanup"

    monkeypatch.setattr(services.runtime, "destroy", real_destroy)
    assert sweeps.sweep_orphans(services) == [handle.sandbox_id]
    assert services.runtime.list_sandboxes() == []


def test_a_create_that_died_half_way_is_torn_down_by_the_sweep(services):
    import os

    job_id = new_job_id("halfmade")
    handle = services.runtime.create(spec_for(job_id), HOST)
    d = os.path.join(services.runtime.run_dir, handle.sandbox_id)
    os.unlink(os.path.join(d, "meta.json"))  # as if the worker died before writing it
    assert services.runtime.list_sandboxes() == []  # invisible to the ordinary sweep

    assert sweeps.sweep_orphans(services) == []  # young: a create may still be under way
    assert sweeps.sweep_orphans(services, now=time.time() + sweeps.GRACE_S + 1) == [handle.sandbox_id]
    assert not os.path.exists(d)
    assert not any(os.path.exists(g) for g in _group_dirs(services.runtime.cgroups, handle.sandbox_id))
    assert not os.listdir(os.path.join(services.runtime.run_dir, ".uids"))  # its host uid is free again


def test_after_a_reboot_the_sweep_removes_disk_images_the_empty_run_dir_no_longer_names(services):
    import os
    from sandbox.runtimes import diskimage

    rt = services.runtime
    job_id = new_job_id("rebooted")
    handle = rt.create(spec_for(job_id), HOST)
    image = os.path.join(rt.work_dir, "images", f"{handle.sandbox_id}.img")
    assert os.path.isfile(image)
    # a reboot: the mount, the cgroup and the run dir's tmpfs contents are gone; the image is not
    d = os.path.join(rt.run_dir, handle.sandbox_id)
    diskimage.unmount(os.path.join(d, "mnt"))
    rt.cgroups.remove(handle.sandbox_id)
    shutil.rmtree(d)
    for entry in os.scandir(os.path.join(rt.run_dir, ".uids")):
        os.unlink(entry.path)
    assert rt.list_sandboxes() == []

    assert sweeps.sweep_orphans(services) == []  # young: a create may still be under way
    assert sweeps.sweep_orphans(services, now=time.time() + sweeps.GRACE_S + 1) == [handle.sandbox_id]
    assert not os.path.exists(image) and os.listdir(os.path.join(rt.work_dir, "images")) == []


def test_the_sweep_tears_down_a_sandbox_of_the_layout_before_the_run_dir(services):
    """An upgrade leaves <work_dir>/sbx-*/ (mnt/, meta.json, disk.img) and its <work_dir>/.uids claim."""
    import os

    rt = services.runtime
    sid = f"sbx-{new_job_id('legacy')}"
    d = os.path.join(rt.work_dir, sid)
    os.makedirs(os.path.join(d, "mnt", "workspace"))
    open(os.path.join(d, "meta.json"), "w").close()
    os.makedirs(os.path.join(rt.work_dir, ".uids"), mode=0o700, exist_ok=True)
    os.symlink(sid, os.path.join(rt.work_dir, ".uids", "1000007"))
    os.symlink("sbx-someone-else", os.path.join(rt.work_dir, ".uids", "1000008"))

    assert sweeps.sweep_orphans(services) == []  # young: may be an old worker's create under way
    assert sweeps.sweep_orphans(services, now=time.time() + sweeps.GRACE_S + 1) == [sid]
    assert not os.path.exists(d)
    assert os.listdir(os.path.join(rt.work_dir, ".uids")) == ["1000008"]  # only its own claim went


def test_a_queue_no_live_node_consumes_is_reported(redis_client):
    from sandbox import nodes

    node = new_job_id("reader")
    orphan_queue = f"sandbox.node.{new_job_id('gone')}"
    redis_client.lpush(orphan_queue, "m1", "m2")
    nodes.beat(redis_client, node, ["sandbox", "celery", "sandbox.control"], time.time(), dead_after_s=60)
    try:
        report = nodes.unconsumed_queues(redis_client, dead_after_s=60)
        assert report.get(orphan_queue) == 2
        assert "sandbox" not in report
    finally:
        redis_client.delete(orphan_queue)


# -- job cgroups left without their sandbox directory (real cgroups) ------------------------------

def _group_dirs(groups, name: str) -> list[str]:
    import os

    parents = sorted(set(groups.parents.values())) if groups.version == 1 else [groups.parent]
    return [os.path.join(p, name) for p in parents]


def _plant(groups, name: str, age_s: float) -> None:
    """An empty job cgroup made `age_s` ago (the sweep reads its age from the directory's mtime)."""
    import os

    from sandbox.runtimes.cgroups import CgroupLimits

    groups.create(name, CgroupLimits(0.5, 64 << 20, 32))
    for d in _group_dirs(groups, name):
        os.utime(d, (time.time() - age_s, time.time() - age_s))


def test_an_old_empty_cgroup_without_its_sandbox_directory_is_removed_and_nothing_in_use_is(services):
    import os
    import subprocess

    groups, old_s = services.runtime.cgroups, sweeps.CGROUP_GRACE_S + 60
    names = {kind: f"sbx-{new_job_id(kind)}" for kind in ("left", "ended", "young", "withdir", "busy", "livejob")}
    services.store.create(new_record(names["ended"][4:], JobStatus.SUCCEEDED))
    services.store.create(new_record(names["livejob"][4:], JobStatus.RUNNING))  # e.g. its create is under way
    services.runtime.create(spec_for(names["withdir"][4:]), HOST)  # a live sandbox (no record: young)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for kind, name in names.items():
            _plant(groups, name, 5 if kind == "young" else old_s)
        for procs in groups.procs_files(names["busy"]):
            with open(procs, "w", encoding="ascii") as f:
                f.write(str(sleeper.pid))  # a process of some other work dir's sandbox

        sweeps.sweep_orphans(services)

        def exists(name: str) -> bool:
            return any(os.path.isdir(d) for d in _group_dirs(groups, name))

        assert not exists(names["left"]) and not exists(names["ended"])
        assert all(exists(names[k]) for k in ("young", "withdir", "busy", "livejob"))
        assert sleeper.poll() is None  # never killed: the sweep only removes empty groups
        assert [i.sandbox_id for i in services.runtime.list_sandboxes()] == [names["withdir"]]
    finally:
        sleeper.kill()
        sleeper.wait()
        for name in names.values():
            groups.kill(name)
            groups.remove(name)


def test_removing_a_test_work_dir_also_removes_its_sandboxes_cgroups(runtime):  # runtime: root, bwrap, cgroups
    # The leak the sweep above cleans: a work dir deleted with a sandbox still in it kept its cgroup.
    import os
    import tempfile

    from config.settings import load_settings
    from sandbox.runtimes.local import LocalRuntime
    from tests.support.services import remove_work_dir

    work = tempfile.mkdtemp(prefix="sbx-test-", dir="/tmp")
    os.chmod(work, 0o711)
    runtime = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": work}))
    handle = runtime.create(spec_for(new_job_id("leftover")), HOST)
    assert all(os.path.isdir(d) for d in _group_dirs(runtime.cgroups, handle.sandbox_id))
    remove_work_dir(work)
    assert not os.path.exists(work)
    assert not any(os.path.exists(d) for d in _group_dirs(runtime.cgroups, handle.sandbox_id))


def test_a_sweeps_terminal_write_carries_its_status_event_in_the_same_transaction(redis_client, monkeypatch):
    from sandbox import nodes
    from sandbox.events import EventBus, events_key

    store = JobStore(redis_client, events=EventBus(redis_client))
    job_id = new_job_id("lost")
    store.create(new_record(job_id, JobStatus.RUNNING))

    def died(record):  # a sweep SIGKILLed right after its transaction: nothing runs after it
        raise SystemExit("killed")

    monkeypatch.setattr(store, "publish_status", died)
    ended = nodes.end_if(store, job_id, lambda record, _read: True, "its node died")

    assert ended is not None and ended["status"] == "error"
    events = [json.loads(fields[b"event"]) for _id, fields in redis_client.xrange(events_key(job_id))]
    assert [(e["type"], e["status"]) for e in events][-1] == ("status", "error")
    # a write that is refused (the job is terminal already) adds no event
    assert nodes.end_if(store, job_id, lambda record, _read: True, "again") is None
    assert len(redis_client.xrange(events_key(job_id))) == len(events)


class _Interleaved:
    """The runtime, counting its listings, with work done by others at two moments of a sweep: right
    after the listing returns, and while the sweep destroys its first orphan."""

    def __init__(self, runtime, after_listing, during_destroy) -> None:  # noqa: ANN001
        self.runtime, self.after_listing, self.during_destroy, self.listings = runtime, after_listing, during_destroy, 0

    def list_sandboxes(self):  # noqa: ANN201
        listed = self.runtime.list_sandboxes()
        self.listings += 1
        if self.listings == 1:
            self.after_listing()
        return listed

    def destroy(self, handle) -> None:  # noqa: ANN001
        self.runtime.destroy(handle)
        during, self.during_destroy = self.during_destroy, lambda: None
        during()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.runtime, name)


def test_a_node_sweep_lists_once_and_a_sandbox_created_after_the_listing_is_neither_destroyed_nor_released(
        services, settings, redis_client):
    from sandbox.admission import Admission, Request, admitted_key

    node = new_job_id("node") + "@host"
    admission = Admission(redis_client, node, settings)
    ended, lost_create, late, cancelled = (new_job_id(k) for k in ("ended", "lostcreate", "late", "cancelled"))
    services.store.create(new_record(ended, JobStatus.SUCCEEDED))
    for job_id in (late, cancelled):
        services.store.create(new_record(job_id, JobStatus.CREATING))  # admitted, their creates under way
    small = Request(0.1, 16 << 20, 16 << 20)
    for job_id in (ended, lost_create, late, cancelled):
        assert admission.try_admit(job_id, small) == "ok"
    stale = json.loads(redis_client.hget(admitted_key(node), lost_create))  # a killed worker's create
    redis_client.hset(admitted_key(node), lost_create, json.dumps({**stale, "at": time.time() - 3600}))
    ended_handle = services.runtime.create(spec_for(ended), node)

    def cancel_as_its_create_ends() -> None:
        # a job cancelled while its create finishes, during the sweep's destroys: its sandbox lives
        # (its own cleanup is queued) and keeps its capacity; capacity judged after the destroys, from
        # the older listing, would see an ended job without a sandbox and give the capacity back
        services.runtime.create(spec_for(cancelled), node)
        services.store.transition(cancelled, JobStatus.CANCELLED)

    runtime = _Interleaved(services.runtime, lambda: services.runtime.create(spec_for(late), node),
                           cancel_as_its_create_ends)
    svc = Services(settings=settings, store=services.store, runtime=runtime, artifacts=None, events=None,
                   host=node, admission=admission)
    try:
        destroyed = sweeps.sweep_node(svc, now=time.time() + sweeps.YOUNG_S)

        assert runtime.listings == 1
        assert destroyed == [ended_handle.sandbox_id]  # the ended job's sandbox, and its capacity with it
        # created after the listing: neither destroyed nor released
        assert sorted(i.job_id for i in services.runtime.list_sandboxes()) == sorted([late, cancelled])
        assert set(admission.admitted()) == {late, cancelled}  # the dead create's capacity is back
    finally:
        redis_client.delete(admitted_key(node))
