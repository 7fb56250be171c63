"""deploy/prometheus alert rules and deploy/grafana dashboard: they parse and use only the metric contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# The metrics the subscriber and workers export (the contract).
COUNTERS = {"oneha_events_received_total", "oneha_events_rejected_total", "oneha_events_dropped_total",
            "oneha_incidents_opened_total", "oneha_incidents_cancelled_total", "oneha_duplicates_suppressed_total",
            "oneha_zmq_reconnects_total", "oneha_recoveries_total", "oneha_task_retries_total",
            "oneha_oned_errors_total", "oneha_fence_total", "oneha_event_disagreements_total"}
GAUGES = {"oneha_subscriber_last_event_timestamp_seconds", "oneha_incidents_open", "oneha_queue_length",
          "oneha_recovery_paused"}
HISTOGRAMS = {"oneha_enqueue_latency_seconds", "oneha_reconcile_duration_seconds", "oneha_time_to_recover_seconds",
              "oneha_oned_call_seconds"}
CONTRACT = COUNTERS | GAUGES | HISTOGRAMS
# Prometheus' own series: `up` is written by Prometheus for every scrape target (to tell "down" from "quiet").
BUILTIN = {"up"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
LABELS = {"source", "kind", "reason", "status", "queue", "action", "result", "task", "method", "le", "job"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers that are not functions, keywords or label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                   # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                              # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                             # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$__\w+", "", expr)                                # grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if m.group(0) in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def base(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def check_expr(expr: str) -> set[str]:
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    for name in names:
        assert base(name) in CONTRACT | BUILTIN, f"{name} is not a contract metric (in {expr!r})"
        assert name not in HISTOGRAMS, f"{name} is a histogram: use _bucket/_count/_sum"
    # label names used in matchers are the contract's
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matcher):
            assert label in LABELS, f"label {label} in {expr!r}"
    return {base(n) for n in names}


def test_the_parser_itself():
    assert metric_names('sum by (kind) (increase(oneha_recoveries_total{result!~"ok"}[15m])) > 0') == {
        "oneha_recoveries_total"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}
    assert metric_names("time() - max(a) > 6 * 3600 and on() b == 0") == {"a", "b"}


def test_alert_rules_parse_and_use_contract_metrics():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "oneha-alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        used |= check_expr(rule["expr"])
    exprs = {r["alert"]: r["expr"] for r in rules}
    # the five the issue asks for
    assert 'status="held"' in exprs["OnehaIncidentsHeld"]
    assert "fence_failed" in exprs["OnehaFenceFailed"] and "oneha_fence_total" in exprs["OnehaFenceAttemptsFailing"]
    assert "oneha_recoveries_total" in exprs["OnehaRecoveriesFailing"]
    assert "oneha_subscriber_last_event_timestamp_seconds" in exprs["OnehaSubscriberSilent"]
    assert "oneha_reconcile_duration_seconds_count" in exprs["OnehaSubscriberSilent"]
    assert "oneha_queue_length" in exprs["OnehaQueueGrowing"]


def test_dashboard_parses_and_covers_the_contract():
    dash = json.loads((DEPLOY / "grafana" / "oneha-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"]
        for target in panel["targets"]:
            used |= check_expr(target["expr"])
    assert used == CONTRACT, f"metrics without a panel: {sorted(CONTRACT - used)}"
    # no two panels overlap
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"panel {panel['title']} overlaps"
                cells.add((x, y))
