"""Helpers for tests and the benchmarks: publish contract events, the environment that configures
a worker process, a copy of a Redis database restored later (what a promoted replica that lacked
the last writes holds). Workers themselves run as ``core.processes.Service`` (``Worker`` here, the name
the tests use): ``shoprank streams`` subprocesses configured only through the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import redis

from core import kafka
from core.events import Event, encode
from core.processes import Service as Worker
from core.processes import wait_until
from core.settings import Settings
from core.topics import TOPIC_KEYS, route

__all__ = ["Worker", "dump_db", "environment", "publish", "restore_db", "wait_until"]


def publish(settings: Settings, events: Iterable[Event | tuple[str, str, bytes]]) -> int:
    """Publish events (or raw ``(topic, key, bytes)``) keyed as the contract says; wait for acks."""
    producer = kafka.producer(settings)
    n = 0
    for ev in events:
        topic, key, value = ev if isinstance(ev, tuple) else (*route(settings, ev), encode(ev))
        while True:
            try:
                producer.produce(topic, value, key=key.encode())
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 5000 == 0:
            producer.poll(0)
    if producer.flush(30) != 0:
        raise RuntimeError("events still unacknowledged after 30 s")
    return n


def environment(settings: Settings, **streams: object) -> dict[str, str]:
    """The environment that gives a worker process these settings (topics, Redis, streams group)."""
    env = dict(os.environ)
    t = settings.topics
    env.update({
        "SHOPRANK_REDIS_URL": settings.redis.url,
        "SHOPRANK_KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "SHOPRANK_TOPIC_PARTITIONS": str(t.partitions),
        "SHOPRANK_REDIS_CLUSTER": str(int(settings.redis.cluster)),
        "SHOPRANK_FEATURES_SHARDS": str(settings.features.shards),
        "SHOPRANK_LOG_LEVEL": "WARNING",
    })
    env.update({f"SHOPRANK_TOPIC_{name.upper()}": getattr(t, name) for name in TOPIC_KEYS})
    env.update({f"SHOPRANK_STREAMS_{k.upper()}": str(v) for k, v in streams.items()})
    return env


def dump_db(client: redis.Redis) -> list[tuple[bytes, bytes, int]]:
    """Every key of the database as (key, DUMP payload, PTTL)."""
    names = list(client.scan_iter(count=5000))
    with client.pipeline(transaction=False) as pipe:
        for k in names:
            pipe.dump(k)
            pipe.pttl(k)
        out = pipe.execute()
    return [(k, out[2 * i], out[2 * i + 1]) for i, k in enumerate(names)]


def restore_db(client: redis.Redis, copy: list[tuple[bytes, bytes, int]]) -> None:
    """The database as ``dump_db`` copied it, nothing else."""
    client.flushdb()
    with client.pipeline(transaction=True) as pipe:
        for k, payload, ttl in copy:
            pipe.restore(k, max(ttl, 0), payload)
        pipe.execute()
