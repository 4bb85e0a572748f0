"""The faust engine (``SHOPRANK_STREAMS_ENGINE=faust``): the app, built from the frozen settings (no
module-level app), with one agent per consumed topic.

Each agent takes batches (``stream.take_events``), applies them to Redis through the processor in
a worker thread (redis-py, pipelined; the event loop keeps heartbeating meanwhile), publishes the
batch's dead letters and only then lets faust acknowledge the batch. Offsets are committed after
acknowledgement, so delivery is at least once; the feature store's idempotency makes the effect
exactly once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import structlog

from core.settings import Settings
from features.redis_store import RedisStore, connect
from streams.deadletter import DeadLetter, DeadLetters
from streams.processor import Processor, RawRecord

log = structlog.get_logger(__name__)


def instance_name(settings: Settings) -> str:
    return settings.streams.instance_id or f"{socket.gethostname()}-{os.getpid()}"


def _broker_options(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    opts: dict[str, Any] = {"broker": [f"kafka://{h.strip()}" for h in k.bootstrap_servers.split(",")]}
    if k.security_protocol == "PLAINTEXT":
        return opts
    context = ssl.create_default_context(cafile=k.ssl_ca_location) if "SSL" in k.security_protocol else None
    if context is not None and k.ssl_certificate_location:
        context.load_cert_chain(k.ssl_certificate_location, k.ssl_key_location)
    if k.security_protocol.startswith("SASL"):
        opts["broker_credentials"] = faust.SASLCredentials(
            username=k.sasl_username,
            password=k.sasl_password.get_secret_value() if k.sasl_password else None,
            mechanism=k.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    else:
        opts["broker_credentials"] = context
    return opts


def create_app(settings: Settings) -> faust.App:
    s = settings.streams
    datadir = settings.var_dir / "streams" / instance_name(settings)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.group_id,
        **_broker_options(settings),
        datadir=str(datadir),
        web_enabled=s.web_port is not None,
        web_port=s.web_port or 6066,
        web_bind="127.0.0.1",
        consumer_auto_offset_reset="earliest",
        consumer_group_instance_id=s.instance_id,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.session_timeout_s / 5,
        broker_commit_interval=1.0,
        broker_max_poll_records=s.batch_size,
        stream_buffer_maxsize=max(4096, 2 * s.batch_size),
        # Topics are created by `shoprank topics` (auto-creation is off on the broker), and no
        # feature of faust that needs its leader topic is used.
        topic_allow_declare=False,
        topic_disable_leader=True,
        producer_acks=-1,
    )
    dlq_topic = app.topic(settings.topics.dead_letter, value_serializer="raw", key_serializer="raw")

    async def publish(letter: DeadLetter) -> None:
        fut = await dlq_topic.send(key=letter.key, value=letter.value, headers=letter.headers())
        await fut

    dead_letters = DeadLetters(publish)
    loops: list[asyncio.AbstractEventLoop] = []  # the worker's loop, known once agents run

    def handover(letters: list[DeadLetter]) -> None:
        """From the processing thread: publish on the event loop, wait for the broker's ack."""
        asyncio.run_coroutine_threadsafe(dead_letters.send(letters), loops[0]).result()

    store = RedisStore(connect(settings.redis), settings.features, settings.streams)
    processor = Processor(settings, store, handover)
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="features")
    t = settings.topics
    for kind, topic_name in (("catalog", t.catalog), ("queries", t.queries), ("results", t.results),
                             ("interactions", t.interactions)):
        topic = app.topic(topic_name, value_serializer="raw", key_serializer="raw")
        app.agent(topic, name=f"features-{kind}")(_agent(processor, loops, executor, s.batch_size,
                                                          s.batch_within_s))
    return app


def _agent(
    processor: Processor,
    loops: list[asyncio.AbstractEventLoop],
    executor: ThreadPoolExecutor,
    batch_size: int,
    within_s: float,
) -> Callable[[faust.StreamT], Coroutine[Any, Any, None]]:
    async def agent(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        if not loops:
            loops.append(loop)
        async for events in stream.take_events(batch_size, within=within_s):
            raws = [RawRecord(e.message.topic, e.message.partition, e.message.offset,
                              e.message.key, e.message.value) for e in events]
            applying = loop.run_in_executor(executor, processor.apply, raws)
            try:
                # Shielded: when the worker stops, take_events acknowledges this batch on the
                # way out, so the batch (dead letters included) must be finished first.
                await asyncio.shield(applying)
            except asyncio.CancelledError:
                await applying
                raise
            except BaseException as exc:
                # Letting this escape would make faust acknowledge the batch on the way out
                # and commit it unprocessed. Die instead: the batch is redelivered to whoever
                # takes the partitions over.
                log.critical("batch_failed", error=repr(exc), events=len(raws), exc_info=True)
                os._exit(70)

    return agent
