"""structlog set-up: JSON lines with stable keys, configured once by entry points, never on import.

Stable keys an on-call engineer can grep: ``event`` (what happened, snake_case), ``level``,
``timestamp`` (ISO 8601, UTC), ``logger``, and where they apply ``query_id``, ``user`` (hashed,
never the raw id), ``model_version``, ``latency_ms``, ``topic``, ``partition``, ``offset``.
"""

from __future__ import annotations

import hashlib
import logging
import sys

import structlog


def configure_logging(level: str = "INFO") -> None:
    """Send structlog and stdlib logging (faust, aiokafka, uvicorn) as JSON lines to stderr."""
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def hash_user(user_id: str) -> str:
    """A short stable pseudonym for logs: lets one grep a shopper without logging who they are."""
    return hashlib.blake2b(user_id.encode(), digest_size=6).hexdigest()
