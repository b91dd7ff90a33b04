#!/usr/bin/env bash
# Start a Dask scheduler and N workers on this host (for testing the --scheduler path).
#   bash deploy/dask-cluster.sh 2        -> prints the address; stop with: kill $(cat .dask-pids)
set -euo pipefail
n="${1:-2}"
port="${PORT:-8786}"
dask scheduler --host 127.0.0.1 --port "$port" --no-dashboard >.dask-scheduler.log 2>&1 &
echo $! >.dask-pids
sleep 3
for _ in $(seq "$n"); do
  dask worker "tcp://127.0.0.1:$port" --nworkers 1 --nthreads 1 --no-dashboard >>.dask-workers.log 2>&1 &
  echo $! >>.dask-pids
done
echo "scheduler: tcp://127.0.0.1:$port  (scgnn-scale run ... --scheduler tcp://127.0.0.1:$port)"
