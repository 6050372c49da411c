"""Shared fixtures: the real Redis (own DB index and key prefix, cleaned up) and fakeredis."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
TEST_DB = 13  # integration tests never touch database 0

# Keep the frameworks from grabbing every core of a 2-core CI box.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as the CLI and handlers.torchscript set it


@pytest.fixture(scope="session", autouse=True)
def _compiled_models_in_a_temporary_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Compiled tree models (handlers.tree_compiler) go to a cache of this test session, not
    the user's; daemons started as subprocesses inherit it."""
    before = os.environ.get("CACHE_DIRECTORY")
    os.environ["CACHE_DIRECTORY"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("CACHE_DIRECTORY", None)
    else:
        os.environ["CACHE_DIRECTORY"] = before


def _real_redis_available() -> bool:
    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=0.5)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def real_redis_url() -> str:
    if not _real_redis_available():
        pytest.skip(f"no Redis reachable at {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{TEST_DB}"


@pytest.fixture
def key_prefix(real_redis_url: str) -> Iterator[str]:
    """A unique key prefix; every key under it is deleted afterwards."""
    prefix = f"lptest:{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(real_redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    # Keys like `<prefix>bars:{0}` match too; the lease and heartbeat keys use the group name.
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def real_redis(real_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(real_redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.redis)])
def client_and_prefix(request: pytest.FixtureRequest) -> tuple[Any, str]:
    """The same test on fakeredis and on the real Redis: (client, key prefix), from the
    fixtures above (which close the client and delete the keys)."""
    if request.param == "fake":
        return request.getfixturevalue("fake_redis"), "t:"
    return request.getfixturevalue("real_redis"), request.getfixturevalue("key_prefix")
