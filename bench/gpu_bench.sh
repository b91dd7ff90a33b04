#!/usr/bin/env bash
# One short script for a lent H100/H200 (about 8 minutes): the GPU tests, then the GPU benchmarks.
#
#   bash bench/gpu_bench.sh [CELLS] [RESULTS_DIR]     (defaults: 100000, bench/out/gpu)
#
# Needs a CUDA build of torch and this package's dependencies. On a machine without package
# registries, download the wheels beforehand into .whl/ (see bench/RESULTS.md, "GPU"); they are
# installed into /tmp/site here and the package runs from the checkout.
# Each step has its own time limit and writes its own file, so one failing step leaves the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
CELLS="${1:-100000}"
RES="${2:-bench/out/gpu}"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba_cache
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
    mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m scgnn_scale.cli "$@"\n' >/tmp/bin/scgnn-scale
    chmod +x /tmp/bin/scgnn-scale && export PATH="/tmp/bin:$PATH"
fi
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $RES/NAME.log, never stop the script
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 4 "$RES/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, scgnn_scale, anndata, zarr, dask, distributed, pynndescent, igraph, leidenalg
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'anndata', anndata.__version__,
      'zarr', zarr.__version__, 'dask', dask.__version__)" || exit 1

# STEPS: which steps to run (default all), e.g. STEPS="gpu_tests scaling"
STEPS="${STEPS:-gpu_tests knn_1m loader scaling}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
want gpu_tests && step gpu_tests 120 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
want knn_1m && step knn_1m 90 python3 bench/bench_knn.py --n 1000000 --methods torch --device cuda --sample 20000 \
    --out "$RES/knn_1m.json"
want loader && step loader 90 python3 bench/bench_loader.py --cells 200000 --genes 2000 --device cuda --steps 300
# the whole method; at CELLS=1000000 give it SCALING_LIMIT=540 (one call's limit is 600 s) and STEPS=scaling
want scaling && step scaling "${SCALING_LIMIT:-220}" python3 bench/bench_scaling.py --cells "$CELLS" -- --device cuda
cp "bench/out/run_${CELLS}x2000/manifest.json" "$RES/scaling_manifest.json" 2>/dev/null || true
nvidia-smi --query-gpu=memory.used --format=csv,noheader
