"""Run one feature worker until it is stopped (SIGTERM/SIGINT stop it cleanly)."""

from __future__ import annotations

import structlog

from core.metrics import serve_metrics
from core.settings import Settings

log = structlog.get_logger(__name__)


def run_worker(settings: Settings) -> int:
    s = settings.streams
    serve_metrics(settings, s.metrics_port, "streams")
    log.info("streams_worker_starting", engine=s.engine, group=s.group_id, instance=s.instance_id,
             topics=[settings.topics.catalog, settings.topics.queries, settings.topics.results,
                     settings.topics.interactions])
    if s.engine == "batch":
        from streams.batch import run_batch_worker

        return run_batch_worker(settings)
    return _run_faust(settings)


def _run_faust(settings: Settings) -> int:
    import faust
    import mode.loop

    from streams.app import create_app

    if settings.streams.event_loop == "uvloop":
        mode.loop.use("uvloop")
    worker = faust.Worker(create_app(settings), loglevel=settings.log_level.lower(),
                          override_logging=False, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
