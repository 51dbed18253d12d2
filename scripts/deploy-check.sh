#!/usr/bin/env bash
# Checks the deployment files that need no Docker engine (run by scripts/test.sh):
# - the Grafana dashboard is exactly what deploy/grafana/dashboard.py generates, well formed;
# - both Kubernetes overlays render with kustomize (`kubectl kustomize`) and every resource
#   validates, strictly (no unknown field), against the Kubernetes schemas of the oldest
#   version we support (kubernetes-validate, installed by scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
validate=${KUBERNETES_VALIDATE:-$HOME/.cache/agentmesh/venv/bin/kubernetes-validate}
k8s_version=${K8S_VERSION:-1.30.0}

python3 deploy/grafana/dashboard.py check
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  # Newer kustomize warns that bases/patchesStrategicMerge/commonLabels are deprecated: the
  # files keep them so that every kustomize from v2 (Debian's kubectl 1.20) renders them.
  kubectl kustomize "$overlay" >"$rendered/$name.yaml" 2>"$rendered/$name.err" \
    || { cat "$rendered/$name.err" >&2; echo "deploy-check: kustomize failed on $overlay" >&2; exit 1; }
  if ! "$validate" --strict --quiet -k "$k8s_version" "$rendered/$name.yaml"; then
    echo "deploy-check: $overlay does not validate against Kubernetes $k8s_version" >&2
    exit 1
  fi
  echo "deploy-check: $overlay: $(grep -c '^kind:' "$rendered/$name.yaml") resources valid for Kubernetes $k8s_version"
done
