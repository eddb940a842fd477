"""The monitoring kit in deploy/: the rules pass promtool and fire when they should, the dashboard is
Grafana-shaped with valid PromQL, and every metric either one uses exists in a live scrape."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Upstream, cli, running_gateway, write_config

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "credgate-rules.yml"
PROMETHEUS_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.example.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "credgate-dashboard.json"
ADMIN_METRICS = ROOT / "admin" / "metrics.py"

# Grafana variables in the dashboard's expressions, replaced by what Prometheus itself would accept.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}
# Metrics Prometheus makes itself, not credgate.
PROMETHEUS_OWN = {"up"}
# What a worker publishes after serving a request (its batched flush), waited for before reading the scrape.
PUBLISHED_PER_REQUEST = ("credgate_requests_total", "credgate_request_duration_seconds_bucket",
                         "credgate_upstream_duration_seconds_bucket", "credgate_ratelimit_decisions_total")
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}


# --- promtool ------------------------------------------------------------------------------------------


def _fetch_promtool(cache: Path) -> Path | None:
    """promtool from Debian's `prometheus` package, unpacked into the pytest cache without installing the
    package (so no Prometheus service is set up). None when apt or the network is not available."""
    binary = cache / "usr" / "bin" / "promtool"
    if binary.exists():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    try:
        subprocess.run(["apt-get", "download", "prometheus"], cwd=cache, check=True, timeout=90,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for deb in cache.glob("prometheus_*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True, timeout=60)
            deb.unlink()
    except (OSError, subprocess.SubprocessError):
        return None
    return binary if binary.exists() else None


@pytest.fixture(scope="session")
def promtool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    found = shutil.which("promtool")
    if found is None:
        # the pytest cache keeps the unpacked binary between runs (when the cache plugin is on)
        cache = request.config.cache
        where = Path(cache.mkdir("promtool")) if cache is not None else tmp_path_factory.mktemp("promtool")
        fetched = _fetch_promtool(where)
        if fetched is None:
            pytest.skip("promtool is not installed and could not be fetched: `apt-get install -y prometheus` "
                        "(Debian/Ubuntu) provides it")
        found = str(fetched)
    yield found


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_rules_and_example_config_pass_promtool(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", str(RULES))
    # from its own directory, as documented, so that rule_files resolves to the rules beside it
    run_promtool(promtool, "check", "config", PROMETHEUS_EXAMPLE.name, cwd=PROMETHEUS_EXAMPLE.parent)


def _without_annotations(rules_text: str) -> str:
    """The rules with their annotations removed: promtool's unit tests compare rendered annotations, and
    this test is about when alerts fire (`check rules` has already validated the templates)."""
    kept: list[str] = []
    skip_deeper_than: int | None = None
    for line in rules_text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


GW = 'job="credgate-gateway",instance="gw1:9100"'


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": values}


def fires(alert: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """An alert_rule_test: `alert` fires at `at` with these labels, or (labels None) does not fire."""
    expected = [] if labels is None else [{"exp_labels": labels}]
    return {"eval_time": at, "alertname": alert, "exp_alerts": expected}


GW_LABELS = {"job": "credgate-gateway", "instance": "gw1:9100"}
ADMIN = 'job="credgate-admin",instance="a1:9101"'

ALERT_CASES: list[tuple[str, list[dict[str, str]], list[dict[str, Any]]]] = [
    ("store down for a minute", [series("credgate_store_up", GW, "1 0x10")], [
        fires("CredgateStoreDown", "1m", None),
        fires("CredgateStoreDown", "3m", {**GW_LABELS, "severity": "critical"})]),
    ("redis down only counts where redis is configured", [
        series("credgate_redis_up", GW, "0x10"),
        series("credgate_redis_configured", GW, "1x10"),
        series("credgate_redis_up", 'job="credgate-gateway",instance="gw2:9100"', "0x10"),
        series("credgate_redis_configured", 'job="credgate-gateway",instance="gw2:9100"', "0x10"),
    ], [fires("CredgateRedisDown", "5m", {**GW_LABELS, "severity": "warning"})]),
    ("listen channel lost", [series("credgate_listen_connected", GW, "0x10")], [
        fires("CredgateListenDisconnected", "5m", {**GW_LABELS, "severity": "warning"})]),
    ("half the presented credentials refused", [
        series("credgate_requests_total", GW + ',route="api",method="GET",status="2xx",outcome="ok"', "0+60x30"),
        series("credgate_requests_total", GW + ',route="api",method="GET",status="4xx",outcome="invalid"', "0+60x30"),
        series("credgate_requests_total", GW + ',route="-",method="GET",status="4xx",outcome="none"', "0+600x30"),
    ], [fires("CredgateAuthFailureRatioHigh", "20m", {"job": "credgate-gateway", "severity": "warning"}),
        fires("CredgateHigh5xxRatio", "20m", None)]),
    ("a trickle of failures is not an incident", [
        series("credgate_requests_total", GW + ',route="api",method="GET",status="4xx",outcome="invalid"', "0+3x30"),
    ], [fires("CredgateAuthFailureRatioHigh", "20m", None)]),
    ("upstream down", [
        series("credgate_requests_total", GW + ',route="api",method="GET",status="2xx",outcome="ok"', "0+60x30"),
        series("credgate_requests_total", GW + ',route="api",method="GET",status="5xx",outcome="ok"', "0+60x30"),
    ], [fires("CredgateHigh5xxRatio", "20m", {"job": "credgate-gateway", "severity": "critical"}),
        fires("CredgateAuthFailureRatioHigh", "20m", None)]),
    ("argon2 queue full", [series("credgate_argon2_rejected_total", GW, "0+10x30")], [
        fires("CredgateArgon2Saturated", "15m", {**GW_LABELS, "severity": "warning"})]),
    ("invalidations arrive late", [
        series("credgate_invalidation_lag_seconds_bucket", GW + ',le="1"', "0x30"),
        series("credgate_invalidation_lag_seconds_bucket", GW + ',le="5"', "0+10x30"),
        series("credgate_invalidation_lag_seconds_bucket", GW + ',le="+Inf"', "0+10x30"),
    ], [fires("CredgateInvalidationLagHigh", "25m", {**GW_LABELS, "severity": "warning"})]),
    ("credentials about to expire", [
        series("credgate_admin_credentials_expiring", ADMIN + ',within_days="7"', "2x120"),
        series("credgate_admin_credentials_expiring", ADMIN + ',within_days="30"', "5x120"),
    ], [fires("CredgateCredentialsExpiringWithin7Days", "20m", {"job": "credgate-admin", "severity": "warning"}),
        fires("CredgateCredentialsExpiringWithin30Days", "20m", None),
        fires("CredgateCredentialsExpiringWithin30Days", "90m", {"job": "credgate-admin", "severity": "info"})]),
    ("nothing expiring", [
        series("credgate_admin_credentials_expiring", ADMIN + ',within_days="7"', "0x120"),
    ], [fires("CredgateCredentialsExpiringWithin7Days", "90m", None)]),
    ("rate limits decided without redis", [
        series("credgate_ratelimit_shared", GW, "0x10"),
        series("credgate_redis_configured", GW, "1x10"),
    ], [fires("CredgateRateLimitsDegraded", "1m", None),
        fires("CredgateRateLimitsDegraded", "5m", {**GW_LABELS, "severity": "warning"})]),
    ("a credential limited most of the time", [series("credgate_ratelimit_saturated_credentials", GW, "1x30")], [
        fires("CredgateCredentialRateLimitedMostOfTheTime", "10m", None),
        fires("CredgateCredentialRateLimitedMostOfTheTime", "20m", {"job": "credgate-gateway", "severity": "info"})]),
    ("audit chain broken on one admin replica", [
        series("credgate_audit_chain_ok", ADMIN, "1 1 0x10"),
        series("credgate_audit_chain_ok", 'job="credgate-admin",instance="a2:9101"', "1x12"),
    ], [fires("CredgateAuditChainBroken", "2m", None),
        fires("CredgateAuditChainBroken", "4m", {"job": "credgate-admin", "severity": "critical"})]),
    ("audit chain not verified yet", [series("credgate_audit_chain_ok", ADMIN, "NaN 1x10")], [
        fires("CredgateAuditChainBroken", "1m", None), fires("CredgateAuditChainBroken", "5m", None)]),
    ("gateway not scraped", [series("up", GW, "0x10")], [
        fires("CredgateGatewayDown", "5m", {**GW_LABELS, "severity": "critical"})]),
]


def test_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(_without_annotations(RULES.read_text()))
    spec = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"name": name, "interval": "1m", "input_series": inputs, "alert_rule_test": checks}
                  for name, inputs, checks in ALERT_CASES],
    }
    unit_tests = tmp_path / "alerts_test.yml"
    unit_tests.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    run_promtool(promtool, "test", "rules", str(unit_tests))


# --- the dashboard -------------------------------------------------------------------------------------


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, Grafana variables replaced."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def test_dashboard_is_grafana_shaped() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        where = panel["title"]
        assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table"), where
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        assert all(t["expr"].strip() for t in panel["targets"]), where
    titles = " ".join(p["title"].lower() for p in graphs)
    for topic in ("requests", "auth outcomes", "latency", "cache hit ratio", "argon2", "upstream errors",
                  "invalidations", "expiring", "rate-limit decisions"):
        assert topic in titles, f"the dashboard has no {topic} panel"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool has no query linter, but it parses recording rules: one per dashboard target."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:target_{i}", "expr": expr}
        for i, (_title, expr) in enumerate(dashboard_targets(dashboard))]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))
    run_promtool(promtool, "check", "rules", str(path))


# --- every metric used exists ----------------------------------------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "inf", "nan"}


def promql_metrics(expr: str) -> dict[str, set[str]]:
    """Metric names in a PromQL expression, each with the label names its selectors match on."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(\{[^}]*\})?(\s*\()?", expr):
        name, selector, call = match.group(1), match.group(2), match.group(3)
        if not name and selector:
            raise AssertionError(f"selector without a metric name in {expr!r}")
        if not name or call or name.lower() in PROMQL_WORDS:
            continue  # a function, an aggregation or a keyword
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector or ""))
        found.setdefault(name, set()).update(labels)
    return found


