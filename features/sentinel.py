"""Replicated Redis: a client that finds the primary (or a replica) through Redis Sentinel.

:func:`features.redis_store.connect` calls :func:`sentinel_client` when ``settings.sentinels`` is
set. The URL still names the database and the password; its host and port are ignored: the
Sentinels say where the primary is, and after a failover the client's next connection goes to
the promoted replica (redis-py's SentinelConnectionPool asks again after a connection error, and
the client's Retry makes that transparent to the caller within its retries).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.connection import parse_url
from redis.sentinel import Sentinel

from core.settings import RedisSettings


def sentinel_addresses(spec: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> [(host, port), ...]; a clear error for a malformed entry."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"SHOPRANK_REDIS_SENTINELS: {part!r} is not host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("SHOPRANK_REDIS_SENTINELS names no Sentinel")
    return out


def sentinel_client(settings: RedisSettings, options: dict[str, Any], replica: bool = False) -> redis.Redis:
    """A client of ``settings.sentinel_master``'s primary (``replica``: of a replica, the primary
    when none answers), with ``options`` (timeouts, retry, password) on its connections."""
    assert settings.sentinels is not None
    url = parse_url(settings.url)
    conn = {k: v for k, v in url.items() if k in ("db", "username", "password")} | options
    # The Sentinels themselves: short timeouts (one that is down must not hold a lookup back).
    sentinel = Sentinel(sentinel_addresses(settings.sentinels),
                        sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
                        socket_connect_timeout=2.0)
    if replica:
        return sentinel.slave_for(settings.sentinel_master, **conn)
    return sentinel.master_for(settings.sentinel_master, **conn)
