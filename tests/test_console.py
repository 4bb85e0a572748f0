"""The console in a real browser: Debian's chromium, headless, driven through chromium-driver.

The console runs as a real ``shoprank console`` process beside a real feature worker and a real
scorer, on the real broker and Redis, serving a tiny model (two versions, the second a child of
the first). A shopper's search, click, add-to-cart and purchase go through Kafka and the feature
worker; the test then searches as that shopper, opens the explain table, reads the profile, the
model versions, the quality plots and the live figures, and writes a screenshot of each page to
bench/results/console/. Bad input (an empty query, an unknown shopper, no model serving) must
show a sentence on the page, never a trace; Redis and Kafka being down are checked in-process.

Needs ``infra/browser.sh install`` (chromium and chromium-driver); Selenium is pointed at both, so
Selenium Manager downloads nothing.
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.events import AddToCart, Click, Purchase, Query, QueryContext
from core.registry import record, set_serving
from core.settings import ROOT, ConsoleSettings, KafkaSettings, ModelSettings, RedisSettings, Settings
from features.read import FEATURE_NAMES
from features.redis_store import RedisStore, connect
from streams.testing import Worker, environment, publish, wait_until
from tests.model_factory import split, tiny_run, tiny_version

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "bench" / "results" / "console"
SHOPPER = "console-shopper-1"
TRACE = "Traceback"


def alive(w: Worker) -> None:
    """Fail, with the log's tail, when a service has exited."""
    if not w.alive():
        raise AssertionError(f"{w.log_path.name}: the process exited\n{w.log_tail(20)}")


