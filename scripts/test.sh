#!/usr/bin/env bash
# The whole agentmesh test suite, from a fresh clone: installs protoc, etcd and Redis where
# missing, builds every binary (end-to-end tests run the real `agentmesh` and `meshctl`),
# then runs unit, integration and end-to-end tests (real etcd and Redis processes on free
# loopback ports) and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast --retries 1
cargo test --workspace --doc --quiet
