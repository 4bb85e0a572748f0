"""One trainer writes at a time: a lease in Redis (``SET NX PX`` with a token), renewed while held.

The token names its holder (``host:pid:random``), so a second trainer can say who holds it. Only
the holder can renew or release it (compare-and-set in a Lua script); a holder that stops
renewing (crashed, partitioned) loses it after ``ttl_s`` and another trainer may take over. A
holder whose renewal fails learns it through :attr:`Lease.lost` and must not write after that.
"""

from __future__ import annotations

import os
import platform
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import structlog

from features import keys

log = structlog.get_logger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseHeld(RuntimeError):
    """Another trainer holds the lease."""

    def __init__(self, holder: str | None) -> None:
        super().__init__(f"another trainer holds the lease: {holder or 'unknown'}")
        self.holder = holder


class Lease:
    def __init__(self, client: redis.Redis, ttl_s: float, key: str = keys.TRAINER_LEASE) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def acquire(self) -> bool:
        if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            self.lost.clear()
            log.info("lease_acquired", key=self.key, holder=self.token)
            return True
        return False

    def renew(self) -> bool:
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if not ok:
            self.lost.set()
        return ok

    def release(self) -> bool:
        released = bool(self._release(keys=[self.key], args=[self.token]))
        if released:
            log.info("lease_released", key=self.key, holder=self.token)
        return released

    @contextmanager
    def held(self, wait_s: float = 0.0, poll_s: float = 1.0) -> Iterator[Lease]:
        """Hold the lease for the block, renewed every third of its TTL; raises :class:`LeaseHeld`
        when it is not free within ``wait_s``."""
        deadline = threading.Event()
        timer = threading.Timer(wait_s, deadline.set)
        timer.daemon = True
        timer.start()
        try:
            while not self.acquire():
                if deadline.is_set() or wait_s <= 0:
                    raise LeaseHeld(self.holder())
                deadline.wait(poll_s)
        finally:
            timer.cancel()
        stop = threading.Event()

        def renew_loop() -> None:
            while not stop.wait(self.ttl_ms / 3000):
                try:
                    if not self.renew():
                        log.error("lease_lost", key=self.key, holder=self.token, now=self.holder())
                        return
                except redis.RedisError as exc:  # try again next time; the TTL leaves room
                    log.warning("lease_renew_failed", key=self.key, reason=str(exc))

        renewer = threading.Thread(target=renew_loop, name="lease-renewal", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            stop.set()
            renewer.join(timeout=5)
            try:
                self.release()
            except redis.RedisError as exc:  # it expires by itself
                log.warning("lease_release_failed", key=self.key, reason=str(exc))
