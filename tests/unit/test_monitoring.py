"""The Grafana dashboard and the Prometheus alerts in monitoring/ hold: promtool accepts the
rules and their unit tests pass, and every metric they query is one the daemon exports,
with the labels they use. promtool is required (Debian's `prometheus` package; .ci/run
installs it): without it these tests fail, they are not skipped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics
from engine.records import TypeFlow

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "workflowd-dashboard.json"
RULES = MONITORING / "prometheus" / "workflowd-alerts.yml"
RULE_TESTS = MONITORING / "prometheus" / "workflowd-alerts.test.yml"
DASHBOARD_UID = "workflowd-overview"

# Labels Prometheus adds to every scraped series, and a histogram bucket's bound.
SCRAPE_LABELS = {"instance", "job", "le"}
# PromQL words that are neither functions (followed by a parenthesis) nor metric names.
KEYWORDS = {"and", "or", "unless", "offset", "bool"}
# Clauses whose parentheses list label names, not expressions.
LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
IDENTIFIER = re.compile(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()")


def promtool(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path is not None, "promtool is missing: apt-get install prometheus (it ships promtool)"
    return subprocess.run(
        [path, *arguments], cwd=RULES.parent, input=stdin, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def exported_metrics() -> Metrics:
    """A Metrics() with every labelled metric touched and the global gauges filled, as
    the lock holder exports them: all the series a daemon's /metrics can show."""
    metrics = Metrics()
    metrics.export_relay()  # as a daemon with WORKFLOWD_EVENTS_URL does
    for collector in list(metrics.registry._collector_to_names):
        if isinstance(collector, Counter | Gauge | Histogram) and collector._labelnames:
            child = collector.labels(*("x" for _ in collector._labelnames))
            if isinstance(child, Histogram):
                child.observe(1)
            else:
                child.inc()
    depth = metrics.queue_depth
    depth.holder = True
    depth.depths = {("t", "pending"): 1}
    depth.unserved = {"t@2": 1}
    depth.flow = [
        TypeFlow.model_validate({
            "type": "t", "in_flight": 1, "max_concurrency": 2, "rate_limit": "10/1s", "rate_limit_starts": 10,
            "rate_period_seconds": 1.0, "started_in_period": 3, "due": 4, "throttled": 0, "oldest_due_age_seconds": 5.0,
        })
    ]  # fmt: skip
    return metrics


def exported_series() -> dict[str, set[str]]:
    """Each sample name a daemon exports (`..._total`, `..._bucket`), with its labels."""
    exposition = generate_latest(exported_metrics().registry).decode()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    panels = dashboard()["panels"]
    return [*panels, *(inner for panel in panels for inner in panel.get("panels", []))]


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions,
    keywords, label names (of matchers and of by/on clauses), strings or durations."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = LABEL_LISTS.sub("", bare)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^]]*\]", "", bare)
    bare = re.sub(r"\boffset\s+\w+", "", bare)
    return {name for name in IDENTIFIER.findall(bare) if name not in KEYWORDS}


def unknown_names_and_labels(expr: str, series: dict[str, set[str]]) -> list[str]:
    problems = [f"{name} is not exported" for name in sorted(metric_names(expr)) if name not in series]
    for name, matchers in SELECTOR.findall(expr):
        problems += [
            f"{name} has no label {label}"
            for label in MATCHER.findall(matchers)
            if label not in series.get(name, set()) | SCRAPE_LABELS
        ]
    selected = set().union(*(series.get(name, set()) for name in metric_names(expr)))
    for _, labels in LABEL_LISTS.findall(expr):
        problems += [
            f"no metric of the expression has label {label}"
            for label in (word.strip() for word in labels.split(","))
            if label and label not in selected | SCRAPE_LABELS
        ]
    return problems


def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_alerts_fire_when_they_should_and_only_then() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_and_says_how_bad_and_what() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert {alert["alert"] for alert in alerts} <= tested
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]


@pytest.mark.parametrize("readme", ["README.md", "monitoring/README.md"])
def test_the_readmes_promtool_lines_run_as_written(readme: str) -> None:
    """The shell block of README.md's "Grafana and alerts" (marked as run here) and of
    monitoring/README.md, line by line from the repository's root."""
    blocks = re.findall(
        r"^(?:<!-- readme-test: (.+?) -->\n)?```sh\n(.*?)^```$", (ROOT / readme).read_text(), re.M | re.S
    )
    (code,) = [
        code for mode, code in blocks if "promtool" in code and (not mode or "test_monitoring.py" in mode)
    ]
    lines = code.strip().splitlines()
    assert any(line.startswith("promtool check rules") for line in lines), code
    assert any(line.startswith("promtool test rules") for line in lines), code
    assert shutil.which("promtool") is not None, "promtool is missing: apt-get install prometheus"
    for line in lines:
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", line],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert ran.returncode == 0, f"{line}\n{ran.stdout}{ran.stderr}"


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_queried_is_one_the_daemon_exports(source: str) -> None:
    series = exported_series()
    expressions = rule_expressions() if source == "rules" else dashboard_expressions()
    assert expressions
    problems = {expr: found for expr in expressions if (found := unknown_names_and_labels(expr, series))}
    assert not problems, problems
    queried = set().union(*(metric_names(expr) for expr in expressions))
    assert all(name.startswith("workflowd_") for name in queried), queried


def test_the_names_check_sees_what_it_must() -> None:
    series = {"workflowd_a_total": {"type"}, "workflowd_b": set()}
    expr = 'sum by (type) (rate(workflowd_a_total{state="x"}[5m])) / max(workflowd_b offset 5m) and up'
    assert metric_names(expr) == {"workflowd_a_total", "workflowd_b", "up"}
    assert unknown_names_and_labels(expr, series) == [
        "up is not exported",
        "workflowd_a_total has no label state",
    ]
    assert unknown_names_and_labels("max by (served) (workflowd_b)", series) == [
        "no metric of the expression has label served"
    ]


def test_the_dashboard_imports_anywhere_with_a_fixed_uid() -> None:
    board = dashboard()
    assert board["uid"] == DASHBOARD_UID
    assert board.get("id") is None  # an id would tie it to one Grafana's database
    assert board["schemaVersion"] >= 39
    (variable,) = board["templating"]["list"]  # the data source, nothing else
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    panels = dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_the_dashboard_covers_what_operators_watch() -> None:
    queried = set().union(*(metric_names(expr) for expr in dashboard_expressions()))
    assert {
        "workflowd_workflows_started_total", "workflowd_workflows_finished_total", "workflowd_step_retries_total",
        "workflowd_queue_depth", "workflowd_oldest_due_age_seconds", "workflowd_pickup_lag_seconds_bucket",
        "workflowd_lost_leases_total", "workflowd_claim_rejections_total", "workflowd_database_errors_total",
        "workflowd_steps_in_flight", "workflowd_concurrency_limit", "workflowd_in_flight_workflows",
        "workflowd_rate_limit_starts", "workflowd_throttled_workflows", "workflowd_due_workflows",
        "workflowd_relay_lag_seconds", "workflowd_relay_lag_events", "workflowd_events_published_total",
        "workflowd_relay_leader", "workflowd_unserved_workflows",
    } <= queried  # fmt: skip


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's $__rate_interval as a duration, as a recording
    rule that `promtool check rules` parses."""
    rules = [
        {"record": f"workflowd:dashboard_query_{number}", "expr": expr.replace("$__rate_interval", "1m")}
        for number, expr in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_finds_nothing_to_lint_in_the_exposition() -> None:
    exposition = generate_latest(exported_metrics().registry).decode()
    checked = promtool("check", "metrics", stdin=exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr
