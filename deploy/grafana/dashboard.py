#!/usr/bin/env python3
"""The agentmesh Grafana dashboard, written as data so nobody hand-edits its JSON.

    deploy/grafana/dashboard.py generate          # writes deploy/grafana/dashboards/agentmesh.json
    deploy/grafana/dashboard.py check             # the committed JSON is what this generates
    deploy/grafana/dashboard.py verify URL        # every query runs on the Prometheus at URL,
                                                  # and those that must have data have it
    deploy/grafana/dashboard.py queries           # every panel's queries, one per line

`check` runs in scripts/deploy-check.sh (every CI run); `verify` in scripts/compose-test.sh against
the Prometheus of the running compose cluster, so a query naming a metric or label that does not
exist fails the build. Standard library only.
"""

import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "agentmesh.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# Calls the aggregator's probes make: kept out of the RED panels.
APP = 'rpc_service!~"grpc.*"'

# (title, [rows]); a row is (title, [panels]); a panel is a dict:
#   title, kind (timeseries | stat), unit, queries [(expr, legend)], data (True: must have data
#   in a running cluster with traffic; False: may be empty, e.g. errors while there are none).
ROWS = [
    ("Services: rate, errors, duration (RED)", [
        {"title": "Calls per second by service", "unit": "reqps", "data": True, "queries": [
            (f"sum by (rpc_service) (rate(rpc_server_call_duration_seconds_count{{{APP}}}[1m]))", "{{rpc_service}}")]},
        {"title": "Failed calls per second by service and code", "unit": "reqps", "data": False, "queries": [
            (f'sum by (rpc_service, rpc_response_status_code) (rate(rpc_server_call_duration_seconds_count{{{APP}, rpc_response_status_code!="OK"}}[1m]))',
             "{{rpc_service}} {{rpc_response_status_code}}")]},
        {"title": "p99 call duration by service", "unit": "s", "data": True, "queries": [
            (f"histogram_quantile(0.99, sum by (le, rpc_service) (rate(rpc_server_call_duration_seconds_bucket{{{APP}}}[1m])))", "p99 {{rpc_service}}"),
            (f"histogram_quantile(0.5, sum by (le, rpc_service) (rate(rpc_server_call_duration_seconds_bucket{{{APP}}}[1m])))", "p50 {{rpc_service}}")]},
        {"title": "Instances answering scrapes", "kind": "stat", "unit": "short", "data": True, "queries": [
            ('sum by (service) (up{job="agentmesh"})', "{{service}}")]},
    ]),
    ("Rate limiter", [
        {"title": "Decisions per second", "unit": "reqps", "data": True, "queries": [
            ("sum by (result) (rate(ratelimit_decisions_total[1m]))", "{{result}}")]},
        {"title": "Check duration inside the service", "unit": "s", "data": True, "queries": [
            ("histogram_quantile(0.99, sum by (le) (rate(ratelimit_check_duration_seconds_bucket[1m])))", "p99"),
            ("histogram_quantile(0.5, sum by (le) (rate(ratelimit_check_duration_seconds_bucket[1m])))", "p50")]},
        {"title": "Degraded answers (failure policy)", "unit": "reqps", "data": False, "queries": [
            ("sum by (reason, on_failure) (rate(ratelimit_degraded_total[1m]))", "{{reason}} → {{on_failure}}")]},
        {"title": "Limit states held", "unit": "short", "data": True, "queries": [
            ("sum(ratelimit_store_entries)", "entries"), ("sum(ratelimit_suspect_peers)", "suspect peers")]},
    ]),
    ("Event bus", [
        {"title": "Published per second", "unit": "reqps", "data": True, "queries": [
            ("sum by (durability) (rate(eventbus_published_total[1m]))", "{{durability}}")]},
        {"title": "Queue wait before delivery (p99)", "unit": "s", "data": False, "queries": [
            ("histogram_quantile(0.99, sum by (le, priority) (rate(eventbus_queue_wait_seconds_bucket[1m])))", "{{priority}}")]},
        {"title": "Shed, dead-lettered, expired per second", "unit": "reqps", "data": True, "queries": [
            ("sum(rate(eventbus_shed_total[1m]))", "shed"),
            ("sum(rate(eventbus_dead_lettered_total[1m]))", "dead-lettered"),
            ("sum(rate(eventbus_expired_total[1m]))", "expired")]},
        {"title": "Open subscriptions", "kind": "stat", "unit": "short", "data": True, "queries": [
            ("sum(eventbus_subscriptions)", "subscriptions")]},
    ]),
    ("Scheduler: agents and tasks", [
        {"title": "Agents by state", "unit": "short", "data": True, "queries": [
            ("max by (state) (scheduler_agents)", "{{state}}")]},
        {"title": "Tasks by state", "unit": "short", "data": True, "queries": [
            ("max by (state) (scheduler_tasks)", "{{state}}")]},
        {"title": "Queue depth by task type", "unit": "short", "data": False, "queries": [
            ("max by (type) (scheduler_task_queue_depth)", "{{type}}")]},
        {"title": "Slots", "unit": "short", "data": True, "queries": [
            ("max by (kind) (scheduler_slots)", "{{kind}}")]},
        {"title": "Time to assign (p99)", "unit": "s", "data": False, "queries": [
            ("histogram_quantile(0.99, sum by (le) (rate(scheduler_task_assign_seconds_bucket[5m])))", "p99")]},
    ]),
    ("Cache", [
        {"title": "Hit rate", "kind": "stat", "unit": "percentunit", "data": True, "queries": [
            ('sum(rate(cache_reads_total{result!="miss"}[5m])) / sum(rate(cache_reads_total[5m]))', "hit rate")]},
        {"title": "Reads per second by tier", "unit": "reqps", "data": True, "queries": [
            ("sum by (result) (rate(cache_reads_total[1m]))", "{{result}}")]},
        {"title": "L1 bytes and entries", "unit": "bytes", "data": True, "queries": [
            ("sum(cache_l1_bytes)", "bytes"), ("sum(cache_l1_entries)", "entries")]},
        {"title": "Invalidation lag (p99)", "unit": "s", "data": False, "queries": [
            ("histogram_quantile(0.99, sum by (le) (rate(cache_invalidation_lag_seconds_bucket[5m])))", "p99")]},
    ]),
    ("Health", [
        {"title": "Cluster and services", "kind": "stat", "unit": "short", "data": True, "queries": [
            ('max by (component, state) (health_component_status{component=~"cluster|service/.*"}) == 1', "{{component}} {{state}}")]},
        {"title": "Instances by state", "unit": "short", "data": True, "queries": [
            ("sum by (service, state) (health_instances)", "{{service}} {{state}}")]},
        {"title": "Members registered in etcd", "unit": "short", "data": True, "queries": [
            ("sum by (service) (membership_registered)", "{{service}}")]},
        {"title": "Alerts", "unit": "short", "data": False, "queries": [
            ("sum by (state) (health_alerts)", "{{state}}")]},
    ]),
]


