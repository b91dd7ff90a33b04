#!/usr/bin/env bash
# One short script for a lent H100/H200: the GPU tests, then the 1M-cell run on one GPU.
# Needs an environment with a CUDA build of torch and this package installed (pip install -e ".[dev,gpu]").
#   bash bench/gpu_bench.sh [CELLS]      (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -m gpu -q
python bench/bench_scaling.py --cells "${1:-1000000}" -- --device cuda | tee bench/out/gpu_scaling.jsonl
