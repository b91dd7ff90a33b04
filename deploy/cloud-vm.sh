#!/usr/bin/env bash
# Install scgnn-scale on a fresh Debian/Ubuntu VM with Python >= 3.11 and run one job.
#   INPUT=...  input file or directory (required)     OUT=...  run directory (required)
#   GPU=1      install a CUDA build of torch and cuGraph instead of the CPU build
#   EXTRA=...  more options for 'scgnn-scale run', e.g. "--label-key label --scheduler tcp://host:8786"
set -euo pipefail
: "${INPUT:?set INPUT}" "${OUT:?set OUT}"
here="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m venv "$here/.venv"
. "$here/.venv/bin/activate"
if [ "${GPU:-0}" = 1 ]; then
  pip install torch --index-url https://download.pytorch.org/whl/cu124
  pip install -e "$here[gpu]"
else
  pip install torch==2.13.0 || pip install torch --index-url https://download.pytorch.org/whl/cpu
  pip install -e "$here"
fi
# shellcheck disable=SC2086
scgnn-scale run "$INPUT" --out "$OUT" ${EXTRA:-}
