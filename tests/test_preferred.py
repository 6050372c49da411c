"""Preferred partitions: two instances that each serve half and stand by for the other half.

In-process on one fakeredis server: instance B starts alone and serves everything; when A
starts, B hands A's preferred partitions back; when A stops, B takes them over again. Every
bar gets exactly one output throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import fakeredis
import numpy as np
import pytest

from daemon.client import BarPublisher
from daemon.service import Service
from daemon.settings import load_settings
from daemon.worker import Role
from tests import model_factory as mf

FEATS = ["ret_1d", "ret_5d", "rsi_14"]
PARTITIONS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pref-run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(FEATS)))
    mf.write_lightgbm(root, "fwd", "LightGBM", X, X[:, 0], FEATS)
    return root


def instance(run: Path, server: fakeredis.FakeServer, name: str, preferred: str) -> Service:
    env = {
        "LIVEPRED_MODELS__RUN_ROOT": str(run),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "10",
        "LIVEPRED_STREAMS__PARTITIONS": str(PARTITIONS),
        "LIVEPRED_STREAMS__PARTITIONS_PREFERRED": preferred,
        "LIVEPRED_STREAMS__LEASE_MS": "300",
        "LIVEPRED_STREAMS__CONSUMER": name,
    }
    return Service(load_settings(None, env), redis=fakeredis.FakeAsyncRedis(server=server))


def active(service: Service) -> set[int]:
    return {w.partition for w in service.workers if w.role == Role.ACTIVE}  # type: ignore[misc]


async def until(predicate, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_each_serves_its_preferred_half_and_stands_by_for_the_other(run: Path) -> None:
    server = fakeredis.FakeServer()
    feeder_redis = fakeredis.FakeAsyncRedis(server=server)
    publisher = BarPublisher(feeder_redis, partitions=PARTITIONS)
    symbols = [f"S{i}" for i in range(24)]
    ts = 0

    async def publish_round() -> None:
        nonlocal ts
        ts += 60_000
        await publisher.publish_many(
            {"symbol": s, "ts": ts, "open": 1.0, "high": 1.0, "low": 1.0,
             "close": 1.0 + 0.01 * ((ts // 60_000 + i) % 7), "volume": 1.0}
            for i, s in enumerate(symbols)
        )

    b = instance(run, server, "b", "2,3")
    await b.start()
    b_task = asyncio.create_task(b.run())
    # Alone, B serves its own half at once and A's half after a whole lease time free.
    await until(lambda: active(b) == {0, 1, 2, 3})
    for _ in range(3):
        await publish_round()
    a = instance(run, server, "a", "0,1")
    await a.start()
    a_task = asyncio.create_task(a.run())
    await until(lambda: active(a) == {0, 1} and active(b) == {2, 3})
    assert b.metrics.lease_handbacks.labels("0")._value.get() == 1
    for _ in range(3):
        await publish_round()
    # A goes away: B takes its half over again.
    a.request_stop()
    assert await asyncio.wait_for(a_task, 10) == 0
    await until(lambda: active(b) == {0, 1, 2, 3})
    for _ in range(3):
        await publish_round()

    async def outputs() -> list[bytes]:
        srcs = []
        for p in range(PARTITIONS):
            for _, fields in await feeder_redis.xrange(f"predictions:{{{p}}}"):
                srcs.append(fields[b"data"])
        return srcs

    expected = 9 * len(symbols)
    deadline = asyncio.get_running_loop().time() + 15
    while len(await outputs()) < expected:
        assert asyncio.get_running_loop().time() < deadline, f"{len(await outputs())}/{expected}"
        await asyncio.sleep(0.05)
    import msgpack

    srcs = [msgpack.unpackb(d)["src"] for d in await outputs()]
    assert len(srcs) == len(set(srcs)) == expected
    for p in range(PARTITIONS):
        assert (await feeder_redis.xpending(f"bars:{{{p}}}", "livepred"))["pending"] == 0
    b.request_stop()
    assert await asyncio.wait_for(b_task, 10) == 0
    await feeder_redis.aclose()
