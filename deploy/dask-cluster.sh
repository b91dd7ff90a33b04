#!/usr/bin/env bash
# Start a Dask scheduler and N workers on this host (for testing the --scheduler path), or stop them.
#   bash deploy/dask-cluster.sh [N]    start a scheduler on 127.0.0.1:$PORT (default 8786) and N workers
#                                      (default 2); prints the address to pass as --scheduler
#   bash deploy/dask-cluster.sh stop   stop the scheduler and workers that the start left running
# Nothing is written to the current directory: the pid file (pids) and the logs (scheduler.log,
# workers.log) are kept in the state directory
#   ${SCGNN_DASK_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/scgnn-scale/dask}
set -euo pipefail
state="${SCGNN_DASK_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/scgnn-scale/dask}"
pids="$state/pids"
port="${PORT:-8786}"

# the target of kill for a started pid: its process group when it leads one (setsid), else the pid alone;
# nothing when the pid is gone or is no longer a dask process (a stale pid file)
target() {
  local args pgid
  args="$(ps -o args= -p "$1" 2>/dev/null)" || return 0
  case "$args" in *dask*) ;; *) return 0 ;; esac
  pgid="$(ps -o pgid= -p "$1" 2>/dev/null)" || return 0
  pgid="${pgid//[[:space:]]/}"
  if [ "$pgid" = "$1" ]; then echo "-$1"; else echo "$1"; fi
}

stop() {
  [ -f "$pids" ] || { echo "no cluster started (no $pids)"; return 0; }
  local p t targets=()
  # workers first (the lines after the first), then the scheduler
  for p in $(tail -n +2 "$pids") $(head -n 1 "$pids"); do
    t="$(target "$p")"
    [ -n "$t" ] && targets+=("$t") && kill -TERM -- "$t" 2>/dev/null || true
  done
  for _ in $(seq 40); do
    local alive=0
    for t in ${targets[@]+"${targets[@]}"}; do kill -0 -- "$t" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.25
  done
  for t in ${targets[@]+"${targets[@]}"}; do kill -KILL -- "$t" 2>/dev/null || true; done
  rm -f "$pids"
  echo "stopped (logs in $state)"
}

# run "$@" in the background with its output appended to log $1, in its own process group where setsid exists
launch() {
  local log="$1"
  shift
  if command -v setsid >/dev/null; then
    setsid "$@" </dev/null >>"$log" 2>&1 &
  else
    "$@" </dev/null >>"$log" 2>&1 &
  fi
  echo $! >>"$pids"
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
fi
n="${1:-2}"
case "$n" in '' | *[!0-9]*) echo "usage: bash deploy/dask-cluster.sh [N | stop]" >&2; exit 2 ;; esac
command -v dask >/dev/null || { echo "dask: command not found; activate the environment of scgnn-scale" >&2; exit 1; }
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port on 127.0.0.1 is in use; choose another with PORT=..." >&2
  exit 1
fi
mkdir -p "$state"
if [ -f "$pids" ]; then
  for p in $(cat "$pids"); do
    if [ -n "$(target "$p")" ]; then
      echo "a cluster started earlier is still running (pids in $pids); stop it first:" >&2
      echo "  bash deploy/dask-cluster.sh stop" >&2
      exit 1
    fi
  done
  rm -f "$pids"
fi
: >"$state/scheduler.log"
: >"$state/workers.log"
launch "$state/scheduler.log" dask scheduler --host 127.0.0.1 --port "$port" --no-dashboard
# wait for the scheduler to listen (up to 30 s)
for _ in $(seq 120); do
  if [ -z "$(target "$(head -n 1 "$pids")")" ]; then
    echo "the scheduler did not start; its log ($state/scheduler.log) ends with:" >&2
    tail -n 5 "$state/scheduler.log" >&2
    rm -f "$pids"
    exit 1
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.25
done
for _ in $(seq "$n"); do
  launch "$state/workers.log" dask worker "tcp://127.0.0.1:$port" --nworkers 1 --nthreads 1 --no-dashboard
done
echo "scheduler: tcp://127.0.0.1:$port  (scgnn-scale run ... --scheduler tcp://127.0.0.1:$port)"
echo "pids and logs in $state; stop with: bash deploy/dask-cluster.sh stop"
