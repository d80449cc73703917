#!/bin/sh
# The machine's main process: root in its own Firecracker VM (a kernel of its own), so the whole
# cgroup hierarchy and the loop devices are the agent's to use. Exits when the agent does; with
# `auto_destroy` and restart policy "no" the machine is then gone.
set -eu
if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "sandbox-agent: could not mount cgroup2" >&2
fi
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
mkdir -p "${SANDBOX_WORK_DIR:-/var/lib/sandbox}"
chmod 0711 "${SANDBOX_WORK_DIR:-/var/lib/sandbox}"
cd /opt/sandbox
exec /opt/sandbox/venv/bin/python -m sandbox.agent
