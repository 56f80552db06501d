"""The Grafana dashboards stay provisionable and query only series that exist."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumer.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series of prometheus-nats-exporter (github.com/nats-io/prometheus-nats-exporter). gnatsd_varz_*
# are built in collector/collector.go (NATSCollector.initMetricsFromServers) from the numeric
# fields of the server's /varz, label server_id; jetstream_* are declared in collector/jsz.go
# (newJszCollector), labels server_id, server_name, cluster, stream_name, consumer_name, ...
NATS_EXPORTER_SERIES = frozenset(
    [
        "gnatsd_varz_connections",
        "gnatsd_varz_in_msgs",
        "gnatsd_varz_out_msgs",
        "gnatsd_varz_in_bytes",
        "gnatsd_varz_out_bytes",
        "gnatsd_varz_slow_consumers",
        "gnatsd_varz_mem",
        "gnatsd_varz_cpu",
        "jetstream_stream_total_messages",
        "jetstream_stream_total_bytes",
        "jetstream_consumer_num_pending",
        "jetstream_consumer_num_ack_pending",
        "jetstream_consumer_num_redelivered",
        "jetstream_consumer_num_waiting",
    ]
)
PYEXEC_NAME = re.compile(r"\bpyexec_[a-z_]+")
NATS_NAME = re.compile(r"\b(?:gnatsd|jetstream)_[a-z_]+")
RANGE_CALL = re.compile(r"\b(?:rate|irate|increase)\s*\(")


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels kept inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of every panel target."""
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard["templating"]["list"]}


def named_series(dashboard: dict[str, Any], pattern: re.Pattern[str]) -> set[str]:
    """Series names matching ``pattern`` in the panel queries and the variable queries."""
    texts = queries(dashboard)
    for var in variables(dashboard).values():
        query = var.get("query", "")
        texts.append(query.get("query", "") if isinstance(query, dict) else str(query))
    return {name for text in texts for name in pattern.findall(text)}


def datasource_values(node: Any) -> Iterator[Any]:
    """Every value of a ``datasource`` key anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_values(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_values(item)


def concrete(expr: str) -> str:
    """``expr`` with Grafana's variables replaced by values PromQL accepts."""
    expr = re.sub(r"\$\{__\w+\}|\$__\w+", "5m", expr)
    return re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", ".*", expr)


def test_there_are_dashboards() -> None:
    """The dashboards folder holds at least one dashboard."""
    assert DASHBOARDS, "no dashboards/*.json"


@pytest.fixture(params=DASHBOARDS, ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_is_valid_json(path: Path) -> None:
    """Each file parses as JSON and has a uid, a title and panels."""
    dashboard = load(path)
    assert dashboard.get("uid")
    assert dashboard.get("title")
    assert list(panels(dashboard))


def test_pyexec_series_exist(dashboard: dict[str, Any]) -> None:
    """Every pyexec_ series a query names is one that consumer/metrics.py exports."""
    exported = Metrics(version="test", longest_timeout=3600).names()
    used = named_series(dashboard, PYEXEC_NAME)
    assert used, "no pyexec_ series found in any query"
    assert used - exported == set(), f"not exported by consumer.metrics: {sorted(used - exported)}"


def test_nats_series_come_from_the_exporter(dashboard: dict[str, Any]) -> None:
    """Every NATS series a query names is one prometheus-nats-exporter exports."""
    used = named_series(dashboard, NATS_NAME)
    assert used - NATS_EXPORTER_SERIES == set(), f"unknown: {sorted(used - NATS_EXPORTER_SERIES)}"


def test_datasource_is_a_template_variable(dashboard: dict[str, Any]) -> None:
    """A datasource variable of type prometheus; no __inputs, ${DS_...} or fixed datasource uid."""
    datasource = variables(dashboard)["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    assert "__inputs" not in dashboard
    assert "${DS_" not in json.dumps(dashboard)
    assert all(value == DATASOURCE for value in datasource_values(dashboard))


def test_job_and_instance_variables_filter_pyexec_queries(dashboard: dict[str, Any]) -> None:
    """Variables job and instance exist, and every pyexec_ query filters on both."""
    job, instance = variables(dashboard)["job"], variables(dashboard)["instance"]
    assert job["definition"] == "label_values(pyexec_build_info, job)"
    assert instance["multi"]
    assert instance["includeAll"]
    for query in queries(dashboard):
        if PYEXEC_NAME.search(query):
            assert '=~"$job"' in query, query
            assert '=~"$instance"' in query, query


def test_every_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """Every panel but rows, and each of its targets, queries ${datasource}."""
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("datasource") == DATASOURCE, panel["title"]
            assert panel.get("targets"), panel["title"]
            for target in panel["targets"]:
                assert target.get("datasource") == DATASOURCE, (panel["title"], target)


def test_rate_windows_are_the_rate_interval(dashboard: dict[str, Any]) -> None:
    """Every rate, irate and increase takes its window from $__rate_interval."""
    for query in queries(dashboard):
        for call in RANGE_CALL.finditer(query):
            window = re.match(r"[^\[\]()]*\[([^\]]*)\]", query[call.end() :])
            assert window, f"no range selector after {call.group()!r} in {query}"
            assert window.group(1) == "$__rate_interval", query


def test_every_panel_has_a_unit(dashboard: dict[str, Any]) -> None:
    """Every panel but rows sets fieldConfig.defaults.unit."""
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), panel["title"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    """No two panels share an id."""
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    """Every gridPos lies within the 24 columns and no two panels cover the same cell."""
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert min(pos["x"], pos["y"]) >= 0, panel["title"]
        assert 0 < pos["w"] <= 24 - pos["x"], panel["title"]
        assert pos["h"] > 0, panel["title"]
        xs, ys = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        for cell in itertools.product(xs, ys):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]


def test_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool accepts every query, variables filled in, as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not on PATH and CI is set: install it (Debian: prometheus)")
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus); set CI to fail")
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": concrete(query)}
        for i, query in enumerate(queries(dashboard))
    ]
    rules_file = tmp_path / "rules.yml"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