def wait_ready(w: Worker, url: str, timeout: float) -> None:
    def ready() -> bool:
        alive(w)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_until(ready, timeout, 0.3, f"{url} ready; see {w.log_path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_with_lineage(path: Path) -> Path:
    """Two tiny versions: v1, then v2 (its child) promoted by a gate, as the continuous trainer
    records it (the gate's figures in v2's manifest, the promotion in the log)."""
    from trainer.pipeline import write_version

    tiny_version(path, "v1")
    set_serving(path, "v1", reason="map@5 0.5000")
    v2 = write_version(path, tiny_run(), metrics={"map@5": 0.52, "holdout_map@5": 0.52,
                                                  "holdout_map@5_diff": 0.02}, parent="v1", name="v2")
    manifest = json.loads((v2.path / "manifest.json").read_text())
    manifest |= {"trained_by": "continuous", "gate": {
        "decision": "promote", "reasons": [], "lists": 1000, "margin": 0.005, "primary": "map@5",
        "candidate": {"map@5": 0.52}, "serving": {"map@5": 0.50}, "diff": 0.02, "ci95": [0.004, 0.036]}}
    (v2.path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    set_serving(path, "v2", reason="gate passed: holdout map@5 0.5200 against 0.5000", by="test")
    return path


def shopper_events(catalog: list[str]) -> tuple[list, dict[str, str]]:
    """A shopper's search and what followed it, minutes ago; the products, by what was done."""
    at = datetime.now(UTC) - timedelta(minutes=10)
    clicked, carted, bought = catalog[0], catalog[1], catalog[2]
    q = Query(query_id="q-console-1", user_id=SHOPPER, session_id="s1", text="xbox kinect",
              context=QueryContext(location="US-CA", device="mobile"), timestamp=at)
    common = {"user_id": SHOPPER, "session_id": "s1", "query_id": q.query_id}
    events = [q,
              Click(event_id="e1", product_id=clicked, position=1, timestamp=at + timedelta(seconds=5),
                    **common),
              AddToCart(event_id="e2", product_id=carted, position=2, timestamp=at + timedelta(seconds=20),
                        **common),
              Purchase(event_id="e3", product_id=bought, order_id="o1", price=49.99,
                       timestamp=at + timedelta(seconds=60), **common)]
    return events, {"click": clicked, "add to cart": carted, "purchase": bought}


@pytest.fixture
def engine(settings: Settings, redis_client, tmp_path: Path) -> Iterator[dict]:
    """Feature worker, scorer and console processes on the test's topics, Redis db and registry."""
    registry = registry_with_lineage(tmp_path / "models")
    console_port, scorer_port = free_port(), free_port()
    env = environment(settings, group_id=f"streams-{uuid.uuid4().hex[:6]}", session_timeout_s=6)
    env.update({
        "SHOPRANK_MODEL_REGISTRY_DIR": str(registry),
        "SHOPRANK_SCORER_HTTP_PORT": str(scorer_port),
        "SHOPRANK_SCORER_GROUP_ID": f"scorer-{uuid.uuid4().hex[:6]}",
        "SHOPRANK_SCORER_DEVICE": "cpu",
        "SHOPRANK_CONSOLE_PORT": str(console_port),
        "SHOPRANK_CONSOLE_SCORER_METRICS_URL": f"http://127.0.0.1:{scorer_port}/metrics",
        "SHOPRANK_CONSOLE_SCRAPE_S": "0.5",
        "SHOPRANK_LOG_LEVEL": "INFO",
    })
    logs = tmp_path / "logs"
    logs.mkdir()
    started = [Worker(env, logs / "streams.log")]
    try:
        catalog = list(split().catalog.values())
        publish(settings, catalog)
        events, did = shopper_events([p.product_id for p in catalog])
        publish(settings, events)
        store = RedisStore(connect(settings.redis), settings.features, settings.streams)

        def applied() -> bool:
            alive(started[0])
            u = store.user(SHOPPER)
            return u is not None and u.n_purchases == 1 and u.n_searches == 1

        wait_until(applied, 90, 0.1, "the shopper's events applied by the feature worker")
        scorer = Worker(env, logs / "scorer.log", command="scorer")
        started.append(scorer)
        console = Worker(env, logs / "console.log", command="console")
        started.append(console)
        wait_ready(scorer, f"http://127.0.0.1:{scorer_port}/readyz", 180)
        wait_ready(console, f"http://127.0.0.1:{console_port}/healthz", 60)
        yield {"url": f"http://127.0.0.1:{console_port}", "registry": registry, "did": did,
               "titles": {p.product_id: p.title for p in catalog}, "settings": settings,
               "categories": {p.product_id: p.category_path[-1] for p in catalog if p.category_path},
               "console": console, "scorer_settings_env": env}
    finally:
        for w in reversed(started):
            w.stop()


@pytest.fixture
def browser() -> Iterator:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium or chromium-driver is missing: run infra/browser.sh install")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    """A full-page PNG: the window grown to the page's height first."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(max(height + 40, 600), 6000))
    assert driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1300, 900)


def text_of(driver, css: str) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


@pytest.mark.browser
def test_console_in_a_real_browser(engine: dict, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    url, did, titles = engine["url"], engine["did"], engine["titles"]

    # The search page: the form, then a search through the form as the replayed shopper.
    browser.get(url + "/")
    assert browser.title == "shoprank console" and TRACE not in browser.page_source
    browser.find_element(By.ID, "user").send_keys(SHOPPER)
    browser.find_element(By.ID, "q").send_keys("kinect")
    browser.find_element(By.ID, "go").click()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#ranked tr.product"), 60, 0.2,
               "a ranked list")
    rows = browser.find_elements(By.CSS_SELECTOR, "#ranked tr.product")
    assert len(rows) == 10  # settings.console.top_k of the retrieved candidates
    assert text_of(browser, "#model-version") == "v2"
    scores = [float(r.find_element(By.CSS_SELECTOR, ".score").text) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:  # each with its catalog title and its strongest shares
        assert r.find_element(By.CSS_SELECTOR, ".title").text == titles[r.get_attribute("data-product")]
        assert len(r.find_elements(By.CSS_SELECTOR, ".share")) == 4
    shoot(browser, "search")

    # Explain: every feature's value, contribution and share for the first product.
    rows[0].find_element(By.CSS_SELECTOR, "details.explain summary").click()
    contributions = rows[0].find_elements(By.CSS_SELECTOR, "tr.contribution")
    assert len(contributions) == len(FEATURE_NAMES)
    cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in contributions]
    assert {c[0] for c in cells} == set(FEATURE_NAMES)
    shares = [float(c[3].rstrip("%")) for c in cells]
    assert sum(abs(s) for s in shares) == pytest.approx(100, abs=0.1 * len(shares))  # shares of the whole
    assert any(float(c[2]) != 0 for c in cells)
    personal = {c[0]: float(c[1]) for c in cells}
    assert personal["user_has_history"] == 1 and personal["user_searches_log"] > 0  # the replayed shopper
    shoot(browser, "explain")

    # The profile shows what the replayed shopper did, through Kafka and the feature worker.
    browser.find_element(By.CSS_SELECTOR, "#summary a").click()
    wait_until(lambda: browser.find_elements(By.ID, "profile"), 30, 0.2, "the shopper's profile")
    assert [text_of(browser, f"#n-{k}") for k in ("clicks", "carts", "purchases", "searches")] == ["1"] * 4
    recent = {r.get_attribute("data-product"): r.text
              for r in browser.find_elements(By.CSS_SELECTOR, "tr.recent")}
    assert set(recent) == set(did.values())
    for kind, pid in did.items():
        assert kind in recent[pid] and titles[pid] in recent[pid]
    assert "US-CA" in text_of(browser, "#context") and "mobile" in text_of(browser, "#context")
    assert "shops" in text_of(browser, "#price")
    assert engine["categories"][did["click"]] in text_of(browser, "#categories")
    shoot(browser, "shopper")

    # Searches for the scorer, counted on the live page below (the console has scraped it by now).
    publish_queries(engine["settings"], 30)

    # Model versions: lineage, gate figures, which one serves.
    browser.get(url + "/models")
    assert text_of(browser, "#serving") == "v2"
    v2 = browser.find_element(By.CSS_SELECTOR, 'tr.version[data-version="v2"]')
    assert "serving" in v2.text and v2.find_element(By.CSS_SELECTOR, ".lineage").text == "v1"
    assert "promote" in v2.find_element(By.CSS_SELECTOR, ".gate").text and "+0.0200" in v2.text
    v1 = browser.find_element(By.CSS_SELECTOR, 'tr.version[data-version="v1"]')
    assert "promoted" in v1.text and "(no parent)" in v1.text
    shoot(browser, "models")

    # Quality over time and latency, from make loop-eval's results when this checkout has them.
    browser.get(url + "/quality")
    assert TRACE not in browser.page_source
    if ConsoleSettings().loop_results.is_file():
        for plot in ("quality-plot", "latency-plot"):
            wait_until(lambda p=plot: browser.execute_script(
                f"return document.getElementById('{p}').naturalWidth"), 30, 0.2, f"{plot} drawn")
    else:
        assert "make loop-eval" in text_of(browser, "#error")
    shoot(browser, "quality")

    # Live: the scorer answered the queries published above; its consumer group's lag is read.
    def live_counts() -> bool:
        browser.get(url + "/live")
        return browser.find_elements(By.ID, "answered") and int(text_of(browser, "#answered")) >= 30

    wait_until(live_counts, 60, 0.5, "the live page counting the scorer's queries")
    assert float(text_of(browser, "#throughput").split()[0]) > 0  # scrapes before and after the queries
    scorer_lag = browser.find_element(By.CSS_SELECTOR, "tr.lag").text
    assert engine["scorer_settings_env"]["SHOPRANK_SCORER_GROUP_ID"] in scorer_lag
    assert "does not answer" not in scorer_lag
    shoot(browser, "live")

    # Bad input: a sentence on the page, never a trace.
    browser.get(url + f"/?user={SHOPPER}&q=+")
    assert "Type a query" in text_of(browser, "#error") and TRACE not in browser.page_source
    browser.get(url + "/shopper?user=nobody-at-all")
    assert "No shopper 'nobody-at-all'" in text_of(browser, "#error") and TRACE not in browser.page_source
    shoot(browser, "unknown-shopper")
    browser.get(url + "/?user=nobody-at-all&q=kinect")
    assert "ranked as a new shopper" in text_of(browser, "#notice")
    assert browser.find_elements(By.CSS_SELECTOR, "#ranked tr.product")
    (engine["registry"] / "SERVING").unlink()
    record(engine["registry"], "v2", "rolled_back", reason="test: nothing serves")
    browser.get(url + "/?user=x&q=kinect")
    assert "No model version is serving" in text_of(browser, "#error") and TRACE not in browser.page_source
    shoot(browser, "no-model")
    console = engine["console"]
    alive(console)  # still up
    logged = console.log_path.read_text()
    assert "console_failed" not in logged  # no page fell through to the catch-all
    assert "console_explain_differs" not in logged  # shares explain the very scores served


def publish_queries(settings: Settings, n: int) -> None:
    """Searches for the scorer, so the live page has something to count."""
    now = datetime.now(UTC)
    publish(settings, [Query(query_id=f"live-{i}", user_id="live-shopper", session_id="s2", text="halo",
                             timestamp=now) for i in range(n)])


def test_redis_and_kafka_down_are_said_on_the_page(tmp_path: Path) -> None:
    """No browser needed: the pages' own error paths with nothing listening on either port."""
    from console.app import create_app

    dead = f"127.0.0.1:{free_port()}"
    settings = Settings(
        redis=RedisSettings(url=f"redis://{dead}/0", retries=0, socket_timeout_s=1),
        kafka=KafkaSettings(bootstrap_servers=dead),
        model=ModelSettings(registry_dir=tmp_path / "empty"),
        console=ConsoleSettings(scorer_metrics_url=f"http://{dead}/metrics", kafka_timeout_s=1,
                                loop_results=tmp_path / "loop.json"),
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        page = client.get("/shopper", params={"user": "u1"})
        assert page.status_code == 503 and "does not answer" in page.text and TRACE not in page.text
        page = client.get("/", params={"user": "u1", "q": "kinect"})
        assert page.status_code == 503 and "Redis" in page.text and TRACE not in page.text
        page = client.get("/live")
        assert page.status_code == 200 and TRACE not in page.text
        assert page.text.count(f"Kafka at {dead} does not answer") == 3
        assert "do not answer" in page.text  # the scorer's metrics
        page = client.get("/models")
        assert "No model version in" in page.text
        page = client.get("/quality")
        assert page.status_code == 404 and "make loop-eval" in page.text


def test_live_figures_from_the_scorers_own_exposition() -> None:
    """Throughput and p99 as the live page computes them, from what ScorerMetrics exposes."""
    from prometheus_client import generate_latest

    from console.live import parse, quantile
    from scorer.metrics import ScorerMetrics

    m = ScorerMetrics()
    m.serving("v7")
    before = parse(generate_latest(m.registry).decode(), at=100.0)
    assert before.queries == 0 and quantile(0.99, before.buckets) is None and before.model_version == "v7"
    for i in range(1000):  # 990 fast queries, 10 slow ones
        m.latency.observe(0.004 if i % 100 else 0.2)
        m.queries.labels(outcome="ranked" if i % 250 else "error").inc()
    after = parse(generate_latest(m.registry).decode(), at=110.0)
    assert (after.queries - before.queries) / (after.at - before.at) == 100.0
    assert after.errors == 4
    p99 = quantile(0.99, after.buckets)
    assert p99 is not None and 0.0025 < p99 <= 0.005  # the 990th of 1000 is a fast one
    assert 0.1 < quantile(0.995, after.buckets) <= 0.25  # type: ignore[operator]
