#!/usr/bin/env bash
# A single-node SLURM on this host (slurmctld + slurmd on localhost, munged for their authentication), for
# trying and testing `scgnn-scale slurm` without a cluster; or stop it.
#   bash deploy/slurm/start-local-slurm.sh [--install]   start it; --install first runs
#                                                         apt-get install -y --no-install-recommends slurm-wlm munge
#   bash deploy/slurm/start-local-slurm.sh stop          cancel its jobs, stop the daemons, remove its state
#                                                         (the logs are kept)
# Then point SLURM's commands at it:  export SLURM_CONF=$SCGNN_SLURM_STATE/slurm.conf
#
# Nothing outside the state directory is written or read (no /etc/slurm, /etc/munge, /run, systemd):
#   ${SCGNN_SLURM_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/scgnn-scale/slurm}
# holds slurm.conf, munge's key and socket, the daemons' pid files, spool and logs. One node, named
# localhost at 127.0.0.1, with the CPUs and memory that `slurmd -C` finds; one partition, $SLURM_PARTITION
# (default "local"). Ports: $SLURMCTLD_PORT (default 6817) and $SLURMD_PORT (default 6818).
# No cgroups (a container has no writable cgroup tree and no systemd): processes are tracked by
# proctrack/linuxproc, tasks are not bound (task/none), a job's --mem is booked, not enforced.
# Made for root in a container (tested on Debian 12, slurm-wlm 22.05); slurmd starts jobs as their user.
set -euo pipefail
state="${SCGNN_SLURM_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/scgnn-scale/slurm}"
ctld_port="${SLURMCTLD_PORT:-6817}"
d_port="${SLURMD_PORT:-6818}"
partition="${SLURM_PARTITION:-local}"
cluster=scgnn-local
conf="$state/slurm.conf"
run="$state/run"                     # sockets and pid files: munged wants its socket's directory a+x
export SLURM_CONF="$conf"            # for sinfo/squeue/scancel below and the daemons

# the pid in pid file $1 when that process is alive, else nothing
alive_pid() {
  local p
  [ -f "$1" ] || return 0
  p="$(cat "$1" 2>/dev/null)" || return 0
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"
  return 0
}

# what outlived the daemons (stop's last resort, after slurmd is gone): processes given the marker
# SCGNN_LOCAL_SLURM=$state at start, the processes of this cluster's jobs (SLURM sets
# SLURM_WORKING_CLUSTER=<cluster>:127.0.0.1:<slurmctld port>:... in a job's environment), and the
# slurmstepd above those (it overwrites its own environment with its title, so it is found as their parent)
leftovers() {
  local d env ppid args
  for d in /proc/[0-9]*; do
    env="$(tr '\0' '\n' 2>/dev/null <"$d/environ")" || continue
    case $'\n'"$env" in
      *$'\n'"SCGNN_LOCAL_SLURM=$state"$'\n'*) echo "${d#/proc/}" ;;
      *$'\n'"SLURM_WORKING_CLUSTER=$cluster:127.0.0.1:$ctld_port:"*)
        echo "${d#/proc/}"
        ppid="$(ps -o ppid= -p "${d#/proc/}" 2>/dev/null | tr -d ' ')" || continue
        args="$(ps -o args= -p "$ppid" 2>/dev/null)" || continue
        case "$args" in slurmstepd:*) echo "$ppid" ;; esac ;;
    esac
  done | sort -u
  return 0
}

