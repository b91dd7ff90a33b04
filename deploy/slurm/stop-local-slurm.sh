#!/usr/bin/env bash
# Stop the single-node SLURM that start-local-slurm.sh started (same as `start-local-slurm.sh stop`).
exec bash "$(dirname "$0")/start-local-slurm.sh" stop