def test_promql_metrics_parser() -> None:
    assert promql_metrics(
        'histogram_quantile(0.99, sum by (route, le) (rate(credgate_x_bucket{instance=~".*", a="b(c)"}[5m])))'
        ' / on (job) group_left sum(credgate_y_total) > bool 1 and up{job="j"} == 0'
    ) == {"credgate_x_bucket": {"instance", "a"}, "credgate_y_total": set(), "up": {"job"}}


def rule_expressions() -> list[str]:
    """The `expr` of every rule, read without a YAML library: plain or `|` block scalars."""
    lines = RULES.read_text().splitlines()
    exprs = []
    for i, line in enumerate(lines):
        match = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2).strip()
        if rest not in ("|", ">", "|-", ">-"):
            exprs.append(rest)
            continue
        block = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(block))
    return exprs


def admin_metric_samples() -> dict[str, set[str]]:
    """Sample names (with label names) the admin service exposes, read from admin/metrics.py's source."""
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
                "Summary": ("_sum", "_count")}
    samples: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(ADMIN_METRICS.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffixes:
            name = node.args[0]
            assert isinstance(name, ast.Constant) and isinstance(name.value, str)
            label_node = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            labels = set(ast.literal_eval(label_node)) if label_node is not None else set()
            for suffix in suffixes[node.func.id]:
                extra = {"le"} if suffix == "_bucket" else set()
                samples[name.value + suffix] = labels | extra
    return samples


@pytest.mark.slow
async def test_every_metric_used_exists_in_a_live_scrape(env: dict[str, str], upstream: Upstream,
                                                        tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml",
                          [{"prefix": "/api", "name": "api", "upstream": upstream.url, "rate_limit": "1000/minute"}])
    await cli(env, "users", "create", "svc", "--service")
    token = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))["token"]
    async with running_gateway(env, config, tmp_path, workers=2) as gw, aiohttp.ClientSession() as s:
        for headers in ({"Authorization": f"Bearer {token}"}, {}):
            async with s.get(gw.url + "/api/x", headers=headers) as r:
                await r.read()
        for _ in range(100):  # workers publish request metrics in batches, a few times a second
            async with s.get(f"http://127.0.0.1:{gw.metrics_port}/metrics") as r:
                text = await r.text()
            # one flush publishes the counters and histograms one after the other: wait for all of them
            if all(f"{name}{{" in text for name in PUBLISHED_PER_REQUEST):
                break
            await asyncio.sleep(0.05)
    scraped: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            scraped.setdefault(sample.name, set()).update(sample.labels)
    exposed = {**scraped, **admin_metric_samples()}

    dashboard = json.loads(DASHBOARD.read_text())
    uses = [(f"dashboard panel {title!r}", expr) for title, expr in dashboard_targets(dashboard)]
    uses += [("rules", expr) for expr in rule_expressions()]
    assert len(uses) > 20
    problems = []
    for where, expr in uses:
        for name, labels in promql_metrics(expr).items():
            if name in PROMETHEUS_OWN:
                continue
            if name not in exposed:
                problems.append(f"{where}: {name} is not exposed")
            elif labels - exposed[name] - TARGET_LABELS:
                problems.append(f"{where}: {name} has no label(s) {sorted(labels - exposed[name] - TARGET_LABELS)}")
    assert not problems, "\n".join(problems)