stop() {
  [ -d "$state" ] || { echo "no local SLURM started (no $state)"; return 0; }
  local ctld p i
  # the port this cluster was started with (it names its jobs' processes, see leftovers)
  [ -f "$conf" ] && ctld_port="$(sed -n 's/^SlurmctldPort=//p' "$conf")"
  ctld="$(alive_pid "$run/slurmctld.pid")"
  if [ -n "$ctld" ] && [ -f "$conf" ]; then
    # cancel every job of this cluster first, so that slurmd ends their processes itself
    p="$(squeue -h -o %i 2>/dev/null)" || p=""
    # shellcheck disable=SC2086  # one job id a word
    [ -n "$p" ] && scancel --quiet $p 2>/dev/null || true
    for i in $(seq 60); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  for name in slurmd slurmctld; do
    p="$(alive_pid "$run/$name.pid")"
    [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
  done
  for i in $(seq 40); do
    [ -z "$(alive_pid "$run/slurmd.pid")$(alive_pid "$run/slurmctld.pid")" ] && break
    sleep 0.25
  done
  for name in slurmd slurmctld; do
    p="$(alive_pid "$run/$name.pid")"
    [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
  done
  p="$(alive_pid "$run/munged.pid")"
  if [ -n "$p" ]; then
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  fi
  p="$(leftovers)"
  # shellcheck disable=SC2086  # one pid a word
  [ -n "$p" ] && kill -KILL $p 2>/dev/null || true
  # the logs stay (slurmctld.log, slurmd.log, munged.log, jobcomp.log: one line per finished job)
  rm -rf "$run" "$state/munge" "$state/ctld" "$state/spool" "$conf"
  echo "stopped the local SLURM (logs in $state)"
}

install() {
  command -v apt-get >/dev/null || { echo "--install needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
}

# start "$@" in the background, in its own session, output appended to log $1, its pid into file $2
launch() {
  local log="$1" pidfile="$2"
  shift 2
  SCGNN_LOCAL_SLURM="$state" setsid "$@" </dev/null >>"$log" 2>&1 &
  echo $! >"$pidfile"
}

fail() {
  echo "$1" >&2
  local f
  for f in "$state"/munged.log "$state"/slurmctld.log "$state"/slurmd.log; do
    [ -s "$f" ] && { echo "--- $f ends with:" >&2; tail -n 5 "$f" >&2; }
  done
  stop >/dev/null
  exit 1
}

case "${1:-}" in
  stop) stop; exit 0 ;;
  --install) install ;;
  "") ;;
  *) echo "usage: bash deploy/slurm/start-local-slurm.sh [--install | stop]" >&2; exit 2 ;;
esac

for cmd in munged slurmctld slurmd sinfo; do
  command -v "$cmd" >/dev/null || {
    echo "$cmd: not found; install SLURM with: apt-get install -y --no-install-recommends slurm-wlm munge" \
         "(or run this script with --install)" >&2
    exit 1
  }
done
for name in munged slurmctld slurmd; do
  if [ -n "$(alive_pid "$run/$name.pid")" ]; then
    echo "a local SLURM started earlier is still running (state in $state); stop it first:" >&2
    echo "  bash deploy/slurm/start-local-slurm.sh stop" >&2
    exit 1
  fi
done
for port in "$ctld_port" "$d_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use; choose others with SLURMCTLD_PORT=... SLURMD_PORT=..." >&2
    exit 1
  fi
done

rm -rf "$run" "$state/munge" "$state/ctld" "$state/spool"
mkdir -p "$state" "$run" "$state/munge" "$state/ctld" "$state/spool"
chmod 755 "$run"
chmod 700 "$state/munge"             # munged refuses a key that others can read
: >"$state/munged.log"; : >"$state/slurmctld.log"; : >"$state/slurmd.log"
user="$(id -un)"

# munge: a key of its own, its own socket (AuthInfo below tells SLURM where). --force: munged refuses a
# socket under a directory that others cannot enter (a 0700 home or test directory); every daemon and
# command here runs as this user, who can
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
SCGNN_LOCAL_SLURM="$state" munged --force --key-file="$state/munge/munge.key" --socket="$run/munge.socket.2" \
  --pid-file="$run/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munge/munged.seed" \
  || fail "munged did not start"

# the node as slurmd sees it (CPUs, sockets, cores, RealMemory), renamed localhost
node="$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')"
cat >"$conf" <<EOF
# written by deploy/slurm/start-local-slurm.sh: one node on localhost, state under $state
ClusterName=$cluster
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$run/munge.socket.2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$run/slurmctld.pid.daemon
SlurmdPidFile=$run/slurmd.pid.daemon
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
# no cgroups here: track processes through /proc, bind no tasks, gather no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# no slurmdbd, so no sacct: finished jobs are listed in jobcomp.log instead
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.log
MpiDefault=none
MailProg=/bin/true
# cores and memory are booked per job, so several small jobs share the node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=$partition Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# -D: in the foreground of their own session, so that the pid we keep is the daemon's
launch "$state/slurmctld.log" "$run/slurmctld.pid" slurmctld -D -f "$conf"
launch "$state/slurmd.log" "$run/slurmd.pid" slurmd -D -f "$conf" -N localhost

# wait until the node is idle (up to 60 s)
for _ in $(seq 120); do
  [ -n "$(alive_pid "$run/slurmctld.pid")" ] || fail "slurmctld exited"
  [ -n "$(alive_pid "$run/slurmd.pid")" ] || fail "slurmd exited"
  [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] || fail "the node did not become idle within 60 s"
sinfo
echo "local SLURM running: partition $partition, node localhost ($node)"
echo "  export SLURM_CONF=$conf"
echo "state and logs in $state; stop with: bash deploy/slurm/start-local-slurm.sh stop"
