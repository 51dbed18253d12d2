#!/usr/bin/env bash
# The compose test: docker-compose.yml on real containers, with images built on this machine
# (no registry needed): agentmesh from this build, etcd, Redis and Prometheus from Debian's
# packages on a local Debian base, Jaeger replaced by `trace-sink` (an OTLP receiver answering
# Jaeger's query API) and Grafana not started — its dashboard's every query is run on the live
# Prometheus instead. Steps:
#   images → every container healthy → `meshctl doctor` all pass (incl. one trace across three
#   services) → a task's flow scheduler → event bus → agent is ONE trace → Prometheus targets
#   UP, rules loaded, dashboard queries answer → docker kill a rate limiter and an event bus:
#   the cluster keeps answering, membership drops them within the lease TTL → restart → healthy
#   → network partition of one rate limiter observed and healed → down -v leaves nothing.
#
#   scripts/compose-test.sh            # skipped (exit 0, says why) where no Docker engine runs
#   PROFILE=release scripts/compose-test.sh   # image from the release build (default: debug,
#                                             # which the test command has just built)
#   KEEP=1 scripts/compose-test.sh     # leave the cluster up afterwards (down -v by hand)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1mcompose-test:\033[0m %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }

command -v docker >/dev/null 2>&1 || skip "no docker command on this machine"
docker info >/dev/null 2>&1 || skip "the Docker engine does not answer (docker info failed)"
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  skip "neither 'docker compose' nor docker-compose is installed"
fi

project=${PROJECT:-agentmesh-ci}
profile=${PROFILE:-debug}
lease_ttl=10
base=agentmesh/debian-base:bookworm
export AGENTMESH_IMAGE=agentmesh:compose-test
export ETCD_IMAGE=agentmesh/etcd:debian
export REDIS_IMAGE=agentmesh/redis:debian
export PROMETHEUS_IMAGE=agentmesh/prometheus:debian
export JAEGER_IMAGE=agentmesh/trace-sink:test
export AGENTMESH_HOST_IP=127.0.0.1
compose() { "${compose_cmd[@]}" -p "$project" -f docker-compose.yml "$@"; }
# meshctl inside the cluster's network (the compose file's `meshctl` tool service).
mc() { compose run --rm -T meshctl "$@" 2>/dev/null; }
quiet_build() { "$@" 2> >(grep -v -e DEPRECATED -e 'legacy builder' -e buildx -e 'docs.docker.com' -e '^$' >&2); }
started=$(date +%s)

