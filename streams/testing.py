"""Helpers for tests and the benchmark: publish contract events, run real worker processes.

Workers run as ``shoprank streams`` subprocesses, each in its own process group, configured only
through the environment (exactly as in production), and are stopped by their own pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TypeVar

from core import kafka
from core.events import Event, encode
from core.settings import ROOT, Settings
from core.topics import TOPIC_KEYS, route

T = TypeVar("T")


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
        "SHOPRANK_LOG_LEVEL": "WARNING",
    })
    env.update({f"SHOPRANK_TOPIC_{name.upper()}": getattr(t, name) for name in TOPIC_KEYS})
    env.update({f"SHOPRANK_STREAMS_{k.upper()}": str(v) for k, v in streams.items()})
    return env


class Worker:
    """One ``shoprank streams`` process (or another ``shoprank`` service: ``command``) in its own
    process group; logs go to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, command: str = "streams") -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoprank", command],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a clean shutdown (offsets committed)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_until(probe: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout} s: {what or probe}")
        time.sleep(interval)