def panels():
    """The dashboard's panels: a row header, then panels six units wide, four to a line."""
    out, y, next_id = [], 0, 1
    for row_title, row in ROWS:
        out.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, p in enumerate(row):
            if i and i % 4 == 0:
                y += 8
            kind = p.get("kind", "timeseries")
            panel = {
                "id": next_id,
                "type": kind,
                "title": p["title"],
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 6, "x": 6 * (i % 4), "y": y},
                "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
                "targets": [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr,
                             "legendFormat": legend} for j, (expr, legend) in enumerate(p["queries"])],
            }
            out.append(panel)
            next_id += 1
        y += 8
    return out


def dashboard():
    return {
        "uid": "agentmesh",
        "title": "agentmesh",
        "description": "Generated by deploy/grafana/dashboard.py; do not edit by hand.",
        "tags": ["agentmesh"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels(),
    }


def rendered():
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def queries():
    for _, row in ROWS:
        for p in row:
            for expr, _ in p["queries"]:
                yield p["title"], expr, p["data"]


def check():
    """The committed file is what `generate` writes, and the panels are well formed."""
    problems = []
    if not OUT.exists() or OUT.read_text() != rendered():
        problems.append(f"{OUT} is stale: run deploy/grafana/dashboard.py generate")
    ids = [p["id"] for p in panels()]
    if len(ids) != len(set(ids)):
        problems.append("panel ids repeat")
    cells = set()
    for p in panels():
        g = p["gridPos"]
        if g["x"] + g["w"] > 24:
            problems.append(f"{p['title']}: wider than the grid")
        for dx in range(g["w"]):
            for dy in range(g["h"]):
                cell = (g["x"] + dx, g["y"] + dy)
                if cell in cells:
                    problems.append(f"{p['title']}: overlaps another panel")
                    break
                cells.add(cell)
    provisioned = (HERE / "provisioning" / "datasources" / "prometheus.yml").read_text()
    if f"uid: {DATASOURCE['uid']}" not in provisioned:
        problems.append("the dashboard's datasource uid is not provisioned")
    for title, expr, _ in queries():
        if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
            problems.append(f"{title}: unbalanced brackets in {expr}")
    return problems


def verify(url):
    """Runs every query on a live Prometheus: each must be valid PromQL, and each panel marked
    `data` must return at least one series (a metric or label that does not exist returns none)."""
    problems = []
    for title, expr, must_have_data in queries():
        q = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/query?{q}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            problems.append(f"{title}: {expr}: HTTP {e.code} {e.read().decode(errors='replace')}")
            continue
        if body.get("status") != "success":
            problems.append(f"{title}: {expr}: {body}")
        elif must_have_data and not body["data"]["result"]:
            problems.append(f"{title}: {expr}: no data")
    return problems


def main(argv):
    command = argv[1] if len(argv) > 1 else "check"
    if command == "generate":
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(rendered())
        print(f"wrote {OUT} ({len(panels())} panels)")
        return 0
    if command == "queries":
        for _, expr, _ in queries():
            print(expr)
        return 0
    if command == "check":
        problems = check()
    elif command == "verify" and len(argv) == 3:
        problems = verify(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"dashboard: {p}", file=sys.stderr)
    if not problems:
        print(f"dashboard: {command} passed ({sum(1 for _ in queries())} queries)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