fail() {
  say "FAILED: $*"
  compose ps || true
  for c in $(compose ps -q 2>/dev/null); do
    echo "---- logs of $(docker inspect -f '{{.Name}}' "$c")"
    docker logs --tail 30 "$c" 2>&1 | cut -c1-300
  done
  exit 1
}
cleanup() {
  if [ -z "${KEEP:-}" ]; then
    compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
cleanup

# ---- images ----
say "images (base, agentmesh from the $profile build, etcd/Redis/Prometheus from Debian, trace-sink)"
deploy/base-image.sh "$base" >/dev/null
if [ ! -x "target/$profile/agentmesh" ] || [ ! -x "target/$profile/trace-sink" ]; then
  if [ "$profile" = release ]; then cargo build --release --bins --quiet; else cargo build --bins --quiet; fi
fi
quiet_build env TAG="$AGENTMESH_IMAGE" BASE="$base" PROFILE="$profile" SKIP_BUILD=1 deploy/build-image.sh
[ "$(docker image inspect -f '{{.Config.User}}' "$AGENTMESH_IMAGE")" = "10001:10001" ] || fail "the image does not run as uid 10001"
for label in version revision source; do
  v=$(docker image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$label\"}}" "$AGENTMESH_IMAGE")
  [ -n "$v" ] && [ "$v" != unknown ] || fail "the image has no org.opencontainers.image.$label label"
done
for name in etcd redis prometheus; do
  quiet_build docker build -q -f "deploy/images/$name.Dockerfile" --build-arg BASE="$base" \
    -t "agentmesh/$name:debian" deploy/images >/dev/null
done
stage=$(mktemp -d)
strip -o "$stage/trace-sink" "target/$profile/trace-sink"
cp deploy/images/trace-sink.Dockerfile "$stage/Dockerfile"
quiet_build docker build -q --build-arg BASE="$base" -t "$JAEGER_IMAGE" "$stage" >/dev/null
rm -rf "$stage"

# ---- static checks: compose file, Prometheus configuration and rules ----
compose config -q || fail "docker-compose.yml does not validate"
docker run --rm --entrypoint promtool -v "$PWD/deploy/prometheus:/cfg:ro" "$PROMETHEUS_IMAGE" \
  check rules /cfg/alerts.yml >/dev/null || fail "promtool check rules"

# ---- up: every service but Grafana (not packaged by Debian; its dashboard is checked below) ----
services=$(compose config --services | grep -v -x -e grafana -e meshctl | tr '\n' ' ')
say "up: $services"
compose up -d $services >/dev/null 2>&1 || { compose up -d $services; fail "compose up"; }

container() { compose ps -q "$1"; }
health_of() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$(container "$1")"; }
wait_healthy() { # service… : each healthy (running, for those without a health check)
  local deadline=$(( $(date +%s) + ${WAIT:-120} ))
  for s in "$@"; do
    until [[ "$(health_of "$s")" =~ ^(healthy|running)$ ]]; do
      [ "$(date +%s)" -lt "$deadline" ] || fail "$s is $(health_of "$s") after ${WAIT:-120} s"
      sleep 1
    done
  done
}
wait_healthy $services
say "every container healthy after $(( $(date +%s) - started )) s: $(compose ps -q | wc -l) containers"

# ---- the cluster from inside: meshctl status and doctor (one trace across three services) ----
wait_for() { # description timeout command…
  local what=$1 timeout=$2; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what (not within $timeout s)"
    sleep 1
  done
}
status_up() { mc status -o json | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["state"] != "UP")'; }
wait_for "meshctl status: the cluster UP" 60 status_up
doctor=$(mc doctor -o json || true)
echo "$doctor" | python3 -c '
import json, sys
d = json.load(sys.stdin)
bad = [c for c in d["checks"] if c["result"] == "fail"]
for c in bad: print("  doctor:", c["check"], "-", c["detail"], "-", c["fix"])
trace = [c for c in d["checks"] if c["check"] == "one trace across three services"][0]
print("  doctor: %d/%d checks pass; %s" % (d["passed"], d["checked"], trace["detail"]))
sys.exit(1 if bad or trace["result"] != "pass" else 0)' || fail "meshctl doctor"

# ---- a task's flow: meshctl → scheduler → event bus (task events) → agent: one trace ----
mc tasks submit echo --payload hello --wait >/dev/null || fail "an echo task did not complete"
# The trace sink's query API, through its published port, as Jaeger's would be.
trace_services() {
  python3 - <<'EOF'
import json, sys, urllib.request
url = "http://127.0.0.1:16686/api/traces?service=example-agent&limit=50"
data = json.load(urllib.request.urlopen(url, timeout=5))["data"]
best = set()
for t in data:
    services = {p["serviceName"] for p in t["processes"].values()}
    ops = {s["operationName"] for s in t["spans"]}
    if "task run" in ops and len(services) > len(best):
        best, trace_id = services, t["traceID"]
if len(best) < 3:
    sys.exit(1)
print(f"  trace {trace_id}: {', '.join(sorted(best))}")
EOF
}
wait_for "the task's trace across scheduler, event bus and agent in the trace sink" 30 trace_services

# ---- Prometheus: targets UP, rules loaded, the dashboard's queries answer ----
prom() { python3 -c 'import json,sys,urllib.request; print(json.dumps(json.load(urllib.request.urlopen("http://127.0.0.1:9090"+sys.argv[1], timeout=5))))' "$1"; }
targets_up() {
  prom /api/v1/targets | python3 -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
agentmesh = [x for x in t if x["labels"]["job"] == "agentmesh"]
sys.exit(0 if len(agentmesh) == 11 and all(x["health"] == "up" for x in t) else 1)'
}
wait_for "every Prometheus target UP" 60 targets_up
prom /api/v1/rules | python3 -c '
import json, sys
groups = json.load(sys.stdin)["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
bad = [r["name"] for r in rules if r.get("health") not in ("ok", "unknown")]
print("  prometheus: 12 targets up; %d alert rules loaded" % len(rules))
sys.exit(1 if len(rules) < 10 or bad else 0)' || fail "Prometheus did not load the alert rules"
# Traffic every panel needs (cache hits), then two scrapes so rates have two samples.
mc cache set compose-test k v >/dev/null && mc cache get compose-test k >/dev/null || fail "cache set/get"
mc ratelimit check -n compose-test -k k --limit 100 --period 1m >/dev/null || fail "ratelimit check"
sleep 12
python3 deploy/grafana/dashboard.py verify http://127.0.0.1:9090 || fail "the dashboard's queries on the live Prometheus"

# ---- kill -9 one rate limiter and one event bus ----
# Membership read from etcd by the meshctl inside the health container (quicker than a run).
members_json() { docker exec "$(container health)" meshctl members -o json; }
instance_at() { # grpc address → instance id
  members_json | python3 -c 'import json,sys; print(next((m["instance_id"] for m in json.load(sys.stdin) if m["grpc_addr"] == sys.argv[1]), ""))' "$1"
}
gone() { ! members_json | grep -q "\"$1\""; }
rl3=$(instance_at ratelimit-3:7104); eb2=$(instance_at eventbus-2:7101)
[ -n "$rl3" ] && [ -n "$eb2" ] || fail "ratelimit-3 and eventbus-2 are not both members"
say "docker kill ratelimit-3 and eventbus-2"
killed_at=$(date +%s)
docker kill "$(container ratelimit-3)" "$(container eventbus-2)" >/dev/null
# The survivors answer at once (keys owned by the dead rate limiter go to the next owner).
docker exec "$(container health)" meshctl ratelimit check --addr http://ratelimit-1:7104 \
  -n compose-test -k after-kill --limit 100 --period 1m >/dev/null || fail "a rate-limit check after the kill"
docker exec "$(container health)" meshctl events publish --addr http://eventbus-1:7101 \
  compose.test "after the kill" >/dev/null || fail "a publish after the kill"
both_gone() { gone "$rl3" && gone "$eb2"; }
wait_for "ratelimit-3 and eventbus-2 leave membership" $(( lease_ttl + 10 )) both_gone
dropped=$(( $(date +%s) - killed_at ))
say "the cluster kept answering; both left membership ${dropped} s after the kill (lease TTL ${lease_ttl} s)"
[ "$dropped" -le $(( lease_ttl + 8 )) ] || fail "membership took ${dropped} s to drop them"
compose start ratelimit-3 eventbus-2 >/dev/null 2>&1
wait_healthy ratelimit-3 eventbus-2
wait_for "the cluster UP again with both back" 60 status_up
say "restarted: healthy and back in membership"

# ---- a crash (kill -9 of the process from the host): the restart policy brings it back ----
pid=$(docker inspect -f '{{.State.Pid}}' "$(container cache-3)")
say "kill -9 of cache-3's process (pid $pid on the host)"
kill -9 "$pid"
restarted() { [ "$(docker inspect -f '{{.RestartCount}}' "$(container cache-3)")" -ge 1 ]; }
wait_for "docker restarts the crashed cache-3 (restart: unless-stopped)" 30 restarted
wait_healthy cache-3
wait_for "the cluster UP after the crash" 60 status_up
say "cache-3 restarted by its restart policy and healthy again"

# ---- a network partition of one rate limiter ----
network=$(docker network ls --filter "label=com.docker.compose.project=$project" --format '{{.Name}}' | head -1)
rl2=$(instance_at ratelimit-2:7104)
say "partition: docker network disconnect $network ratelimit-2"
docker network disconnect "$network" "$(container ratelimit-2)"
rl2_gone() { gone "$rl2"; }
wait_for "the partitioned instance leaves membership" $(( lease_ttl + 10 )) rl2_gone
not_all_up() { mc status -o json | python3 -c '
import json, sys
c = [x for x in json.load(sys.stdin)["components"] if x["id"] == "service/ratelimit"][0]
sys.exit(0 if c["instances_up"] < 3 else 1)'; }
wait_for "the aggregator sees a rate limiter missing" 30 not_all_up
mc ratelimit check -n compose-test -k during-partition --limit 100 --period 1m >/dev/null || fail "a check during the partition"
docker network connect --alias ratelimit-2 "$network" "$(container ratelimit-2)"
back() { [ -n "$(instance_at ratelimit-2:7104)" ]; }
wait_for "ratelimit-2 back in membership after the partition heals" 60 back
wait_for "the cluster UP after the partition heals" 60 status_up
say "partition observed (left membership, aggregator saw 2/3) and healed (back, cluster UP)"

# ---- down -v leaves nothing ----
if [ -n "${KEEP:-}" ]; then say "KEEP set: the cluster stays up (project $project)"; exit 0; fi
compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project"; \
  docker network ls -q --filter "label=com.docker.compose.project=$project"; \
  docker volume ls -q --filter "label=com.docker.compose.project=$project")
[ -z "$left" ] || fail "down -v left: $left"
say "PASSED in $(( $(date +%s) - started )) s; down -v left no container, network or volume"
