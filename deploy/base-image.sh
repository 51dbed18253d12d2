#!/usr/bin/env bash
# Makes a Debian 12 (bookworm) base image from Debian's own packages, for machines where no
# container registry can be reached (this project's test machines): debootstrap a minimal root
# file system and `docker import` it. Users with a registry use `debian:bookworm-slim` instead.
#   deploy/base-image.sh [tag]        # default agentmesh/debian-base:bookworm; kept if present
#   DEBIAN_MIRROR=http://… deploy/base-image.sh
set -euo pipefail
tag=${1:-agentmesh/debian-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag is already there"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" \
  "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
# What a runtime image does not need: package lists, documentation, manual pages, locales.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "$tag: $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
