"""The console's pages (FastAPI, Jinja2 templates rendered on the server, PNG plots).

- ``/``: search for a shopper; each product with its title, score and each feature's share
- ``/shopper?user=``: the shopper's profile as the feature store holds it
- ``/models``: the registry's versions, lineage, gate figures, which one serves
- ``/quality``: quality per day and latency from ``make loop-eval`` (``/plots/*.png``)
- ``/live``: throughput and p99 scraped from the scorer, consumer lag from Kafka
- ``/healthz``: the process is up

Every failure a person can cause or meet (empty query, unknown shopper, no model serving, Redis
or Kafka down) renders the page with a sentence saying what is wrong; nothing renders a trace.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import redis
import structlog
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from console import live as live_figures
from console import models, plots
from console.errors import ConsoleError
from console.search import Searcher
from console.shopper import profile, when
from core.settings import Settings
from features.redis_store import RedisStore, connect

log = structlog.get_logger(__name__)

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["when"] = when


def create_app(settings: Settings) -> FastAPI:
    store = RedisStore(connect(settings.redis), settings.features, settings.streams)
    searcher = Searcher(settings, store)
    c = settings.console
    sampler = live_figures.Sampler(c.scorer_metrics_url, c.scrape_s, c.live_window_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sampler.start()
        yield
        sampler.stop()
        searcher.close()

    app = FastAPI(title="shoprank console", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    redis_url = settings.redis.url.split("@")[-1]  # never the password, if the URL carries one

    def page(request: Request, name: str, status: int = 200, **context: object) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"page": name.removesuffix(".html"), **context},
                                          status_code=status)

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError) -> HTMLResponse:
        return page(request, "error.html", exc.status, message=exc.message)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> HTMLResponse:
        log.warning("console_redis_error", path=request.url.path, reason=str(exc))
        return page(request, "error.html", 503,
                    message=f"The feature store (Redis at {redis_url}) does not answer: {exc}. "
                            "Start it with `make up`.")

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> HTMLResponse:
        log.exception("console_failed", path=request.url.path)  # the trace goes to the log only
        return page(request, "error.html", 500,
                    message=f"This page failed ({type(exc).__name__}: {exc}). "
                            "The console's log has the details.")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def search(request: Request, user: str = "", q: str | None = None, at: str = "now") -> HTMLResponse:
        context: dict[str, object] = {"user": user, "q": q or "", "at": at}
        if q is None:  # the empty form
            return page(request, "search.html", **context)
        try:
            when_at = None
            notice = None
            state = store.user(user.strip()) if user.strip() else None
            if state is None and user.strip():
                notice = (f"The feature store has no shopper {user.strip()!r}: ranked as a new shopper, "
                          "without personal signal.")
            if at == "last" and state is not None:
                when_at = datetime.fromtimestamp(state.last_seen, UTC)
            context["result"] = searcher.search(user, q, when_at)
            context["notice"] = notice
        except ConsoleError as exc:  # shown above the form, which keeps what was typed
            return page(request, "search.html", exc.status, error=exc.message, **context)
        return page(request, "search.html", **context)

    @app.get("/shopper", response_class=HTMLResponse)
    def shopper(request: Request, user: str = "") -> HTMLResponse:
        if not user.strip():
            return page(request, "shopper.html", user=user)
        found = profile(store, user.strip(), settings.features, time.time())
        if found is None:
            return page(request, "shopper.html", 404, user=user,
                        error=f"No shopper {user.strip()!r} in the feature store (Redis at {redis_url}): "
                              "no event of theirs has been applied, they were forgotten, or they expired "
                              f"after {settings.features.user_ttl_s / 86400:.0f} idle days.")
        return page(request, "shopper.html", user=user, profile=found)

    @app.get("/models", response_class=HTMLResponse)
    def model_versions(request: Request) -> HTMLResponse:
        found = models.read(settings.model.registry_dir)
        error = None if found.versions else (f"No model version in {found.path}: train one "
                                             "(`shoprank train`, or `shoprank model init`).")
        return page(request, "models.html", registry=found, error=error)

    @app.get("/quality", response_class=HTMLResponse)
    def quality(request: Request) -> HTMLResponse:
        try:
            loop = plots.load_loop(c.loop_results)
        except ConsoleError as exc:
            return page(request, "quality.html", exc.status, error=exc.message)
        return page(request, "quality.html", loop=loop, path=c.loop_results)

    @app.get("/plots/{name}.png")
    def plot(name: str) -> Response:
        if name == "live":
            return Response(plots.live_png(sampler.live()), media_type="image/png")
        if name not in ("quality", "latency"):
            raise ConsoleError(f"No plot named {name!r}.", 404)
        try:
            stamp = c.loop_results.stat().st_mtime_ns
        except OSError:
            stamp = 0  # load_loop says what is missing
        return Response(loop_plot(name, stamp), media_type="image/png", headers={"Cache-Control": "no-store"})

    @lru_cache(maxsize=4)
    def loop_plot(name: str, stamp: int) -> bytes:
        """A loop-eval plot, drawn once per version of the results file (``stamp``: its mtime)."""
        draw = plots.quality_png if name == "quality" else plots.latency_png
        return draw(plots.load_loop(c.loop_results))

    @app.get("/live", response_class=HTMLResponse)
    def live(request: Request) -> HTMLResponse:
        return page(request, "live.html", live=sampler.live(), lags=live_figures.consumer_lag(settings),
                    window=c.live_window_s, refresh=max(2, round(c.scrape_s * 2)))

    return app


def serve(settings: Settings) -> None:
    c = settings.console
    log.info("console_started", url=f"http://{c.host}:{c.port}/", registry=str(settings.model.registry_dir),
             scorer_metrics=c.scorer_metrics_url)
    uvicorn.run(create_app(settings), host=c.host, port=c.port, log_config=None, access_log=False)
