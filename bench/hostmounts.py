"""The host's mount table, printed beside every benchmark's figures.

bubblewrap reads the whole of /proc/self/mountinfo once per bind it makes (bind-mount.c,
`bind_mount` -> `parse_mountinfo`): 13 times for one of our sandboxes. Each mount on the host
(a live sandbox's workspace, the run dir of another work dir, a mount some earlier run left
behind) makes every sandbox start slower, so figures taken beside other mounts are not comparable.
"""
from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def mount_points() -> list[str]:
    """Every mount point of this process's mount namespace (octal escapes of mountinfo left as they are)."""
    return [line.split(" ", 5)[4] for line in MOUNTINFO.read_text().splitlines() if line]


def sandbox_mounts(points: list[str]) -> list[str]:
    """Mount points that belong to a sandbox work dir: a workspace (`.../sbx-*/mnt`) or a run dir's
    tmpfs (`<work dir>/run` beside its `.templates`)."""
    found = []
    for point in points:
        parent, name = os.path.split(point)
        if name == "mnt" and os.path.basename(parent).startswith("sbx-"):
            found.append(point)
        elif name == "run" and os.path.isdir(os.path.join(parent, ".templates")):
            found.append(point)
    return found


def describe() -> str:
    """One line: how many mounts the host has now, and how many are another work dir's sandboxes."""
    points = mount_points()
    theirs = sandbox_mounts(points)
    line = f"host mount table: {len(points)} mounts, {len(theirs)} of them other sandbox work dirs'"
    if theirs:
        line += (" (live sandboxes or left by an earlier run: bwrap reads the whole table 13 times per"
                 " sandbox start, so these figures run slower than on an empty host; docs/capacity.md)")
    return line
