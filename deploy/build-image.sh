#!/usr/bin/env bash
# Builds the agentmesh image from release binaries built on this host (stripped of debug
# information), so the image carries no toolchain:
#   deploy/build-image.sh                      # agentmesh:<version> on debian:bookworm-slim
#   BASE=agentmesh/debian-base:bookworm deploy/build-image.sh   # the local base (base-image.sh)
#   TAG=agentmesh:dev SKIP_BUILD=1 deploy/build-image.sh        # reuse target/release
#   PROFILE=debug SKIP_BUILD=1 deploy/build-image.sh            # the debug build (tests: saves a
#                                                               # release build; same behaviour)
# The image is tagged agentmesh:<version> and agentmesh:latest (what docker-compose.yml runs).
set -euo pipefail
cd "$(dirname "$0")/.."
# Version and repository from the `agentmesh` package (the workspace's).
read -r version repository < <(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; p=next(p for p in json.load(sys.stdin)["packages"] if p["name"]=="agentmesh"); print(p["version"], p["repository"] or "unknown")')
base=${BASE:-debian:bookworm-slim}
tag=${TAG:-agentmesh:$version}
profile=${PROFILE:-release}
if [ -z "${SKIP_BUILD:-}" ]; then
  if [ "$profile" = release ]; then
    cargo build --release --bins --quiet
  else
    cargo build --bins --quiet
  fi
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for bin in agentmesh meshctl example-agent; do
  strip -o "$stage/$bin" "target/$profile/$bin"
done
cp deploy/Dockerfile "$stage/Dockerfile"
docker build --quiet -t "$tag" \
  --build-arg BASE="$base" \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg SOURCE="$(git remote get-url origin 2>/dev/null || echo "$repository")" \
  "$stage" >/dev/null
if [ -z "${TAG:-}" ]; then
  docker tag "$tag" agentmesh:latest
fi
echo "$tag: $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}') (base $base)"
