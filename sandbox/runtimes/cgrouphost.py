"""Finding this host's cgroup hierarchy (v1 or v2) and delegating controllers to it, at start-up.

Kept apart from cgroups.py, which holds what is done per job (create, kill, usage, remove): this
runs once per runtime, reads /proc/self/cgroup and /proc/self/mountinfo, and decides where job
groups live; the per-job code only ever sees the parent directories it returns.
"""
from __future__ import annotations

import os

from sandbox.errors import SandboxFailure
from sandbox.runtimes.cgroups import (PARENT, V1_CONTROLLERS, V2_CONTROLLERS, CgroupV1, CgroupV2, Cgroups,
                                      _read, _write)


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup text."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _v1_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """Controller -> (mount root inside the hierarchy, mount point) for v1 hierarchies."""
    out: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) < 3 or tail[0] != "cgroup":
            continue
        for opt in tail[2].split(","):
            if opt in V1_CONTROLLERS:
                out[opt] = (fields[3], fields[4])
    return out


def _under(mount: tuple[str, str], own: str) -> str:
    root, point = mount
    rel = own[len(root):] if own.startswith(root) else own
    return os.path.join(point, rel.lstrip("/"), PARENT)


def detect(root: str = "/sys/fs/cgroup", v2_parent: str | None = None) -> Cgroups:
    """The cgroup hierarchy of this host: v2 if `root` is unified, else v1; SandboxFailure if neither.

    On a hybrid host (v1 controllers, an empty cgroup2 at /sys/fs/cgroup/unified) `root` is a tmpfs,
    so v1 is used. `v2_parent` overrides where job groups live on v2 (default: "sandbox" under the
    worker's own cgroup, which works only if that cgroup holds no processes, see _delegate_v2).
    """
    own = _own_paths(_read("/proc/self/cgroup"))
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        parent = v2_parent or os.path.join(root, own.get("", "/").lstrip("/"), PARENT)
        _delegate_v2(parent)
        return CgroupV2(parent)
    mounts = _v1_mounts(_read("/proc/self/mountinfo"))
    missing = [c for c in V1_CONTROLLERS if c not in mounts]
    if missing:
        raise SandboxFailure(f"no cgroup v2 at {root} and no v1 hierarchy for {', '.join(missing)}")
    parents = {c: _under(mounts[c], own.get(c, "/")) for c in V1_CONTROLLERS}
    for p in set(parents.values()):
        os.makedirs(p, exist_ok=True)
    return CgroupV1(parents)


def _delegate_v2(parent: str, controllers: tuple[str, ...] = V2_CONTROLLERS) -> None:
    """Enable `controllers` in parent's parent and in `parent`, so each job group under it has them."""
    upper = os.path.dirname(parent)
    available = _read(os.path.join(upper, "cgroup.controllers")).split()
    missing = [c for c in controllers if c not in available]
    if missing:  # checked first, so a failed start-up leaves no directory behind
        raise SandboxFailure(f"cannot delegate cgroup controllers to {parent}: {', '.join(missing)} "
                             f"not available in {upper} (bound to a v1 hierarchy, or not delegated)")
    enable = " ".join(f"+{c}" for c in controllers)
    try:
        _write(os.path.join(upper, "cgroup.subtree_control"), enable)
        os.makedirs(parent, exist_ok=True)
        _write(os.path.join(parent, "cgroup.subtree_control"), enable)
    except OSError as e:
        # EBUSY: `upper` holds processes. v2's no-internal-process rule forbids a non-root cgroup
        # to have both processes and enabled controllers, and the worker's own cgroup holds the
        # worker: run the worker in a leaf of a delegated cgroup (systemd Delegate=yes, worker in
        # <unit>/worker) and pass v2_parent=<unit>/sandbox.
        raise SandboxFailure(f"cannot delegate cgroup controllers to {parent}: {e}") from e
