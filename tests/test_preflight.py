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


@pytest.mark.redis
async def test_the_lag_is_what_the_group_has_not_read_and_none_once_it_has_read_all(
    real_redis: Any, key_prefix: str
) -> None:
    # livepred_consumer_lag and `run --check` showed Redis's own `lag`, which Redis 7.0 keeps
    # stale for good after a restart from its append-only file (4,800 with nothing unread,
    # in an audit): a group that has delivered the newest entry has no lag, whatever it says.
    from daemon.streams import group_lag

    stream = f"{key_prefix}bars"
    for i in range(10):
        await real_redis.xadd(stream, {"n": i})
    await real_redis.xgroup_create(stream, "g", id="0")
    await real_redis.xreadgroup("g", "c", {stream: ">"}, count=4)
    found = await group_lag(real_redis, stream, "g")
    assert found is not None
    want_lag = found[0].get("lag")  # what Redis counts, when it counts (>= 7.0)
    assert found[1] == (None if want_lag is None else 6)
    await real_redis.xreadgroup("g", "c", {stream: ">"})
    assert (await group_lag(real_redis, stream, "g"))[1] == 0
    assert await group_lag(real_redis, stream, "absent") is None

    class StaleLag:  # the restarted Redis 7.0's reply: everything read, lag not 0
        def __getattr__(self, name: str) -> Any:
            return getattr(real_redis, name)

        async def xinfo_groups(self, key: str) -> Any:
            return [{**g, "lag": 4800} for g in await real_redis.xinfo_groups(key)]

    assert (await group_lag(StaleLag(), stream, "g"))[1] == 0


@pytest.mark.parametrize(
    ("partitions", "written", "flagged"),
    [
        ("4", ["bars:{0}", "bars:{3}"], []),
        ("4", ["bars"], ["bars"]),  # a feeder left unpartitioned
        ("4", ["bars:{1}", "bars:{4}"], ["bars:{4}"]),  # a feeder on 8 partitions
        ("1", ["bars"], []),
        ("1", ["bars:{0}"], ["bars:{0}"]),  # a feeder partitioned, the daemon not
    ],
)
async def test_input_streams_no_instance_reads_are_named(
    partitions: str, written: list[str], flagged: list[str]
) -> None:
    # A feeder on another partition layout wrote where no instance reads: every bar waited
    # unseen, with nothing in the log.
    from daemon.preflight import check_redis, unread_inputs
    from daemon.settings import load_settings

    redis = fakeredis.FakeAsyncRedis()
    for key in written:
        await redis.xadd(key, {"symbol": "AAPL"})
    settings = load_settings(None, {"LIVEPRED_STREAMS__PARTITIONS": partitions})
    assert await unread_inputs(redis, settings) == flagged
    lines = (await check_redis(redis, settings)).lines
    said = [line for line in lines if "no instance with this config reads" in line]
    assert bool(said) is bool(flagged) and all(k in said[0] for k in flagged), lines
    await redis.aclose()
