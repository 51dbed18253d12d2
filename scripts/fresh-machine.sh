#!/usr/bin/env bash
# Runs the README's two commands as a new user would, on a fresh Debian 12 (bookworm) that has
# only Rust: a `debootstrap --variant=minbase` chroot (no protoc, no compiler, no etcd, no Redis)
# with this machine's Rust toolchain and cargo-nextest bound in, and a clone of HEAD. A green
# run here cannot hide a missing install step the way a run on a used machine can.
#
#   sudo scripts/fresh-machine.sh            scripts/dev.sh --demo, then scripts/test.sh
#   sudo scripts/fresh-machine.sh dev        only scripts/dev.sh --demo
#
# Needs root, debootstrap (installed if missing) and Debian's mirror. The base system is made
# once under $FRESH_ROOT (default /var/tmp/agentmesh-fresh) and copied for every run; the run's
# copy is deleted afterwards (pass KEEP=1 to keep it). Builds in the chroot start from nothing,
# so a whole run takes a while (most of it compiling).
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
case "$what" in
  all) commands='scripts/dev.sh --demo && scripts/test.sh' ;;
  dev) commands='scripts/dev.sh --demo' ;;
  *) echo "usage: $0 [all|dev]" >&2; exit 64 ;;
esac
if [ "$(id -u)" -ne 0 ]; then echo "error: run as root (chroot, mount)" >&2; exit 1; fi

top=${FRESH_ROOT:-/var/tmp/agentmesh-fresh}
base=$top/base
run=$top/run-$$
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=$(dirname "$(command -v cargo)")

if [ ! -e "$base/.complete" ]; then
  command -v debootstrap >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  rm -rf "$base"
  echo "making a bookworm base system in $base"
  debootstrap --variant=minbase bookworm "$base" "$mirror" >/dev/null
  touch "$base/.complete"
fi

echo "copying the base system to $run"
cp -a "$base" "$run"
mounts=()
cleanup() {
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$run"; else echo "kept $run"; fi
}
trap cleanup EXIT
bind() { # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounts+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}
mount -t proc proc "$run/proc" && mounts+=("$run/proc")
bind /sys "$run/sys" ro
bind /dev "$run/dev"
bind /dev/pts "$run/dev/pts"
bind "$rustup_home" "$run/opt/rustup" ro
bind "$cargo_bin" "$run/opt/cargo-bin" ro
nextest=$(command -v cargo-nextest || true)
if [ -n "$nextest" ]; then bind "$(dirname "$nextest")" "$run/opt/nextest-bin" ro; fi
cp /etc/resolv.conf "$run/etc/resolv.conf"
# The host's CA bundle, for networks that reach the registries through a TLS-inspecting proxy
# with its own CA (a fresh machine there is given that CA the same way).
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$ca" ]; then
  mkdir -p "$run/etc/ssl/certs"
  cp "$ca" "$run/etc/ssl/certs/host-ca.crt"
fi

git clone -q . "$run/src"
# ../shared sits beside the repository in CI; give the clone the same neighbour when it exists.
if [ -d ../shared ]; then bind "$(cd ../shared && pwd)" "$run/shared" ro; fi

echo "running in the chroot: $commands"
chroot "$run" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/opt/cargo-bin:/opt/nextest-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt CARGO_HTTP_CAINFO=/etc/ssl/certs/host-ca.crt \
  RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo RUSTUP_TOOLCHAIN="$(rustup show active-toolchain | cut -d' ' -f1)" \
  bash -c "cd /src && $commands"
echo "fresh machine: '$commands' passed"
