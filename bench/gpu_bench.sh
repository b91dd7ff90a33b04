#!/usr/bin/env bash
# One short script for a lent H100/H200 (about 8 minutes): the GPU tests, then the GPU benchmarks.
#
#   bash bench/gpu_bench.sh [CELLS] [RESULTS_DIR]     (defaults: 100000, bench/out/gpu)
#
# The 1M run takes longer than one 10-minute call of the lent machine: start it in the background
# and follow it over calls on the same warm machine (the next call within its 30 s of idle), each
# call's WAIT leaving room for the steps before it (the GPU tests take about 80 s):
#   STEPS="scaling_start gpu_tests scaling_wait" WAIT=450 bash bench/gpu_bench.sh 1000000 $OUT  # timeout_s 590
#   STEPS="scaling_wait" WAIT=<device time left - 20> bash bench/gpu_bench.sh 1000000 $OUT     # timeout_s WAIT+20
# (on an H200 at commit e666c54: simulation 34 s, then the whole method 612 s; the two calls took 558 +
# 116 s of command time, 712 s of device time with the machine's start, in a 15-minute lease: the
# second call must follow the first at once). Since 2761c4f the default runs no iterations: at e666c54 the
# first pass and the imputation took 254 + 55 s of those 612, so one call is expected to see the 1M run end
# (not run on a GPU since; planned as one call of timeout_s 590, leaving device time for a rerun):
#   STEPS="scaling_start gpu_tests scaling_wait" WAIT=480 bash bench/gpu_bench.sh 1000000 $OUT
# The atlas and the run directory go to /dev/shm when it has 48 GiB free (the machine's RAM holds the
# run's files; BENCH_DIR overrides), else to bench/out. The run uses Dask worker processes (16 cores:
# the LTMG fits hold the GIL in threads).
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
if [[ -z "${BENCH_DIR:-}" ]]; then
    shm_free=$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
    if [[ "${shm_free:-0}" -ge 48 ]]; then BENCH_DIR=/dev/shm/scgnn_bench; else BENCH_DIR=bench/out; fi
fi
mkdir -p "$BENCH_DIR"
RUN_DIR="$BENCH_DIR/run_${CELLS}x2000"
echo "== bench dir: $BENCH_DIR"
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba_cache
if compgen -G ".whl/*.whl" >/dev/null; then
    # installed once per machine: a second call must not rewrite modules a background run still imports
    [[ -d /tmp/site/zarr ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
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
STEPS="${STEPS:-disk gpu_tests knn_1m loader scaling}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
BG=/tmp/gpu_scaling  # the background run's log and JSON: outlives this command while the machine stays warm
# scaling_start: the whole method at CELLS in the background (setsid), so it can outlast one call's
# 10 minutes; scaling_wait (this call or the next, on the same warm machine) follows it for WAIT seconds
read -ra RUN_OPTS <<<"${RUN_OPTIONS:---device cuda --runtime-worker-processes true}"  # 'scgnn-scale run' options
# disk: write speed of the checkout's disk and of the bench directory (1 GiB each)
if want disk; then
    for d in bench/out "$BENCH_DIR"; do
        mkdir -p "$d" && echo "== disk $d: $(dd if=/dev/zero of="$d/dd.tmp" bs=16M count=64 conv=fsync 2>&1 | tail -1)"
        rm -f "$d/dd.tmp"
    done
fi
if want scaling_start; then
    mkdir -p "$BG" && rm -f "$BG"/*
    setsid nohup python3 bench/bench_scaling.py --cells "$CELLS" --dir "$BENCH_DIR" -- "${RUN_OPTS[@]}" \
        >"$BG/scaling.jsonl" 2>"$BG/scaling.log" </dev/null & echo $! >"$BG/pid"
    echo "== scaling_start: pid $(cat "$BG/pid")"
fi
want gpu_tests && step gpu_tests 120 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
want knn_1m && step knn_1m 90 python3 bench/bench_knn.py --n 1000000 --methods torch --device cuda --sample 20000 \
    --out "$RES/knn_1m.json"
want loader && step loader 90 python3 bench/bench_loader.py --cells 200000 --genes 2000 --device cuda --steps 300
# the whole method in the foreground, within one call (fits at 100k; at 1M use scaling_start/scaling_wait)
want scaling && step scaling "${SCALING_LIMIT:-220}" python3 bench/bench_scaling.py --cells "$CELLS" --dir "$BENCH_DIR" \
    -- "${RUN_OPTS[@]}"
if want scaling_wait; then
    python3 bench/follow_run.py --pid "$(cat "$BG/pid")" --run "$RUN_DIR" --wait "${WAIT:-300}"
    cp "$BG"/scaling.* "$RES/" 2>/dev/null
    grep -h "^simulate:" "$BG/scaling.log"
    sed -n '/iterate: started/,$p' "$RUN_DIR/run.log" 2>/dev/null | grep -v Warning | cut -c1-300
fi
cp "$RUN_DIR/manifest.json" "$RES/scaling_manifest.json" 2>/dev/null || true
cp "$RUN_DIR/run.log" "$RES/run.log" 2>/dev/null || true
nvidia-smi --query-gpu=memory.used --format=csv,noheader
