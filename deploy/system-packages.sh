#!/usr/bin/env bash
# The Debian packages that some tests start besides Python's: headless Chromium (the run report's
# screenshot, tests/test_report.py) and a single-node SLURM (tests/test_slurm.py). Those tests skip,
# saying why, where these are absent; on Debian as root this installs what is missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-packages: ${missing[*]} not installed (needs root and apt-get); the tests that use them skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
echo "system-packages: installed ${missing[*]}"
