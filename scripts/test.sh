#!/usr/bin/env bash
# The whole agentmesh test suite, from a fresh clone: installs protoc, etcd and Redis where
# missing, builds every binary (end-to-end tests run the real `agentmesh` and `meshctl`),
# then runs the doc tests and the unit, integration and end-to-end tests (real etcd and
# Redis processes on free loopback ports), the Python package's checks and tests (against
# the same binaries), the deployment checks (dashboard, Kubernetes
# manifests), and the compose test on real containers where a Docker engine runs (skipped,
# saying so, where none does).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace --doc --quiet
cargo nextest run --workspace --no-fail-fast --retries 1
scripts/python-test.sh
scripts/deploy-check.sh
scripts/compose-test.sh
