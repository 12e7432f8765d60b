"""The names deploy files depend on, read from the design contract, and the tools that check them.

DESIGN.md (in shared/, beside the repository) fixes the EDGE_* variables (section 3) and
the metric names (section 4). The other deploy tests import the functions below; the tests
here hold the contract itself against the implementation in edge/metrics.py, so a
dashboard that only uses contract names also only uses names the service exports.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edge.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
GRAFANA = REPO / "grafana"
DESIGN = REPO.parent / "shared" / "DESIGN.md"

#: the standard collectors prometheus_client registers in single-process mode
PROCESS_METRICS = frozenset(
    {
        "process_cpu_seconds_total",
        "process_max_fds",
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_virtual_memory_bytes",
    }
)
#: series Prometheus itself writes for every target
SCRAPE_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def missing(what: str) -> None:
    """A tool or file the check needs is absent: a failure under CI, a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} not available")


def tool(name: str) -> str:
    """The path of a command-line tool: the venv's own first (pip-installed tools), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        missing(f"the `{name}` command")
    assert found is not None
    return found


@cache
def design_text() -> str:
    if not DESIGN.is_file():
        missing("shared/DESIGN.md (the contract)")
    return DESIGN.read_text(encoding="utf-8")


def _section(number: int) -> str:
    text = design_text()
    match = re.search(rf"^## {number}\. .*?(?=^## \d+\. |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"DESIGN.md has no section {number}"
    return match.group(0)


def _first_cells(section: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of every table row in a section, header rows excluded."""
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or set(cells[0]) <= {"-"}:
            continue
        if cells[0] in ("variable", "name", "canonical", "outcome"):
            continue
        rows.append((cells[0], cells[1]))
    return rows


@cache
def design_env_vars() -> frozenset[str]:
    """Every EDGE_* variable named in section 3's table."""
    names: set[str] = set()
    for first, _ in _first_cells(_section(3)):
        names.update(re.findall(r"EDGE_[A-Z0-9_]+", first))
    assert len(names) > 20, names
    return frozenset(names)


@cache
def design_metrics() -> dict[str, str]:
    """Metric name -> type from section 4's table."""
    metrics: dict[str, str] = {}
    for first, kind in _first_cells(_section(4)):
        for name in re.findall(r"[a-z_:][a-z0-9_:]*", first):
            metrics[name] = kind
    assert "edge_requests_total" in metrics, metrics
    return metrics


@cache
def exposed_names() -> frozenset[str]:
    """Every series name a query may use: contract metrics (with histogram suffixes), process_*."""
    names: set[str] = set(PROCESS_METRICS)
    for name, kind in design_metrics().items():
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(name)
    return frozenset(names)


_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan", "atan2"}
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def implemented_names() -> frozenset[str]:
    """Series names edge/metrics.py exports, with the suffixes the exposition adds."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return frozenset(names)


# --- the contract itself --------------------------------------------------------------------


def test_design_lists_the_metrics_deploy_files_rely_on() -> None:
    wanted = {
        "edge_requests_total",
        "edge_request_duration_seconds",
        "edge_stage_duration_seconds",
        "edge_client_disconnects_total",
        "edge_load_shed_total",
        "edge_backend_timeouts_total",
        "edge_origin_requests_total",
        "edge_cache_requests_total",
        "edge_inflight_requests",
        "edge_queue_depth",
        "edge_memory_reserved_bytes",
        "edge_memory_limit_bytes",
        "edge_worker_resident_memory_bytes",
    }
    assert wanted <= set(design_metrics())
    assert design_metrics()["edge_request_duration_seconds"] == "histogram"


def test_every_contract_metric_is_implemented() -> None:
    implemented = implemented_names()
    absent = sorted(n for n in exposed_names() - PROCESS_METRICS if n not in implemented)
    assert not absent, f"named in DESIGN.md section 4 but not exported by edge/metrics.py: {absent}"


def test_design_lists_the_variables_deploy_files_set() -> None:
    for name in ("EDGE_PORT", "EDGE_CACHE", "EDGE_ORIGIN", "EDGE_S3_ENDPOINT_URL"):
        assert name in design_env_vars()
    assert "EDGE_SHUTDOWN_GRACE" in design_env_vars()


def test_promql_metric_names_ignores_functions_labels_and_keywords() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, outcome) (rate(edge_request_duration_seconds_bucket"
        '{job=~"$job", instance=~"$instance"}[$__rate_interval]))) > bool 2'
        " and on (job) up offset 5m / ignoring(code) group_left edge_memory_limit_bytes"
    )
    assert promql_metric_names(expr) == {
        "edge_request_duration_seconds_bucket",
        "up",
        "edge_memory_limit_bytes",
    }
