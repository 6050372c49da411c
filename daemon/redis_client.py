"""The daemon's Redis client, as its settings say (the plain client, or the cluster one)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.settings import Settings


def make_redis(settings: Settings) -> Any:
    socket_timeout_s = max(5.0, settings.streams.block_ms / 1000 + 5.0)
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 15,
    }
    if settings.redis.cluster:
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ClusterDownError, SlotNotCoveredError

        class Cluster(RedisCluster):  # type: ignore[misc]
            # A command is sent again inside the client only when the cluster refused it
            # (down, a slot not covered yet): one whose connection died or timed out may
            # have run, and sent again it would hide that from the worker, whose own retries
            # know what a lost reply may have done (the plain client from a URL does not
            # retry either). The worker sends single commands and scripts here, never a
            # cluster pipeline (redis-py's pipelines keep their own resending).
            ERRORS_ALLOW_RETRY = (ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

        refusals = Retry(
            NoBackoff(), 3, supported_errors=(ClusterDownError, SlotNotCoveredError)  # type: ignore[arg-type]
        )
        return Cluster.from_url(settings.redis.url, retry=refusals, **common)
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(settings.redis.url, **common)
