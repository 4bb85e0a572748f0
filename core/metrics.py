"""Serving a process's Prometheus /metrics (the feature workers, the joiner, the trainer; the
scorer serves them on its own HTTP API), scraped by the Prometheus that ``make up`` starts."""

from __future__ import annotations

import errno

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from core.settings import Settings

log = structlog.get_logger(__name__)


def serve_metrics(settings: Settings, port: int | None, service: str,
                  registry: CollectorRegistry = REGISTRY) -> bool:
    """Serve ``registry`` on ``port`` (None: not at all) at ``settings.prometheus.metrics_host``,
    on a daemon thread. Returns whether it serves.

    A port another process holds (a second worker on the same host with the default port, as
    the tests start them) is logged and left: metrics are for looking, and must not stop a
    service from doing its work."""
    if port is None:
        return False
    host = settings.prometheus.metrics_host
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics_port_in_use", service=service, port=port,
                    hint=f"set this service's metrics port to a free one to have it scraped ({exc})")
        return False
    log.info("metrics_serving", service=service, url=f"http://{host}:{port}/metrics")
    return True
