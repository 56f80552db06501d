"""The Grafana dashboards stay provisionable and query only series that exist."""

from __future__ import annotations

import http.client
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
from prometheus_client.parser import text_string_to_metric_families

from consumer.metrics import Metrics
from tests.conftest import NatsServer, free_port, start_replica

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


def concrete(expr: str, dashboard: dict[str, Any] | None = None) -> str:
    """``expr`` with Grafana's variables replaced by values PromQL accepts: a textbox variable
    by its default, the others by a regular expression that matches everything."""
    for name, var in (variables(dashboard) if dashboard else {}).items():
        if var["type"] == "textbox":
            expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", var["query"], expr)
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
        {"record": f"dashboard:query_{i}:check", "expr": concrete(query, dashboard)}
        for i, query in enumerate(queries(dashboard))
    ]
    rules_file = tmp_path / "rules.yml"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def fresh_exposition(nats_server: NatsServer) -> str:
    """The /metrics text of a replica that has served nothing yet."""
    port = free_port()
    replica = start_replica(
        nats_server.url, EXECUTOR_METRICS_PORT=str(port), EXECUTOR_METRICS_HOST="127.0.0.1"
    )
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
    finally:
        replica.stop()
    return text


def test_every_pyexec_series_is_in_a_fresh_replicas_metrics(
    dashboard: dict[str, Any], fresh_exposition: str
) -> None:
    """Each pyexec_ series a panel queries is in the /metrics of a replica that has served
    nothing yet (its family is declared there; labelled counters with samples at 0)."""
    exported = {
        sample.name
        for family in text_string_to_metric_families(fresh_exposition)
        for sample in family.samples
    }
    declared = set(re.findall(r"^# TYPE (\S+) (\w+)", fresh_exposition, re.MULTILINE))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for name, kind in declared:
        exported |= {name + suffix for suffix in suffixes.get(kind, ("",))}
    used = named_series(dashboard, PYEXEC_NAME)
    assert used - exported == set(), sorted(used - exported)


def test_fleet_panels_compare_with_the_expected_replica_count(dashboard: dict[str, Any]) -> None:
    """A textbox variable holds the expected replica count; the ready-replicas stat takes its
    green threshold from it (config from query results), so it turns red below it."""
    expected = variables(dashboard)["expected_replicas"]
    assert expected["type"] == "textbox"
    assert expected["query"].isdigit()
    ready = next(p for p in panels(dashboard) if p["title"].startswith("Ready replicas"))
    refs = {t["refId"]: t["expr"] for t in ready["targets"]}
    (transform,) = ready["transformations"]
    assert transform["id"] == "configFromData"
    config = refs[transform["options"]["configRefId"]]
    assert "$expected_replicas" in config
    assert transform["options"]["mappings"][0]["handlerKey"] == "threshold1"
    steps = ready["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[0]["color"] == "red"
    assert any("pyexec_ready" in expr for expr in refs.values())


def test_error_panel_shows_what_the_alert_counts(dashboard: dict[str, Any]) -> None:
    """The error ratio panel shows all failures and the service-side ratio the alert pages on."""
    panel = next(p for p in panels(dashboard) if p["title"].startswith("Error ratio"))
    exprs = " ".join(t["expr"] for t in panel["targets"])
    assert 'status!~"ok|accepted"' in exprs
    assert 'code=~"worker_lost|overloaded"' in exprs
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    assert 'code=~"worker_lost|overloaded"' in rules


def test_saturation_and_jobs_panels_use_the_counters(dashboard: dict[str, Any]) -> None:
    """Busy seconds give saturation between scrapes; jobs taken count jobs stored straight in
    the stream too."""
    used = named_series(dashboard, PYEXEC_NAME)
    assert {"pyexec_worker_busy_seconds_total", "pyexec_jobs_taken_total"} <= used
