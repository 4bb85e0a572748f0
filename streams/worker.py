"""Run one feature worker until it is stopped (SIGTERM/SIGINT stop it cleanly)."""

from __future__ import annotations

import faust
import mode.loop
import structlog
from prometheus_client import start_http_server

from core.settings import Settings
from streams.app import create_app, instance_name

log = structlog.get_logger(__name__)


def run_worker(settings: Settings) -> int:
    s = settings.streams
    if s.event_loop == "uvloop":
        mode.loop.use("uvloop")
    if s.metrics_port is not None:
        start_http_server(s.metrics_port, addr="127.0.0.1")
    app = create_app(settings)
    log.info("streams_worker_starting", group=s.group_id, instance=instance_name(settings),
             topics=[settings.topics.catalog, settings.topics.queries, settings.topics.results,
                     settings.topics.interactions])
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
