"""The gate every sandbox spawn is held on until the worker lets it go (executor.spawn_gated).

bwrap is spawned with --info-fd and a read-write --block-fd: it says its child's pid, then its
child blocks before seccomp and the exec until our byte comes. The byte is written only once
waiting is over (Gate.wait_ready) and nothing failed; a worker that dies first never writes it.
"""
from __future__ import annotations

import json
import os
import selectors
import time

from sandbox.errors import SandboxFailure


def _wait_until_joined(joined_r: int, timeout_s: float = 5.0) -> bool:
    """Block until the launcher has joined every cgroup: its byte on `joined_r`, or EOF if it died.

    Popen returns once the launcher has started, before it joined: a cancel that killed the
    cgroup in between would find it empty. After this, a kill of the cgroup reaches the job.
    A pipe rather than polling cgroup.procs: no sleep loop burning the worker's CPU, and we wake
    the moment the launcher writes.
    """
    with selectors.DefaultSelector() as sel:
        sel.register(joined_r, selectors.EVENT_READ)
        if sel.select(timeout=timeout_s):
            return os.read(joined_r, 1) == b"\n"
    return False


def held_gate() -> tuple[int, int]:
    """A shut --block-fd gate: (the fd to hand bwrap, our write end; a byte there is the go-ahead).

    bwrap ignores what its read of --block-fd returns, so EOF is a go-ahead: with an ordinary read
    end, a worker that died before its byte let the command run unwatched, and again on
    redelivery. Reopened read-write, bwrap's fd is a writer of its own pipe too: it never sees EOF
    and stays blocked until a byte comes or its cgroup is killed. bwrap closes it before the
    command: the job never has it.
    """
    read_end, gate_w = os.pipe2(os.O_CLOEXEC)
    try:
        block_fd = os.open(f"/proc/self/fd/{read_end}", os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        os.close(gate_w)
        raise
    finally:
        os.close(read_end)
    return block_fd, gate_w


def open_gate(gate_w: int) -> None:
    """The go-ahead, then our end closes (if bwrap already died, its exit says so elsewhere)."""
    try:
        os.write(gate_w, b"g")
    except OSError:
        pass
    finally:
        os.close(gate_w)


class Gate:
    """What holds one spawn before its command: bwrap's child's pid out (--info-fd), a go-ahead in
    (--block-fd, read-write: see held_gate), and the launcher's "joined its cgroups" pipe.

    When the go-ahead is safe, from bubblewrap's source (bubblewrap.c; v0.8.0 line numbers, the
    order is the same at main): the outer bwrap (the launcher's own pid, whose parent is the
    spawning worker thread) arms --die-with-parent (handle_die_with_parent, l.2933) before it
    writes --info-fd (l.2935-2942), and only then lets its child go on (child_wait_fd, l.2960).
    The child reads --block-fd (l.3239) before it forks pid 1 and the command (l.3292); both arm
    their own parent-death signal after that read (do_init l.616, l.3337 before the exec). So
    once the launcher joined and --info-fd is read, a worker's death kills the outer bwrap, and
    its child, blocked on a gate that never sees EOF, only ever dies with the cgroup. What no
    signal from bwrap can prove is the few syscalls between its read of our byte and pid 1's
    prctl: a worker dying in exactly that window leaves the command to the orphan sweep.
    """

    def __init__(self) -> None:
        self.info_r, self.info_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.block_fd, self.gate_w = held_gate()
        except BaseException:
            os.close(self.info_r)
            os.close(self.info_w)
            raise
        self.joined_r = -1  # set by spawn_gated; closed once read
        self.pid: int | None = None
        self.failure: SandboxFailure | None = None

    def bwrap_args(self) -> tuple[str, ...]:
        return ("--info-fd", str(self.info_w), "--block-fd", str(self.block_fd))

    def child_fds(self) -> tuple[int, int]:
        """bwrap's ends, which spawn_sandbox hands over and closes."""
        return (self.info_w, self.block_fd)

    def wait_ready(self, timeout_s: float = 10.0) -> int:
        """Block until the go-ahead is safe: the launcher joined the job's cgroups (a kill of the
        cgroup reaches it from then on) and the outer bwrap armed --die-with-parent (it said its
        child's pid). That pid, or SandboxFailure; later calls give the same answer at once."""
        if self.pid is None and self.failure is None:
            try:
                if self.joined_r < 0 or self.info_r < 0:  # shut, or never spawned: nothing to wait for
                    raise SandboxFailure("the gate was closed before the sandbox was ready")
                joined_r, self.joined_r = self.joined_r, -1
                try:
                    joined = _wait_until_joined(joined_r, min(timeout_s, 5.0))
                finally:
                    os.close(joined_r)
                if not joined:
                    raise SandboxFailure("the launcher did not join the job's cgroups")
                self.pid = self._child_pid(timeout_s)
            except SandboxFailure as e:
                self.failure = e
        if self.failure is not None:
            raise SandboxFailure(str(self.failure))
        assert self.pid is not None
        return self.pid

    def _child_pid(self, timeout_s: float) -> int:
        """The pid of bwrap's child (in the new namespaces), from the JSON bwrap writes to --info-fd."""
        raw = b""
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.info_r, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(self.info_r, 4096)
                    if not chunk:
                        break
                    raw += chunk
                    try:
                        return int(json.loads(raw)["child-pid"])
                    except ValueError:
                        continue  # not the whole object yet
        raise SandboxFailure(f"bwrap gave no child pid (read {raw[:200]!r})")

    def release(self) -> None:
        """Let the command start; close our ends. Only after wait_ready answered."""
        if self.pid is None:  # a caller's mistake, never the job's: fail closed, whatever -O strips
            self.shut()
            raise SandboxFailure("the go-ahead was asked for before the sandbox was ready; the gate stays shut")
        gate_w, self.gate_w = self.gate_w, -1
        try:
            open_gate(gate_w)
        finally:
            self._close()

    def shut(self) -> None:
        """Close our ends with no go-ahead: bwrap's read-write gate never sees EOF, so the command
        never starts; only a cgroup kill ends the blocked sandbox. Safe to call more than once."""
        gate_w, self.gate_w = self.gate_w, -1
        try:
            if gate_w >= 0:
                os.close(gate_w)
        finally:
            self._close()

    def _close(self) -> None:
        for name in ("info_r", "joined_r"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
