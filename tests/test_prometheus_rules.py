"""deploy/prometheus: config and rules pass promtool, and every alert fires in a unit test."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_contract import (
    DEPLOY,
    SCRAPE_METRICS,
    design_env_vars,
    exposed_names,
    promql_metric_names,
    tool,
)

PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False
    )


@cache
def rules() -> list[dict[str, Any]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend(group["rules"])
    return found


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def expanded_names(expr: str) -> set[str]:
    """Metric names an expression reads, recorded series replaced by what they are made of."""
    names = set()
    for name in promql_metric_names(expr):
        names |= expanded_names(recorded()[name]) if name in recorded() else {name}
    return names


def test_rule_files_exist() -> None:
    assert {p.name for p in RULE_FILES} == {"edge-recording.yml", "edge-alerts.yml"}
    assert UNIT_TESTS


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["job_name"] == "edge"
    assert sorted(config["rule_files"]) == sorted(f"rules/{p.name}" for p in RULE_FILES)


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "FAILED" not in result.stdout


def test_every_alert_fires_in_a_unit_test() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text())
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names <= fired, f"never fired in a unit test: {sorted(names - fired)}"
    assert names <= silent, f"never shown silent (healthy or pending): {sorted(names - silent)}"


def test_every_alert_is_documented_with_a_runbook_naming_a_knob() -> None:
    for rule in alerts():
        notes = rule.get("annotations", {})
        assert {"summary", "description", "runbook"} <= set(notes), rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("page", "warning", "ticket")
        knobs = set(re.findall(r"EDGE_[A-Z_]+[A-Z]", notes["runbook"]))
        assert knobs, f"{rule['alert']}: the runbook names no EDGE_* setting"
        mentioned = set(re.findall(r"EDGE_[A-Z_]+[A-Z]", " ".join(notes.values())))
        assert mentioned <= design_env_vars(), mentioned - design_env_vars()


def test_rules_use_only_contract_metrics() -> None:
    allowed = exposed_names() | SCRAPE_METRICS | set(recorded())
    for rule in rules():
        unknown = promql_metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_recorded_series_follow_the_naming_convention() -> None:
    for name in recorded():
        level, metric, operation = name.split(":")
        assert level, name
        assert metric.startswith("edge_"), name
        assert operation, name


def _alert_reading(*metrics: str) -> dict[str, Any]:
    for rule in alerts():
        if set(metrics) <= expanded_names(rule["expr"]):
            return rule
    raise AssertionError(f"no alert reads {metrics}")


def _grouping(rule: dict[str, Any]) -> str:
    text = rule["expr"]
    for name, expr in recorded().items():
        text = text.replace(name, f"({expr})")
    return text


def test_the_required_alerts_exist() -> None:
    # 5xx ratio, over all outcomes that are server-side failures
    failure = _alert_reading("edge_requests_total")
    assert "overloaded" in _grouping(failure)
    # sustained 503 shedding by reason, 504s by stage, 499s
    assert "by (job, reason)" in _grouping(_alert_reading("edge_load_shed_total"))
    assert "by (job, stage)" in _grouping(_alert_reading("edge_backend_timeouts_total"))
    assert "by (job, stage)" in _grouping(_alert_reading("edge_client_disconnects_total"))
    # memory reservations against the limit
    _alert_reading("edge_memory_reserved_bytes", "edge_memory_limit_bytes")
    # cache errors
    assert 'result="error"' in _grouping(_alert_reading("edge_cache_requests_total"))
    # p99 latency from the request histogram
    latency = _alert_reading("edge_request_duration_seconds_bucket")
    assert "histogram_quantile(0.99" in _grouping(latency)
    # target down
    down = _alert_reading("up")
    assert re.search(r"up\{[^}]*\}\s*==\s*0", down["expr"])
    for rule in alerts():
        assert rule.get("for"), f"{rule['alert']} fires on one evaluation"
