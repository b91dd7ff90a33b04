#!/usr/bin/env bash
# Bootstrap a Debian bookworm base image from Debian packages (no container registry needed) and import it
# into podman (or docker) as localhost/debian-bookworm:base, the FROM of Dockerfile.cpu.
#   sudo bash deploy/containers/build-base.sh
#   MIRROR=...   the Debian mirror (default: the first active URI ending in /debian in apt's sources, else
#                http://deb.debian.org/debian)
#   IMAGE=...    the tag to import as (default localhost/debian-bookworm:base)
#   ENGINE=...   podman or docker (default: podman when installed, else docker)
# Needs root and debootstrap (apt-get install debootstrap). 101 s on the 2-core development VM; 121 MB.
set -euo pipefail
image="${IMAGE:-localhost/debian-bookworm:base}"
engine="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
if [ -z "${MIRROR:-}" ]; then
  # the URI of the first active 'URIs:' (deb822) or 'deb' line that ends in /debian (comments skipped)
  MIRROR="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -E '^[[:space:]]*(URIs:|deb )' | grep -o -E 'https?://[^ ]+/debian/?( |$)' | tr -d ' ' | head -n 1 || true)"
  MIRROR="${MIRROR%/}"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi
[ "$(id -u)" = 0 ] || { echo "build-base.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-base.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
rootfs="$(mktemp -d "${TMPDIR:-/tmp}/bookworm-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $MIRROR into $rootfs"
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
# apt sources inside the image: the same mirror, plus updates and security
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
# a smaller image: no apt lists or package cache
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" --numeric-owner -c . | "$engine" import \
  --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$image"
echo "imported $image"
"$engine" images "$image"
