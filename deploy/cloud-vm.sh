#!/usr/bin/env bash
# Install scgnn-scale on a fresh Debian/Ubuntu VM with Python >= 3.11 and run one job.
#   INPUT=...  input file, directory or URL (required)
#   OUT=...    run directory (required): a local path, or a bucket prefix (s3://BUCKET/PREFIX, gs://..., az://...)
#              that outlives the VM: a pre-empted VM's successor running this same script resumes from the
#              stages finished there. Credentials come from the store library's chain (the VM's instance role
#              or service account, AWS_* / GOOGLE_APPLICATION_CREDENTIALS variables), never from the URL.
#   GPU=1      install a CUDA build of torch and cuGraph instead of the CPU build
#   EXTRA=...  more options for 'scgnn-scale run', e.g. "--label-key label --scheduler tcp://host:8786"
#   VENV=...   an existing virtual environment with scgnn-scale installed: skip the installation
#   LEASE_WAIT=... seconds to wait for the lease of a pre-empted VM's run to lapse (default 600)
set -euo pipefail
: "${INPUT:?set INPUT}" "${OUT:?set OUT}"
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${VENV:-}" ]; then
  . "$VENV/bin/activate"
else
  extras=""
  case "$INPUT $OUT" in *://*) extras="remote" ;; esac  # s3fs, gcsfs, aiohttp for URLs
  [ "${GPU:-0}" = 1 ] && extras="${extras:+$extras,}gpu"
  python3 -m venv "$here/.venv"
  . "$here/.venv/bin/activate"
  if [ "${GPU:-0}" = 1 ]; then
    pip install torch --index-url https://download.pytorch.org/whl/cu124
  else
    pip install torch==2.13.0 || pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
  pip install -e "$here${extras:+[$extras]}"
fi
# A run killed with its VM leaves its lease in RUN_DIR: another machine may take it only once it lapses
# (90 s, or SCGNN_LEASE_SECONDS of the run that holds it). Wait for that rather than fail.
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
deadline=$(( $(date +%s) + ${LEASE_WAIT:-600} ))
while true; do
  # shellcheck disable=SC2086
  if scgnn-scale run "$INPUT" --out "$OUT" ${EXTRA:-} 2> >(tee "$err" >&2); then
    exit 0
  else
    rc=$?
  fi
  wait  # the tee of stderr
  if [ "$rc" = 2 ] && grep -q "another scgnn-scale run is using this directory" "$err" \
      && [ "$(date +%s)" -lt "$deadline" ]; then
    echo "cloud-vm.sh: $OUT is held by another run (a pre-empted VM's lease?); trying again in 15 s" >&2
    sleep 15
    continue
  fi
  exit "$rc"
done
