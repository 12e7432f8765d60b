"""grafana/: the dashboard reads only contract metrics, every query is filtered by job/instance."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import yaml

from tests.test_deploy_contract import GRAFANA, exposed_names, promql_metric_names

DASHBOARD = GRAFANA / "dashboards" / "edge.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "edge.yml"


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p["type"] != "row"]


def exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def test_dashboard_is_valid_json_with_identity() -> None:
    board = dashboard()
    assert board["uid"] == "edge-overview"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_template_variables_job_and_instance() -> None:
    found = variables()
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        var = found[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["multi"]
        assert var["includeAll"]
        assert variable_query(var).startswith("label_values(")
    assert '"$job"' in variable_query(found["instance"])


def test_every_panel_has_a_datasource_and_targets() -> None:
    assert len(panels()) >= 12
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_metric_is_in_the_contract() -> None:
    used: set[str] = set()
    for expr in exprs():
        used |= promql_metric_names(expr)
    for var in variables().values():
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable_query(var))
            assert inner, variable_query(var)
            used |= promql_metric_names(inner.group(1))
    unknown = used - exposed_names()
    assert not unknown, f"not in DESIGN.md section 4: {sorted(unknown)}"


def test_every_selector_is_filtered_by_job_and_instance() -> None:
    for expr in exprs():
        names = promql_metric_names(expr)
        assert names, expr
        selectors = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", expr)
        for name, matchers in selectors:
            if name not in names:
                continue
            assert 'job=~"$job"' in matchers, f"{name} unfiltered by job in {expr}"
            assert 'instance=~"$instance"' in matchers, f"{name} unfiltered by instance in {expr}"


def _panel_reading(metric: str, grouping: str | None = None) -> dict[str, Any]:
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            if metric in promql_metric_names(expr) and (
                grouping is None or re.search(rf"by \([^)]*\b{grouping}\b", expr)
            ):
                return panel
    raise AssertionError(f"no panel reads {metric} by {grouping}")


def test_the_required_panels_exist() -> None:
    _panel_reading("edge_requests_total", "outcome")
    _panel_reading("edge_client_disconnects_total", "stage")
    _panel_reading("edge_load_shed_total", "reason")
    _panel_reading("edge_backend_timeouts_total", "stage")
    latency = _panel_reading("edge_request_duration_seconds_bucket", "outcome")
    assert {"p50", "p99"} <= {t["legendFormat"].split()[0] for t in latency["targets"]}
    _panel_reading("edge_stage_duration_seconds_bucket", "stage")
    hit_ratio = _panel_reading("edge_cache_requests_total", "tier")
    assert any("hit" in t["expr"] for t in hit_ratio["targets"])
    _panel_reading("edge_queue_depth")
    _panel_reading("edge_inflight_requests")
    memory = _panel_reading("edge_memory_reserved_bytes")
    assert any("edge_memory_limit_bytes" in t["expr"] for t in memory["targets"])
    rss = _panel_reading("edge_worker_resident_memory_bytes", "worker")
    assert any("process_resident_memory_bytes" in t["expr"] for t in rss["targets"])
    _panel_reading("edge_origin_requests_total", "code")


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    sources = yaml.safe_load(DATASOURCES.read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"]
    providers = yaml.safe_load(PROVIDERS.read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
