"""LocalRuntime: a job sandbox on this host from bubblewrap, per-job cgroups, seccomp and a disk image.

Every method works from a fresh process given only the SandboxHandle: all state lives under the
run dir (a tmpfs, see rundir.py), in <run_dir>/<sandbox_id>/ (meta.json, markers, results, the
capped logs, the workspace mounted at mnt/) and <run_dir>/.uids/, except the workspace's disk image,
<work_dir>/images/<sandbox_id>.img. The bubblewrap command line each job runs under is built in
bwrap.py, the shared /etc it binds in hostetc.py.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import time
from typing import IO, Callable

from config.settings import Settings
from sandbox.errors import JobRejected, RuntimeUnavailable, SandboxFailure
from sandbox.runtimes import bwrap, cgrouphost, cgroups, diskimage, dynmods, fsutil, hostetc, rundir, spares, uids
from sandbox.runtimes.base import ExecResult, OutputSink, SandboxHandle, SandboxInfo
from sandbox.egress import EgressService
from sandbox.runtimes import executor, prestart
from sandbox.runtimes.executor import run_job
from sandbox.spec import JOB_ID, JobSpec

log = logging.getLogger("sandbox.runtime")

EXPIRY_MARGIN_S = 900.0  # create + prepare + collect + cleanup around the job's own timeout
MIN_DISK_BYTES = 4 << 20  # ext4 needs room for its own metadata
IMAGE_DIR = "images"  # under the work dir: the only per-sandbox file on its file system (root's, 0700)
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}")


def sandbox_id_for(job_id: str) -> str:
    """The sandbox id of a job: deterministic, so a redelivered create finds the same sandbox."""
    # Any id the contract accepts ('-abc' and '_abc' among them): the "sbx-" prefix is what makes the
    # sandbox id a safe file, cgroup and argv word, so the id itself needs no letter first.
    if not JOB_ID.fullmatch(job_id):
        raise JobRejected("/id", "pattern", f"the id must match {JOB_ID.pattern}")
    return f"sbx-{job_id}"


class LocalRuntime:
    """The Runtime protocol on this Linux host (bubblewrap + cgroups + seccomp + loop ext4)."""

    name = "local"
    pinned = True  # a sandbox lives on the host that made it: later stages run on its node's queue

    def __init__(self, settings: Settings, cgroup_root: str = "/sys/fs/cgroup") -> None:
        self.settings = settings
        self.work_dir = os.path.abspath(settings.work_dir)
        for binary, package in ((bwrap.BWRAP, "bubblewrap"), (executor.SETPRIV, "util-linux")):
            if not os.access(binary, os.X_OK):
                raise SandboxFailure(f"{binary} is missing: install {package}")
        self.cgroups = cgrouphost.detect(cgroup_root, v2_parent=settings.cgroup_parent or None)
        # before the first job: its launcher's cgroup join is what favordynmods makes cheap
        self.favordynmods = dynmods.ensure(settings.cgroup_favor_dynmods)
        os.makedirs(self.work_dir, mode=0o711, exist_ok=True)
        bwrap.check_traversable(self.work_dir, settings.sandbox_uid, settings.sandbox_uid_count)
        self.run_dir = os.path.abspath(settings.run_dir or rundir.default_path(self.work_dir))
        self.run_dir_in_memory = rundir.ensure(self.run_dir, self.work_dir,
                                              rundir.size_bytes(settings.node_max_sandboxes, settings.max_log_bytes))
        bwrap.check_traversable(self.run_dir, settings.sandbox_uid, settings.sandbox_uid_count, rundir.SETTING)
        self.image_dir = os.path.join(self.work_dir, IMAGE_DIR)
        os.makedirs(self.image_dir, mode=0o700, exist_ok=True)
        self.uids = uids.UidPool(self.run_dir, settings.sandbox_uid, settings.sandbox_uid_count)
        self.egress = EgressService(settings)  # its loop thread starts with the first outbound job
        self.prestarts = prestart.Prestarts() if settings.prestart else None
        self.spares = spares.SpareImages(self.work_dir, settings.spare_images) if settings.spare_images else None
        self._metas: dict[str, tuple[tuple[int, int, int], dict]] = {}  # sandbox id -> (stat stamp, meta)

    # -- paths -------------------------------------------------------------------------------
    def _dir(self, sandbox_id: str) -> str:
        if not sandbox_id.startswith("sbx-") or not _SAFE_ID.fullmatch(sandbox_id):
            raise SandboxFailure(f"malformed sandbox id {sandbox_id!r}")
        return os.path.join(self.run_dir, sandbox_id)

    def _image(self, sandbox_id: str) -> str:
        return os.path.join(self.image_dir, sandbox_id + ".img")  # sandbox_id checked by _dir first

    def _meta(self, sandbox_id: str) -> dict | None:
        """The sandbox's meta.json (None: no such sandbox). It never changes after create, so a copy
        read once is kept: a stat shows it is still that file (same inode, mtime and size), one
        syscall where a read took four (each lets the worker's other threads take the GIL)."""
        path = os.path.join(self._dir(sandbox_id), "meta.json")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._metas.pop(sandbox_id, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        kept = self._metas.get(sandbox_id)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        meta = fsutil.read_json(path)
        if meta is not None:
            self._keep_meta(sandbox_id, stamp, meta)
        return meta

    def _keep_meta(self, sandbox_id: str, stamp: tuple[int, int, int], meta: dict) -> None:
        if len(self._metas) >= 4 * self.settings.node_max_sandboxes:
            self._metas.clear()  # only sandboxes destroyed elsewhere linger: start afresh
        self._metas[sandbox_id] = (stamp, meta)

    def host_uid(self, meta: dict) -> int:
        """The host uid the sandbox's processes and files have (SANDBOX_UID for one made before the range)."""
        return int(meta.get("uid", self.settings.sandbox_uid))

    def _require(self, handle: SandboxHandle) -> tuple[str, dict]:
        meta = self._meta(handle.sandbox_id)
        if meta is None:
            raise SandboxFailure(f"sandbox {handle.sandbox_id} does not exist on this host")
        return self._dir(handle.sandbox_id), meta

    # -- lifecycle ---------------------------------------------------------------------------
    def create(self, spec: JobSpec, host: str) -> SandboxHandle:
        """Make the sandbox directory, the workspace disk and the cgroup; idempotent per job id."""
        sid = sandbox_id_for(spec.id)
        meta = self._meta(sid)
        if meta is not None:
            return SandboxHandle.from_dict(meta["handle"])
        d = self._dir(sid)
        if os.path.exists(d) or os.path.lexists(self._image(sid)):  # a create that crashed half-way,
            # or an image a reboot left (its state went with the tmpfs): start again from nothing
            self._teardown(sid)
        now = time.time()
        handle = SandboxHandle(
            sandbox_id=sid, job_id=spec.id, runtime=self.name, host=host, created_at=now,
            expires_at=now + spec.timeout_s + EXPIRY_MARGIN_S,
            data={"cgroup_version": self.cgroups.version},
        )
        try:
            os.mkdir(d, 0o711)  # bwrap runs as the sandbox uid and must reach mnt/
            uid = self.uids.allocate(sid)  # after mkdir: a crash leaves a directory for destroy to find
            etc = hostetc.shared_etc(self.work_dir, bwrap.INSIDE_UID)
            disk = max(MIN_DISK_BYTES, spec.resources.disk_bytes)
            image = self._image(sid)  # after mkdir: an image always has its directory until teardown
            if self.spares is None or not self.spares.take(image, disk):
                diskimage.clone_template(self.work_dir, image, disk)
            diskimage.mount_image(image, os.path.join(d, "mnt"), uid)
            limits = cgroups.CgroupLimits(spec.resources.cpu, spec.resources.memory_bytes,
                                          spec.resources.pids)
            self.cgroups.create(sid, limits)
            meta = {"handle": handle.to_dict(), "disk_bytes": disk, "etc": etc, "uid": uid,
                    "disk_baseline_bytes": fsutil.disk_usage(os.path.join(d, "mnt")).used_bytes}
            # fsynced only on a disk: a reboot empties the tmpfs (and ends the mount, the cgroup and
            # the processes it describes), so no torn meta.json can outlive a crash there
            fsutil.write_json_atomic(os.path.join(d, "meta.json"), meta, durable=not self.run_dir_in_memory)
            st = os.stat(os.path.join(d, "meta.json"))
            self._keep_meta(sid, (st.st_ino, st.st_mtime_ns, st.st_size), json.loads(json.dumps(meta)))  # as read back
        except RuntimeUnavailable:
            self._teardown(sid)
            raise
        except (OSError, subprocess.SubprocessError, SandboxFailure) as e:
            self._teardown(sid)
            raise SandboxFailure(f"could not create sandbox {sid}: {e}") from e
        if self.spares is not None:  # not earlier: a clone beside this create's mount slowed it 2x
            self.spares.refill_later(disk)
        return handle

    def prestart(self, handle: SandboxHandle, spec: JobSpec) -> None:
        """Spawn the job's execute sandbox in the background, held until execute (prestart.py).

        Called once create's stage is recorded: spawned earlier, its set-up competed with create's
        own tail for the two cores. Never raises: without it, execute spawns as before.
        """
        if self.prestarts is None or not prestart.eligible(spec):
            return
        try:
            d, meta = self._require(handle)
            if os.path.exists(os.path.join(d, "cancelled")):
                return
            sid = handle.sandbox_id
            self.prestarts.start(sid, lambda: prestart.spawn(self, d, meta, sid, spec))
        except Exception:  # noqa: BLE001 - an optimisation only; a destroy may have raced it
            log.warning("could not pre-start sandbox %s; execute will start it", handle.sandbox_id, exc_info=True)

    def put_file(self, handle: SandboxHandle, relpath: str, src: IO[bytes], mode: int) -> int:
        """Write `src` to workspace/`relpath` without following links, owned by the sandbox uid."""
        d, meta = self._require(handle)
        try:
            return fsutil.write_beneath(os.path.join(d, "mnt", "workspace"), relpath, src, mode,
                                        self.host_uid(meta))
        except OSError as e:
            if e.errno == 28:  # ENOSPC: the inputs alone exceed the job's disk limit
                raise JobRejected("/files", "disk", f"input {relpath!r} does not fit the disk limit") from e
            raise

    def execute(self, handle: SandboxHandle, spec: JobSpec, sink: OutputSink) -> ExecResult:
        """Run spec.argv once; a redelivered execute returns the first run's result, never re-runs."""
        return self._run_once(handle, spec, sink, "execute")

    def setup(self, handle: SandboxHandle, spec: JobSpec, sink: OutputSink) -> ExecResult:
        """Run the job's setup command once (prepare stage) under the setup's own network policy."""
        return self._run_once(handle, spec.setup_run(), sink, "setup")

    def _run_once(self, handle: SandboxHandle, spec: JobSpec, sink: OutputSink, kind: str) -> ExecResult:
        # execute keeps its first names (result.json, execute.started) for sandboxes made before setup
        result_file, started_file = ("result.json", "execute.started") if kind == "execute" else \
            (f"{kind}-result.json", f"{kind}.started")
        d = self._dir(handle.sandbox_id)
        # the lock is on meta.json, which exists for the sandbox's whole life: no extra file to create
        # (and the meta is read through the same descriptor: one open where there were two)
        try:
            lock_fd = os.open(os.path.join(d, "meta.json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise SandboxFailure(f"sandbox {handle.sandbox_id} does not exist on this host") from e
        held = None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise RuntimeUnavailable(f"execute of {handle.sandbox_id} is already running") from e
            meta = json.loads(fsutil.read_fd(lock_fd))
            # taken under the lock: only the one execute that may run the job touches its cgroup
            held = self._take_held(handle.sandbox_id, spec, kind)
            stored = fsutil.read_json(os.path.join(d, result_file))
            if stored is not None:
                return ExecResult(**stored)
            try:
                fsutil.create_new(os.path.join(d, started_file))  # exists: an earlier run started
            except FileExistsError:
                self.cgroups.kill(handle.sandbox_id)
                result = ExecResult("error", None, None, 0.0,
                                    reason="the worker running this job was lost; not re-run")
            else:
                held, mine = None, held  # run_job releases it or disposes of it
                result = run_job(self, d, meta, handle, spec, sink, log_prefix="" if kind == "execute" else f"{kind}-",
                                 held=mine)
            # Not fsynced: only a host crash could lose it, and that takes the mount and the cgroup
            # with it, so a redelivered execute can never run the job again (it finds the marker,
            # or fails on the missing workspace); the rename still keeps readers from half a file.
            fsutil.write_json_atomic(os.path.join(d, result_file), result.to_dict(), durable=False)
            return result
        finally:
            if held is not None:
                held.dispose(lambda: self.cgroups.kill(handle.sandbox_id))
            os.close(lock_fd)

    def _take_held(self, sid: str, spec: JobSpec, kind: str) -> "prestart.Held | None":
        """This process's pre-started sandbox for the execute, if any. With none where there could
        have been one, whatever is left in the cgroup is killed first: a worker that died after
        create leaves its held bwrap blocked there (never released: see prestart.spawn)."""
        if kind != "execute" or self.prestarts is None or not prestart.eligible(spec):
            return None
        held = self.prestarts.take(sid)
        if held is None:
            self.cgroups.kill(sid)
        return held

    def logs(self, handle: SandboxHandle) -> dict[str, IO[bytes]]:
        """The captured, capped stdout and stderr (empty if the job never ran)."""
        d, _ = self._require(handle)
        out: dict[str, IO[bytes]] = {}
        # unbuffered: the uploads read whole parts, and a buffered open costs three more syscalls
        for stream in ("stdout", "stderr"):
            try:
                out[stream] = open(os.path.join(d, stream), "rb", buffering=0)
            except FileNotFoundError:
                out[stream] = open(os.devnull, "rb", buffering=0)
        for stream in ("setup-stdout", "setup-stderr"):  # only for a job that had a setup command
            try:
                out[stream] = open(os.path.join(d, stream), "rb", buffering=0)
            except FileNotFoundError:
                pass
        return out

    def collect(self, handle: SandboxHandle, dirs: tuple[str, ...]) -> "fsutil.CollectedFiles":
        """Regular files under `dirs`, after killing anything left; `.skipped` lists what was left out."""
        d, _ = self._require(handle)
        self.cgroups.kill(handle.sandbox_id)  # returns only once the group is empty (else it raises)
        s = self.settings
        return fsutil.CollectedFiles(os.path.join(d, "mnt", "workspace"), dirs,
                                     s.max_output_files, s.max_output_file_bytes, s.max_output_bytes)

    def kill(self, handle: SandboxHandle) -> None:
        """Mark the sandbox cancelled, then kill its cgroup; works from any process on this host."""
        d = self._dir(handle.sandbox_id)
        if not os.path.isdir(d):
            return
        fsutil.touch(os.path.join(d, "cancelled"))  # before the kill: execute re-checks after spawn
        self.cgroups.kill(handle.sandbox_id)
        if self.prestarts is not None:  # one held here is reaped now (its execute says "cancelled")
            self.prestarts.discard(handle.sandbox_id, self.cgroups.kill)

    def destroy(self, handle: SandboxHandle) -> None:
        """Kill, unmount, remove the cgroup and the directory; a missing sandbox is fine."""
        self._teardown(handle.sandbox_id)

    def _teardown(self, sid: str) -> None:
        d = self._dir(sid)
        meta = self._meta(sid)
        self._metas.pop(sid, None)
        if self.prestarts is not None:
            self.prestarts.discard(sid, self.cgroups.kill)
        self.cgroups.kill(sid)
        self.cgroups.remove(sid)
        diskimage.unmount(os.path.join(d, "mnt"))
        if fsutil.is_mount_point(os.path.join(d, "mnt")):
            raise SandboxFailure(f"workspace of {sid} is still mounted; not removing it")
        # Only now is the uid unused: no process (the cgroup is gone) and no file (the image is
        # unmounted) has it. Released before the directory goes, so a crash here leaves a
        # directory whose destroy releases it; without meta.json (a half-made create) by a scan.
        self.uids.release(sid, meta.get("uid") if meta is not None else None)
        try:
            os.unlink(self._image(sid))  # before the directory: an image never outlives it but at a reboot
        except FileNotFoundError:
            pass
        fsutil.remove_flat_dir(d)  # our files and the empty mnt/; anything else: shutil.rmtree

    def reap_incomplete(self, older_than: float) -> list[str]:
        """Tear down what list_sandboxes cannot see, last changed before `older_than`: sandbox
        directories without meta.json (a create that died half-way), disk images without a sandbox
        directory (the run dir's tmpfs was emptied by a reboot) and directories of the layout
        before the run dir (<work_dir>/sbx-*). No other sweep would find them."""
        reaped = []
        for name in sorted(os.listdir(self.run_dir)):
            if not name.startswith("sbx-") or not _SAFE_ID.fullmatch(name) or self._meta(name) is not None:
                continue
            if self._older(self._dir(name), older_than):  # else a create may still be under way
                self._teardown(name)
                reaped.append(name)
        lone = [e.removesuffix(".img") for e in sorted(os.listdir(self.image_dir)) if e.endswith(".img")]
        lone = [n for n in lone if n.startswith("sbx-") and _SAFE_ID.fullmatch(n) and not os.path.lexists(self._dir(n))
                and self._older(self._image(n), older_than)]
        attached = diskimage.attached_images() if lone else set()  # live: a worker with another run dir's
        for name in lone:
            if os.path.realpath(self._image(name)) not in attached:
                self._teardown(name)  # its cgroup, uid claim and image; nothing is mounted after a reboot
                reaped.append(name)
        for name in sorted(os.listdir(self.work_dir)):
            d = os.path.join(self.work_dir, name)
            if (name.startswith("sbx-") and _SAFE_ID.fullmatch(name) and d != self.run_dir
                    and self._older(d, older_than)):
                self._teardown_legacy(name, d)
                reaped.append(name)
        return reaped

    @staticmethod
    def _older(path: str, older_than: float) -> bool:
        try:
            return os.lstat(path).st_mtime < older_than
        except FileNotFoundError:
            return False

    def _teardown_legacy(self, sid: str, d: str) -> None:
        """A sandbox of the layout before the run dir (all in <work_dir>/<sid>/, its uid claim in
        <work_dir>/.uids/): later stages no longer find it, so only this sweep ends it."""
        self.cgroups.kill(sid)
        self.cgroups.remove(sid)
        diskimage.unmount(os.path.join(d, "mnt"))
        if os.path.ismount(os.path.join(d, "mnt")):
            raise SandboxFailure(f"workspace of {sid} is still mounted; not removing it")
        legacy_uids = os.path.join(self.work_dir, uids.UID_DIR)
        if os.path.isdir(legacy_uids) and not os.path.islink(legacy_uids):
            for e in os.scandir(legacy_uids):
                if e.name.isdigit() and e.is_symlink() and os.readlink(e.path) == sid:
                    os.unlink(e.path)
        shutil.rmtree(d)

    def reap_cgroups(self, older_than: float, keep: Callable[[str], bool]) -> list[str]:
        """Remove job cgroups (`sbx-<safe id>`) made before `older_than` that hold no process and
        whose sandbox directory this work dir does not have, unless `keep(sandbox_id)`. A work dir
        deleted under live sandboxes leaves them, and no directory walk can find them. Never kills:
        a group with a process belongs to a running sandbox, maybe of another work dir on this host."""
        removed = []
        for name, made_at in sorted(cgroups.idle_groups(self.cgroups, "sbx-").items()):
            if made_at >= older_than or not _SAFE_ID.fullmatch(name):
                continue
            if os.path.lexists(self._dir(name)) or os.path.lexists(self._image(name)) or keep(name):
                continue
            try:
                self.cgroups.remove(name)  # rmdir: the kernel refuses a group a process joined meanwhile
            except OSError:
                continue
            removed.append(name)
        return removed

    def list_sandboxes(self) -> list[SandboxInfo]:
        """Every sandbox with a meta file under the run dir."""
        found = []
        for name in sorted(os.listdir(self.run_dir)):
            if not name.startswith("sbx-") or not _SAFE_ID.fullmatch(name):
                continue
            meta = self._meta(name)
            if meta is None:
                continue
            h = meta["handle"]
            found.append(SandboxInfo(h["sandbox_id"], h["job_id"], h["host"], h["created_at"], h["expires_at"]))
        return found
