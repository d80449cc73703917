"""A job's bubblewrap: the binary, its command line (namespaces, the read-only root, the shared
/etc, the workspace binds, the fixed environment), the uid every job sees itself as, and what bwrap
needs of the host's directories.

Separate from local.py: none of it holds per-runtime state. The command line is a function of the
sandbox directory, its meta.json and the job's spec alone, built by the executor for every spawn
(execute's and a pre-start's alike), so what every job runs under can be read in one place.
"""
from __future__ import annotations

import os

from sandbox.egress import proxy_env
from sandbox.errors import ConfigError
from sandbox.runtimes import hostetc
from sandbox.spec import JobSpec

BWRAP = "/usr/bin/bwrap"
# The uid every job sees itself as inside its user namespace ("sandbox" in its /etc/passwd). Its
# host uid is its own, from SANDBOX_UID..SANDBOX_UID+SANDBOX_UID_COUNT-1 (see uids.py).
INSIDE_UID = 65534

# Set for every job, after its own variables (the policy refuses these names in a job anyway).
# Tools that read config from $HOME or a system file are pointed at nothing, so a dotfile among a
# job's inputs (.curlrc, .wgetrc, .gitconfig, a planted bare repository's hooks) changes nothing.
# wget's (both its user and its system file) is the shared /etc's empty one: wget refuses a WGETRC
# that is not a regular file, so /dev/null would stop every wget job before it read its arguments.
_WGETRC = "/etc/" + hostetc.EMPTY_WGETRC
_GIT_CONFIG = {"core.fsmonitor": "false", "core.hooksPath": "/dev/null", "safe.bareRepository": "explicit",
               "protocol.allow": "never", "protocol.https.allow": "always"}
FIXED_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/workspace", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
    "CURL_HOME": "/dev/null", "WGETRC": _WGETRC, "SYSTEM_WGETRC": _WGETRC, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_COUNT": str(len(_GIT_CONFIG)),
    **{f"GIT_CONFIG_{kind}_{i}": text for i, (key, value) in enumerate(_GIT_CONFIG.items())
       for kind, text in (("KEY", key), ("VALUE", value))},
}


def check_traversable(path: str, first_uid: int, count: int, setting: str = "SANDBOX_WORK_DIR") -> None:
    """bwrap runs as a sandbox uid, so every uid of the range must be able to walk down to every
    sandbox directory: o+x (an owner's u+x covers one uid only, so it counts only for a range of one)."""
    current = path
    while True:
        st = os.stat(current)
        if not (st.st_mode & 0o001 or (count == 1 and st.st_uid == first_uid and st.st_mode & 0o100)):
            raise ConfigError(setting, f"{current} must be searchable (o+x) by every sandbox uid "
                              f"(SANDBOX_UID {first_uid}, SANDBOX_UID_COUNT {count}); "
                              "use a directory like /var/lib/sandbox with mode 0711")
        if current == "/":
            return
        current = os.path.dirname(current)


def job_argv(d: str, meta: dict, spec: JobSpec, seccomp_fd: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The bubblewrap command line for one job in sandbox directory `d`."""
    etc = meta.get("etc")  # the shared /etc recorded at create
    # Inside its user namespace every job is INSIDE_UID, whatever host uid it has (uid_map maps
    # that one host uid to it): one small shared /etc serves the whole range.
    uid = str(INSIDE_UID)
    argv = [
        BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--new-session", "--cap-drop", "ALL", "--uid", uid, "--gid", uid,
        "--hostname", "sandbox", "--clearenv",
        "--ro-bind", "/usr", "/usr", "--tmpfs", "/usr/local/etc",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
    ]
    if etc:
        argv += ["--ro-bind", etc, "/etc"]  # synthetic files plus copies of hostetc.HOST_ETC
    else:  # a sandbox created before the shared /etc: its own etc/ with the host files bound on
        argv += ["--ro-bind", os.path.join(d, "etc"), "/etc"]
        for path in hostetc.HOST_ETC:
            argv += ["--ro-bind-try", path, path]
    argv += [
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm",
        "--bind", os.path.join(d, "mnt", "workspace"), "/workspace",
        "--bind", os.path.join(d, "mnt", "tmp"), "/tmp",
        # /dev and the /usr/local/etc mask are tmpfs mounts of their own that `--remount-ro /`
        # does not reach (the job owns them): only /dev/shm (POSIX shm, semaphores) stays writable.
        "--remount-ro", "/usr/local/etc", "--remount-ro", "/dev",
        "--remount-ro", "/", "--chdir", "/workspace",
        "--add-seccomp-fd", str(seccomp_fd), *extra,
    ]
    env = {k: v for k, v in spec.environment.items() if k and "=" not in k and "\0" not in k + v}
    env.update(FIXED_ENV)
    if spec.network.outbound:
        env.update(proxy_env())  # the one way out; /etc/resolv.conf has no nameserver
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv + ["--", *spec.argv]
