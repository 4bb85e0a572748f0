"""How the feature store talks to Redis: the hiredis packer writes redis-py's bytes, and the read
path's ShardReads (the pooled connection itself, no pipeline) stays in step after an error reply.
Reads through a failover: tests/test_cluster.py, tests/test_streams_batch.py (Sentinel)."""

from __future__ import annotations

import pytest
import redis
from redis.connection import PythonRespSerializer

from core.settings import Settings
from features.redis_store import ShardReads
from features.resp import PACKER


def _python_packer() -> PythonRespSerializer:
    return PythonRespSerializer(6000, redis.connection.Encoder("utf-8", "strict", False).encode)


@pytest.mark.parametrize("args", [
    ("MGET", "i:p1", "{2}i:p2", "qh:kinect sports"),
    ("HMGET", "qh:_xbox", "_t", "7 ü"),
    ("SET", "k", b"\x00\xff bytes", "EX", 30),
    ("ZADD", "z", 0.1 + 0.2, "a", 1e20, "b", -0.0, "c", 10**30, "d"),
    ("EVALSHA", "0" * 40, 2, "a", "b", b"\x00" * 70_000),  # past redis-py's chunking cutoff
])
def test_the_hiredis_packer_writes_what_redis_py_writes(args: tuple) -> None:
    assert b"".join(PACKER.pack(*args)) == b"".join(_python_packer().pack(*args))


def test_what_hiredis_does_not_take_goes_to_redis_py() -> None:
    view = memoryview(b"abc")
    assert b"".join(PACKER.pack("SET", "k", view)) == b"".join(_python_packer().pack("SET", "k", view))
    assert PACKER.pack("CONFIG GET", "maxmemory") == _python_packer().pack("CONFIG GET", "maxmemory")
    with pytest.raises(redis.DataError, match="bool"):
        PACKER.pack("SET", "k", True)


def _reads(client: redis.Redis) -> ShardReads:
    return ShardReads(client, [0])  # one shard; the slot is read on a cluster only


def test_shard_reads_raise_an_error_reply_once_every_reply_is_read(redis_client: redis.Redis) -> None:
    redis_client.mset({"a": b"1", "b": b"2"})
    redis_client.hset("h", mapping={"x": b"9"})
    reads = _reads(redis_client)
    reads.to(0).mget(["a", "b", "missing"])
    reads.to(0).hgetall("a")  # WRONGTYPE: a string
    reads.to(0).hmget("h", ["x", "y"])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        reads.execute()
    # The connection went back to the pool in step: the next read gets its own replies.
    again = _reads(redis_client)
    again.to(0).hgetall("h")
    again.to(0).mget(["b", "a"])
    assert again.execute() == [{b"x": b"9"}, [b"2", b"1"]]


@pytest.mark.parametrize("protocol", [2, 3])
def test_shard_reads_read_a_hash_as_a_dict_in_either_protocol(settings: Settings, redis_client: redis.Redis,
                                                              protocol: int) -> None:
    redis_client.hset("h", mapping={"x": b"9", "y": b"8"})
    client = redis.Redis.from_url(settings.redis.url, protocol=protocol)
    try:
        reads = _reads(client)
        reads.to(0).hgetall("h")
        reads.to(0).hgetall("missing")
        reads.to(0).hmget("h", ["y", "z"])
        assert reads.execute() == [{b"x": b"9", b"y": b"8"}, {}, [b"8", None]]
    finally:
        client.close()
