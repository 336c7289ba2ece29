"""The monitoring Perito ships, checked as Prometheus and Grafana would read it: the alert
rules (deploy/prometheus/rules) and their promtool unit tests, the dashboard's queries
(deploy/grafana/perito.json), and every metric either names against what a live server and a
live worker export. promtool comes from Debian's `prometheus` package (`make system-deps`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

import perito
from tests.conftest import publish_tiny
from tests.helpers import ServerThread, Stores, WorkerProcess, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "perito.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "perito.json"
# Grafana's own variables as a query reads once Grafana has filled them in; `$model` is the
# dashboard's template variable.
GRAFANA_VARIABLES = {
    "${model}": "car-damage",
    "$model": "car-damage",
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}
# Series Prometheus makes itself for every target it scrapes: no exporter lists them.
SCRAPE_SERIES = {"up"}
# What is left of a query once strings, label matchers, ranges and label lists are gone: names
# of metrics, functions (followed by "("), operators and numbers.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS` in the repository root; fails the test (not skips it) when promtool is
    not installed, so a machine without it cannot pass `make test` by leaving this out."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: `make system-deps` installs Debian's prometheus")
    return subprocess.run(
        ["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, `{"perito_requests_total"}`."""
    text = _STRING.sub('""', expr)
    while _MATCHERS.search(text):
        text = _MATCHERS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", _RANGE.sub(" ", text))
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def alert_exprs() -> dict[str, str]:
    """Each alert's (or recording rule's) expression, by its name."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in groups
        for rule in group["rules"]
    }


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries() -> dict[str, str]:
    """Each panel target's query, and the template variables' queries, with Grafana's
    variables filled in, by `panel title / refId`."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC, LABEL): its metric selector
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert found, variable["definition"]
            queries[f"variable {variable['name']}"] = found.group(1)
    filled = {}
    for where, query in queries.items():
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"{where}: a variable the test does not fill in: {query}"
        filled[where] = query
    return filled


def exported_names(text: str) -> set[str]:
    """The sample names a /metrics page's families can have: each `# TYPE` line's family (a
    counter's ends in `_total`), and a histogram's `_bucket`, `_count` and `_sum`."""
    names = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, family, kind = line.split(maxsplit=3)
        names.add(family)
        if kind in ("histogram", "gaugehistogram"):
            names |= {f"{family}_bucket", f"{family}_count", f"{family}_sum"}
        elif kind == "summary":
            names |= {f"{family}_count", f"{family}_sum"}
    return names


def test_the_alert_rules_load_and_pass_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr  # prometheus.yml loads them
    cases = sorted((PROMETHEUS / "tests").glob("*.yml"))
    tested = promtool("test", "rules", *map(str, cases))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # These alerts have cases that fire and cases that do not.
    for alert in (
        "PeritoDriftDetected",
        "PeritoShadowDisagreement",
        "PeritoShadowFailing",
        "PeritoLatencyP99High",
        "PeritoDeadLetters",
    ):
        texts = [case.read_text() for case in cases]
        assert any(f"alertname: {alert}\n" in text for text in texts), alert


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": query}
                    for i, query in enumerate(queries.values())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metric_names_are_read_from_queries() -> None:
    expr = (
        'sum by (model, le) (rate(perito_a_bucket{code=~"A|B", x="y{z}"}[5m])) '
        "/ ignoring (version) group_left sum(perito_b) > 0.1 and on (model) up == 0"
    )
    assert metric_names(expr) == {"perito_a_bucket", "perito_b", "up"}


def test_every_metric_named_is_exported_by_a_live_server_and_worker(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    named = {
        name: where
        for where, expr in {**alert_exprs(), **dashboard_queries()}.items()
        for name in metric_names(expr)
    }
    stores = Stores(tmp_path, redis_url)
    publish_tiny(stores.open_registry("publish"), tiny_model_file, name="car-damage")
    worker_port = free_port()
    worker_env = stores.worker_env(PERITO_METRICS_PORT=str(worker_port))
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    with WorkerProcess(worker_env, tmp_path / "worker.log").wait_ready():
        with (
            ServerThread(stores.server_settings(metrics_port=0)) as server,
            perito.Client(server.target) as client,
        ):
            client.classify([image], model="car-damage")
            job = client.submit_job([image] * 2, model="car-damage").wait(60)
            assert job.succeeded == 2
            port = server.running.metrics_port  # type: ignore[attr-defined]
            served = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        deadline = time.monotonic() + 20  # the finalising task may land a moment later
        while True:
            worked = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text
            if "perito_worker_jobs_finished_total{" in worked or time.monotonic() > deadline:
                break
            time.sleep(0.2)

    # The dead-letter alert's increase() sees a worker's first dead letter only if the series
    # was there before it.
    assert 'perito_worker_chunks_total{outcome="dead_lettered"} 0.0' in worked
    exported = exported_names(served) | exported_names(worked) | SCRAPE_SERIES
    missing = {name: where for name, where in named.items() if name not in exported}
    assert not missing, "named but exported by neither a server nor a worker:\n" + "\n".join(
        f"  {name}  (in {where})" for name, where in sorted(missing.items())
    )
