#!/usr/bin/env bash
# Build a Debian base image for oneha's Dockerfile without any image registry: debootstrap a minimal Debian
# (python3, python3-venv, pip) from the Debian mirror this machine's apt uses, and `docker import` it.
#   deploy/compose/base-image.sh [IMAGE] [WORKDIR]     (default oneha-base:local, /var/tmp/oneha-docker)
# Needs root, debootstrap and a running Docker engine. Idempotent: an existing IMAGE is kept (rm it to rebuild).
set -euo pipefail
image=${1:-oneha-base:local}
workdir=${2:-/var/tmp/oneha-docker}
suite=${DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"; exit 0
fi

# The mirror of the first deb822 or one-line source of this machine (deb.debian.org unless configured otherwise).
mirror=${DEBIAN_MIRROR:-$(
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
    grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}'; } | grep -v security | head -n1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$workdir/rootfs-$suite
mkdir -p "$workdir"
if [ ! -x "$rootfs/usr/bin/python3" ]; then
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip "$suite" "$rootfs" "$mirror"
fi
# Package caches stay out of the image; apt-get update in the Dockerfile fetches fresh lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$image"
echo "$image imported from $rootfs ($suite, $mirror)"
