"""bench/hostmounts.py: which of the host's mounts belong to another sandbox work dir."""
from bench.hostmounts import mount_points, sandbox_mounts


def test_workspaces_and_run_dirs_of_work_dirs_are_found(tmp_path):
    work = tmp_path / "work"
    (work / ".templates").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    points = ["/", "/proc", str(work / "run"), str(work / "run" / "sbx-j1" / "mnt"),
              str(tmp_path / "plain" / "run"),  # a `run` with no .templates beside it: not a work dir
              "/srv/mnt", "/srv/sbx-x"]          # neither a workspace's mount point
    assert sandbox_mounts(points) == [str(work / "run"), str(work / "run" / "sbx-j1" / "mnt")]


def test_mount_points_reads_this_namespace():
    points = mount_points()
    assert "/" in points and "/proc" in points
