"""How the Redis clients put commands on the wire: one hiredis call per command.

redis-py's own hiredis path still runs Python per argument (an ``isinstance`` scan, then its
encoder on each), which cost a scorer ~0.12 ms of CPU per query on the feature read's 100-key
MGET (docs/scorer-cost.md); ``hiredis.pack_command`` takes the same str, bytes, int and float
arguments whole and writes the same bytes. What it does not take (a memoryview, a bool, which
redis-py refuses with a clear error) and multi-word command names ("CONFIG GET") go to redis-py's
own packer, unchanged.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.connection import Encoder, PythonRespSerializer

# redis-py's defaults (Connection: utf-8, strict; buffer cutoff 6000).
_FALLBACK = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


class HiredisPacker:
    """A redis-py ``command_packer``: stateless, so one is shared by every connection."""

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " not in name:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # not str, bytes, int or float: redis-py says what is wrong
                pass
        return _FALLBACK.pack(*args)


PACKER = HiredisPacker()
