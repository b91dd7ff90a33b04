#!/usr/bin/env bash
# Install rootful podman, podman-compose and debootstrap on Debian bookworm (as root), and let podman run
# containers on a host whose root may not raise resource limits (no CAP_SYS_RESOURCE, e.g. inside a VM
# sandbox or a container) or whose cgroups are a v1 + v2 hybrid: there crun fails with
#   crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied
#   crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2
# and this script writes /etc/containers/containers.conf with runc as the runtime and default rlimits
# within the host's hard limits. On an ordinary host it installs the packages only.
#   sudo bash deploy/containers/setup-podman.sh
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup-podman.sh: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq podman podman-compose debootstrap runc >/dev/null
podman --version

capeff="$(awk '/^CapEff/ {print $2}' /proc/self/status)"
no_sys_resource=$(( (16#$capeff >> 24 & 1) == 0 ))   # CAP_SYS_RESOURCE is capability 24
hybrid=0
[ -d /sys/fs/cgroup/unified ] && hybrid=1
conf=/etc/containers/containers.conf
if [ "$no_sys_resource" = 0 ] && [ "$hybrid" = 0 ]; then
  echo "root may raise rlimits and cgroups are not hybrid: podman's defaults kept"
  exit 0
fi
if [ -e "$conf" ] && ! grep -q '^# written by scgnn-scale' "$conf"; then
  echo "$conf exists and was not written by this script: left as it is" >&2
  exit 0
fi
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
pid_max="$(cat /proc/sys/kernel/pid_max)"
[ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc="$pid_max"
[ "$nofile" = unlimited ] && nofile=1048576
cat >"$conf" <<CONF
# written by scgnn-scale deploy/containers/setup-podman.sh: root here cannot raise rlimits
# (CAP_SYS_RESOURCE missing: $no_sys_resource) or cgroups are hybrid v1 + v2 ($hybrid), which crun refuses
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
CONF
echo "wrote $conf:"
cat "$conf"
