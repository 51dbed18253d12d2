#!/usr/bin/env bash
# The Python package (sdk/python): installs it into a fresh virtualenv with `pip install
# sdk/python[dev]` (its build generates the protobuf and gRPC modules from proto/), checks it
# with ruff and mypy, then runs its pytest suite against real `agentmesh` processes (the
# workspace's target/debug binaries, which scripts/test.sh builds first) — the examples
# included. Needs python3 with venv (scripts/install-deps.sh) and the Python package index.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "./sdk/python[dev]"
# The generated modules in the source tree too, for the type checker.
"$venv/bin/python" sdk/python/codegen.py 2>/dev/null
cd sdk/python
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
AGENTMESH_BIN_DIR="${AGENTMESH_BIN_DIR:-$PWD/../../target/debug}" "$venv/bin/pytest" -q
