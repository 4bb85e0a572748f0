"""Monitoring: the alert rules (promtool check and unit tests), the generated Prometheus
configuration, and the real thing: the scorer, a feature worker, the joiner and the trainer as
processes, every metric a rule or the Grafana dashboard names served by one of them, and Debian's
Prometheus (started here on a free port) scraping them and evaluating the rules."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.events import Click, Query
from core.registry import history, set_serving
from core.settings import ROOT, Settings
from shoprank import monitoring
from streams.testing import Worker, environment, publish, wait_until
from tests.model_factory import split, tiny_version

RULES = ROOT / "infra" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "infra" / "prometheus" / "alerts_test.yml"
COMPOSE_CONFIG = ROOT / "infra" / "prometheus" / "compose.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "shoprank.json"
METRIC = re.compile(r"\bshoprank_[a-z0-9_]+")  # recording rules are named shoprank:..., not matched
JOBS = monitoring.JOBS


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: infra/prometheus.sh install (make up installs it)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def dashboard_exprs() -> dict[str, list[str]]:
    """Expressions of the dashboard, by the row (service) they are under."""
    rows: dict[str, list[str]] = {}
    current = ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            continue
        rows.setdefault(current, []).extend(t["expr"] for t in panel["targets"])
    return rows


def used_metrics() -> set[str]:
    exprs = rule_exprs() + [e for es in dashboard_exprs().values() for e in es]
    return {m for e in exprs for m in METRIC.findall(e)}


def test_alert_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_alert_rules_unit_tests() -> None:
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alerting rule has a test that sees it fire.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert alerts == fired, f"alerts without a firing test: {sorted(alerts - fired)}"


def test_the_required_alerts_exist() -> None:
    exprs = " ".join(rule_exprs())
    for metric in ("shoprank_query_latency_seconds_bucket", "shoprank_consumer_lag",
                   "shoprank_dead_letters_total", 'shoprank_model_swaps_total{outcome="rejected"}',
                   "shoprank_joiner_click_coverage", "shoprank_trainer_last_model_update_timestamp_seconds"):
        assert metric in exprs, metric


def test_generated_and_compose_configurations_are_valid(tmp_path: Path) -> None:
    generated = tmp_path / "prometheus.yml"
    generated.write_text(monitoring.render(Settings()))
    out = promtool("check", "config", str(generated))
    assert out.returncode == 0, out.stdout + out.stderr
    assert {c["job_name"] for c in yaml.safe_load(generated.read_text())["scrape_configs"]} == set(JOBS)
    # The compose one names its rules where the container mounts them.
    compose = tmp_path / "compose.yml"
    compose.write_text(COMPOSE_CONFIG.read_text().replace("/etc/prometheus/alerts.yml", str(RULES)))
    out = promtool("check", "config", str(compose))
    assert out.returncode == 0, out.stdout + out.stderr
    assert {c["job_name"] for c in yaml.safe_load(compose.read_text())["scrape_configs"]} == set(JOBS)


def test_dashboard_has_a_row_per_service() -> None:
    rows = dashboard_exprs()
    assert {"Scorer", "Feature workers", "Joiner", "Trainer"} <= set(rows)
    assert all(rows[r] for r in ("Scorer", "Feature workers", "Joiner", "Trainer"))
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])


# --- the running services ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def exposed_names(text: str) -> tuple[set[str], dict[str, float]]:
    """(every sample name the exposition can carry, including families with no sample yet;
    sample name -> summed value of the samples it has)."""
    names: set[str] = set()
    values: dict[str, float] = {}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("_count", "_sum", "_created")}
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        for sample in family.samples:
            names.add(sample.name)
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return names, values


def prom_query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
    except OSError:
        return []
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def engine(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> Iterator[dict]:
    """Scorer, feature worker, joiner and trainer processes on the test's topics, Redis database and
    registry (a tiny version serving), each serving /metrics on a free port."""
    registry = tmp_path / "models"
    tiny_version(registry, "v1")
    set_serving(registry, "v1", reason="test")
    ports = {job: free_port() for job in JOBS}
    tag = uuid.uuid4().hex[:6]
    env = environment(settings, group_id=f"streams-{tag}", session_timeout_s=6, metrics_port=ports["streams"])
    env.update({
        "SHOPRANK_MODEL_REGISTRY_DIR": str(registry),
        "SHOPRANK_SCORER_HTTP_PORT": str(ports["scorer"]),
        "SHOPRANK_SCORER_GROUP_ID": f"scorer-{tag}",
        "SHOPRANK_SCORER_DEVICE": "cpu",
        "SHOPRANK_JOINER_GROUP_ID": f"joiner-{tag}",
        "SHOPRANK_JOINER_METRICS_PORT": str(ports["joiner"]),
        "SHOPRANK_TRAINER_GROUP_ID": f"trainer-{tag}",
        "SHOPRANK_TRAINER_METRICS_PORT": str(ports["trainer"]),
        "SHOPRANK_LOG_LEVEL": "INFO",
    })
    logs = tmp_path / "logs"
    logs.mkdir()
    catalog = list(split().catalog.values())[:200]
    publish(settings, catalog)
    services = {job: Worker(env, logs / f"{job}.log", command=job) for job in JOBS}
    try:
        def serving() -> bool:
            for job, proc in services.items():
                assert proc.alive(), f"{job} exited:\n{proc.log_tail()}"
            return all(scrape(ports[job]) is not None for job in JOBS)

        wait_until(serving, 180, 0.3, "every service serving /metrics")
        # Ready: a model loaded and the queries topic assigned (the scorer reads from the end).
        services["scorer"].wait_ready(f"http://127.0.0.1:{ports['scorer']}/readyz", 120)
        yield {"ports": ports, "services": services, "catalog": [p.product_id for p in catalog],
               "registry": registry}
    finally:
        for proc in services.values():
            proc.stop()


@pytest.fixture
def prometheus(engine: dict, tmp_path: Path) -> Iterator[int]:
    """Debian's Prometheus on a free port, its configuration generated for the engine's ports."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: infra/prometheus.sh install (make up installs it)")
    port = free_port()
    base = Settings()
    fast = base.model_copy(update={"prometheus": base.prometheus.model_copy(update={"scrape_interval_s": 1})})
    config = tmp_path / "prometheus.yml"
    targets = {job: [f"127.0.0.1:{p}"] for job, p in engine["ports"].items()}
    config.write_text(monitoring.render(fast, targets))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, 60, 0.2, "prometheus ready")
        yield port
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_every_metric_the_rules_and_dashboard_use_is_served_and_scraped(
    settings: Settings, engine: dict, prometheus: int
) -> None:
    ports, services = engine["ports"], engine["services"]
    products = engine["catalog"]
    # Traffic, so the labelled counters have samples: a search the scorer ranks, a click on its
    # second product (the joiner matches it to the list), an undecodable event (dead-lettered).
    asked: list[Query] = []

    def value(job: str, name: str) -> float:
        text = scrape(ports[job])
        assert text is not None and services[job].alive(), services[job].log_tail()
        return exposed_names(text)[1].get(name, 0.0)

    def ranked() -> bool:
        if value("scorer", "shoprank_queries_total") >= 1:
            return True
        # The scorer reads its topic from the end once its offsets are resolved, a moment after
        # readiness: a search sent in between is not read, so another goes every 5 s.
        if not asked or (datetime.now(UTC) - asked[-1].timestamp).total_seconds() > 5:
            asked.append(Query(query_id=f"q-prom-{uuid.uuid4().hex[:6]}", user_id="u-prom",
                               session_id="s-prom", text="xbox kinect", candidates=products[:20],
                               timestamp=datetime.now(UTC)))
            publish(settings, [asked[-1]])
        return False

    wait_until(ranked, 120, 0.2, "a search ranked")
    q = asked[-1]
    publish(settings, [Click(event_id=f"e-{q.query_id}", user_id=q.user_id, session_id=q.session_id,
                             query_id=q.query_id, product_id=products[1], position=2,
                             timestamp=q.timestamp + timedelta(seconds=1)),
                       (settings.topics.interactions, "u-prom", b"{not json")])
    wait_until(lambda: value("streams", "shoprank_dead_letters_total") >= 1, 60, 0.2, "dead letter counted")
    wait_until(lambda: value("joiner", "shoprank_joiner_clicks_total") >= 1, 60, 0.2, "the click joined")

    # 1. Every metric a rule or the dashboard names is served by a running service.
    served: dict[str, set[str]] = {}
    sampled: dict[str, dict[str, float]] = {}
    for job in JOBS:
        text = scrape(ports[job])
        assert text is not None, services[job].log_tail()
        served[job], sampled[job] = exposed_names(text)
    everything = set().union(*served.values())
    missing = used_metrics() - everything
    assert not missing, f"named by a rule or the dashboard but served by no service: {sorted(missing)}"
    # ... by the service whose row the dashboard shows it in.
    rows = dashboard_exprs()
    for row, job in (("Scorer", "scorer"), ("Feature workers", "streams"), ("Joiner", "joiner"),
                     ("Trainer", "trainer")):
        names = {m for e in rows[row] for m in METRIC.findall(e)}
        assert names <= served[job], f"{row} row: {sorted(names - served[job])} not served by {job}"

    # 2. Prometheus scrapes all four and holds every used metric that has samples.
    def scraped() -> bool:
        up = {r["metric"]["job"]: r["value"][1] for r in prom_query(prometheus, "up")}
        return up == dict.fromkeys(JOBS, "1")

    wait_until(scraped, 30, 0.5, "prometheus scraping scorer, streams, joiner and trainer")
    with_samples = {m for m in used_metrics() if any(m in s for s in sampled.values())}
    assert {"shoprank_query_latency_seconds_bucket", "shoprank_dead_letters_total",
            "shoprank_joiner_clicks_total", "shoprank_joiner_click_coverage",
            "shoprank_trainer_last_model_update_timestamp_seconds", "shoprank_consumer_lag",
            "shoprank_queries_total"} <= with_samples

    def held() -> set[str]:
        return {m for m in with_samples if not prom_query(prometheus, f"count({m})")}

    wait_until(lambda: not held(), 30, 0.5, f"prometheus holding {sorted(with_samples)}")
    ranked = prom_query(prometheus, 'sum(shoprank_queries_total{job="scorer", outcome="ranked"})')
    assert float(ranked[0]["value"][1]) >= 1
    dead = prom_query(prometheus, 'sum(shoprank_dead_letters_total{job="streams", kind="invalid"})')
    assert float(dead[0]["value"][1]) >= 1
    # The trainer's last model update is the registry's promotion of v1.
    promoted = next(e["at"] for e in history(engine["registry"]) if e["version"] == "v1")
    last = prom_query(prometheus, 'shoprank_trainer_last_model_update_timestamp_seconds{job="trainer"}')
    assert float(last[0]["value"][1]) == pytest.approx(datetime.fromisoformat(promoted).timestamp(), abs=1e-3)

    # 3. The rules loaded and evaluate without error on the real series.
    def evaluated() -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/api/v1/rules", timeout=5) as r:
            rules = [rule for g in json.loads(r.read())["data"]["groups"] for rule in g["rules"]]
        return rules if all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else []

    rules = wait_until(evaluated, 30, 0.5, "every rule evaluated")
    assert len(rules) == len(rule_exprs())
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
