"""What `run --check` and the start say about Redis's eviction policy (stubbed INFO replies:
the policy of the Redis the suite shares is not changed by tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fakeredis
import pytest
from structlog.testing import capture_logs

from daemon.preflight import evicting_policy


class _Info:
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    async def info(self, section: str | None = None) -> Any:
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


@pytest.mark.parametrize(
    ("reply", "policy"),
    [
        ({"maxmemory_policy": "allkeys-lru"}, "allkeys-lru"),
        ({"maxmemory_policy": "volatile-ttl"}, "volatile-ttl"),  # the lease key has a TTL
        ({"maxmemory_policy": "noeviction"}, None),
        ({"127.0.0.1:7000": {"maxmemory_policy": "allkeys-lfu"}}, "allkeys-lfu"),  # cluster
        (RuntimeError("unknown command 'INFO'"), None),
    ],
)
async def test_an_evicting_policy_is_named(reply: Any, policy: str | None) -> None:
    assert await evicting_policy(_Info(reply)) == policy


async def test_the_daemon_warns_at_start_when_redis_evicts(tmp_path: Path) -> None:
    from daemon.service import Service
    from daemon.settings import load_settings

    redis = fakeredis.FakeAsyncRedis()

    async def info(section: str | None = None) -> dict[str, Any]:
        return {"maxmemory_policy": "allkeys-lru"}

    redis.info = info  # type: ignore[method-assign]
    settings = load_settings(None, {"LIVEPRED_MODELS__RUN_ROOT": str(tmp_path),
                                    "LIVEPRED_METRICS__PORT": "0"})
    service = Service(settings, redis=redis)
    with capture_logs() as logs:
        await service._check_redis()  # what start does with the Redis it connects to
    await redis.aclose()
    warned = [e for e in logs if e.get("policy") == "allkeys-lru"]
    assert warned and "noeviction" in warned[0]["event"]
