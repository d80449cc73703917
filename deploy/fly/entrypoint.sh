#!/bin/sh
# The machine's main process: root in its own Firecracker VM (a kernel of its own), so the cgroup
# hierarchy and the loop devices are the agent's to use. Exits when the agent does; with
# `auto_destroy` and restart policy "no" the machine is then gone. Never run this on a shared host:
# it mounts cgroup2 over /sys/fs/cgroup when nothing is mounted there.
set -eu
if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && ! grep -qE " /sys/fs/cgroup(/| )" /proc/self/mountinfo; then
    mkdir -p /sys/fs/cgroup
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "sandbox-agent: could not mount cgroup2" >&2
fi
own=$(sed -n 's/^0:://p' /proc/self/cgroup)
if [ -e /sys/fs/cgroup/cgroup.controllers ] && [ -n "$own" ] && [ "$own" != "/" ] \
        && [ -z "${SANDBOX_CGROUP_PARENT:-}" ]; then
    # Not in the root cgroup (init made one): a v2 cgroup holding processes cannot hand controllers
    # down, so this process moves to a leaf of its own and the jobs' groups go in a sibling.
    mkdir -p "/sys/fs/cgroup$own/agent"
    echo $$ > "/sys/fs/cgroup$own/agent/cgroup.procs"
    export SANDBOX_CGROUP_PARENT="/sys/fs/cgroup$own/sandbox"
fi
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
mkdir -p "${SANDBOX_WORK_DIR:-/var/lib/sandbox}"
chmod 0711 "${SANDBOX_WORK_DIR:-/var/lib/sandbox}"
cd /opt/sandbox
exec /opt/sandbox/venv/bin/python -m sandbox.agent
