"""The seccomp filter every job runs under, compiled once to BPF and handed to bwrap by fd."""
from __future__ import annotations

import errno
import functools
import os

# Syscalls a job never needs and that widen the kernel attack surface: namespace and mount
# games, kernel keyrings, eBPF, io_uring (bypasses seccomp for the ops it carries), tracing,
# module and kexec loading, perf, userfaultfd (a classic exploit primitive), clock/time setting.
DENIED_SYSCALLS: tuple[str, ...] = (
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "quotactl_fd",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime",
    "iopl", "ioperm", "vhangup", "nfsservctl", "uselib", "_sysctl",
    "fanotify_init", "pidfd_getfd",
)

# Address families that are not isolated by a network namespace (AF_VSOCK reaches the
# hypervisor) or expose large, bug-prone kernel code (AF_ALG, AF_PACKET raw frames, AF_KEY...).
DENIED_SOCKET_FAMILIES: dict[str, int] = {
    "AF_KEY": 15, "AF_PACKET": 17, "AF_ALG": 38, "AF_VSOCK": 40, "AF_BLUETOOTH": 31,
    "AF_ATMPVC": 8, "AF_AX25": 3, "AF_IPX": 4, "AF_APPLETALK": 5, "AF_NETROM": 6,
    "AF_ROSE": 11, "AF_DECnet": 12, "AF_X25": 9, "AF_RDS": 21, "AF_IRDA": 23,
    "AF_LLC": 26, "AF_CAN": 29, "AF_TIPC": 30, "AF_PPPOX": 24, "AF_XDP": 44, "AF_MCTP": 45,
}

# personality() flags that switch off exploit mitigations (ASLR, NX, the mmap floor). Note that
# the query form personality(0xffffffff) has these bits set too and is refused as well.
_PERSONALITY_DENIED_BITS = (0x0040000, 0x0400000, 0x0100000, 0x0200000, 0x8000000)


@functools.lru_cache(maxsize=1)
def filter_bpf() -> bytes:
    """The compiled BPF program (deny-list, EPERM), cached for the life of the process."""
    import pyseccomp as sc  # imported lazily: libseccomp is only needed where jobs run

    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(eperm, name)
        except (OSError, RuntimeError, ValueError):
            continue  # unknown on this architecture or libseccomp version: nothing to deny
    for family in DENIED_SOCKET_FAMILIES.values():
        f.add_rule(eperm, "socket", sc.Arg(0, sc.EQ, family))
        f.add_rule(eperm, "socketpair", sc.Arg(0, sc.EQ, family))
    # clone3 passes its flags in memory seccomp cannot read; ENOSYS makes libc fall back to clone,
    # whose flags we can see (and --disable-userns already caps user namespaces at the kernel).
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for bit in _PERSONALITY_DENIED_BITS:
        f.add_rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb", closefd=True) as out:
            f.export_bpf(out)
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    return b"".join(chunks)


def filter_fd() -> int:
    """A fresh memfd holding the BPF, positioned at 0, for bwrap's --add-seccomp-fd (caller closes)."""
    fd = os.memfd_create("sandbox-seccomp", os.MFD_CLOEXEC)
    try:
        data = filter_bpf()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
