"""Lease fencing of the stream primitives (CONTRACT section 9): without the lease, a read
delivers nothing (the group's cursor stays put) and a commit writes nothing; and a worker
whose lease is taken stops at once, as a standby. On fakeredis and on the real Redis.

A read is fenced two ways (`StreamIO._read_fenced`): WATCH on the lease key and MULTI/EXEC
where the client allows it, else a script (Redis Cluster); both are tested, and the WATCH
way when the lease key changes between WATCH and EXEC (taken over, or renewed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis.asyncio as aioredis

from daemon import streams
from daemon.entries import Commit
from daemon.service import Service
from daemon.settings import load_settings
from daemon.streams import LEASE_LOST, StreamIO
from daemon.wire import encode_bar
from daemon.worker import Role
from tests import model_factory as mf

pytestmark = pytest.mark.timeout(60)

MINE, OTHER = "inst-a:1111", "inst-b:2222"


def _io(redis: object, prefix: str, consumer: str = "inst-a") -> StreamIO:
    return StreamIO(
        redis,
        inputs=[f"{prefix}bars:{{0}}"],
        output=f"{prefix}predictions:{{0}}",
        dead_letter=f"{prefix}bars:dead:{{0}}",
        group=f"{prefix}livepred",
        consumer=consumer,
        lease_key=f"{prefix}livepred:lease:{{0}}",
        output_maxlen=1000,
    )


async def _prepared(redis: object, prefix: str, entries: int = 3) -> StreamIO:
    io = _io(redis, prefix)
    await io.ensure_groups()
    for i in range(entries):
        await redis.xadd(io.inputs[0], {"n": str(i)})  # type: ignore[attr-defined]
    return io


@pytest.fixture(params=["watch", "script"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each read test once per way of fencing the read."""
    if request.param == "script":
        monkeypatch.setattr(streams, "WATCH_TRIES", 0)
    return str(request.param)


async def test_a_read_without_the_lease_delivers_nothing(client_and_prefix, read_path) -> None:
    redis, prefix = client_and_prefix
    io = await _prepared(redis, prefix)
    await redis.set(io.lease_key, OTHER, px=10_000)
    assert await io.read_new(MINE, 10, 10) is None
    assert (await redis.xpending(io.inputs[0], io.group))["pending"] == 0
    # The rightful holder gets every entry, in order, with its fields.
    await redis.set(io.lease_key, MINE, px=10_000)
    entries = await io.read_new(MINE, 10, 10)
    assert entries is not None
    assert [e.fields for e in entries] == [{b"n": str(i).encode()} for i in range(3)]
    assert all(e.stream == io.inputs[0] for e in entries)
    again = await io.read_new(MINE, 10, 10)
    assert again is not None and len(again) == 0  # read, and nothing new


async def test_a_commit_without_the_lease_writes_nothing(client_and_prefix) -> None:
    redis, prefix = client_and_prefix
    io = await _prepared(redis, prefix)
    await redis.set(io.lease_key, MINE, px=10_000)
    entries = await io.read_new(MINE, 10, 10)
    assert entries
    await redis.set(io.lease_key, OTHER, px=10_000)  # taken over meanwhile
    commit = Commit(
        outputs=[(b"AAA", b"x")], dead=[{b"error": b"decode_error"}],
        acks={io.inputs[0]: [e.entry_id for e in entries]},
    )
    assert await io.commit(MINE, commit) == LEASE_LOST
    assert await redis.xlen(io.output) == 0
    assert await redis.exists(io.dead_letter) == 0
    assert (await redis.xpending(io.inputs[0], io.group))["pending"] == 3


class _Meddling:
    """A raw client whose transaction lets `meddle` run right after the lease is read (between
    WATCH and EXEC), the first `times` times: what another connection may do meanwhile."""

    def __init__(self, raw: object, meddle, times: int = 1) -> None:
        self.raw, self.meddle, self.times, self.reads = raw, meddle, times, 0

    def pipeline(self, transaction: bool = True) -> object:
        outer = self
        pipe = self.raw.pipeline(transaction=transaction)  # type: ignore[attr-defined]
        get = pipe.get

        async def get_then_meddle(key: str) -> object:
            value = await get(key)
            outer.reads += 1
            if outer.reads <= outer.times:
                await outer.meddle()
            return value

        pipe.get = get_then_meddle
        return pipe


async def _meddled(redis: Any, prefix: str, meddle: Any, times: int) -> tuple[StreamIO, _Meddling]:
    """A partition with three entries, the lease ours, and reads that let `meddle` run
    between WATCH and EXEC the first `times` times."""
    io = await _prepared(redis, prefix)
    await redis.set(io.lease_key, MINE, px=10_000)
    raw = io._raw_client()
    assert raw is not None
    meddling = _Meddling(raw, meddle, times)
    io._raw_client = lambda: meddling  # type: ignore[method-assign]
    return io, meddling


async def test_a_lease_taken_between_watch_and_exec_delivers_nothing(client_and_prefix) -> None:
    redis, prefix = client_and_prefix

    async def take_over() -> None:
        await redis.set(io.lease_key, OTHER, px=10_000)

    io, meddling = await _meddled(redis, prefix, take_over, times=1)
    assert await io.read_new(MINE, 10, 10) is None
    assert meddling.reads == 2  # the EXEC was refused, and the next try saw the new holder
    assert (await redis.xpending(io.inputs[0], io.group))["pending"] == 0


async def _renew(redis: Any, io: StreamIO) -> None:  # the holder's own renewal
    await redis.pexpire(io.lease_key, 20_000)


async def test_a_renewal_between_watch_and_exec_only_retries_the_read(client_and_prefix) -> None:
    redis, prefix = client_and_prefix
    io, meddling = await _meddled(
        redis, prefix, lambda: _renew(redis, io), times=streams.WATCH_TRIES - 1
    )
    entries = await io.read_new(MINE, 10, 10)
    assert entries is not None
    assert [e.fields for e in entries] == [{b"n": str(i).encode()} for i in range(3)]
    assert meddling.reads == streams.WATCH_TRIES
    assert (await redis.xpending(io.inputs[0], io.group))["pending"] == 3


async def test_a_read_the_lease_key_keeps_changing_under_falls_back_to_the_script(
    client_and_prefix,
) -> None:
    redis, prefix = client_and_prefix
    io, meddling = await _meddled(
        redis, prefix, lambda: _renew(redis, io), times=streams.WATCH_TRIES
    )
    entries = await io.read_new(MINE, 10, 10)
    assert entries is not None and len(entries) == 3
    assert meddling.reads == streams.WATCH_TRIES  # every watched try refused, then the script


@pytest.mark.redis
async def test_an_empty_read_wakes_up_as_soon_as_an_entry_arrives(
    real_redis: aioredis.Redis, key_prefix: str, read_path: str
) -> None:
    io = await _prepared(real_redis, key_prefix, entries=0)
    await real_redis.set(io.lease_key, MINE, px=10_000)

    async def publish_later() -> None:
        await asyncio.sleep(0.2)
        await real_redis.xadd(io.inputs[0], {"n": "late"})

    task = asyncio.create_task(publish_later())
    started = time.monotonic()
    entries = await io.read_new(MINE, 10, 5000)
    elapsed = time.monotonic() - started
    await task
    assert entries is not None and [e.fields for e in entries] == [{b"n": b"late"}]
    assert 0.15 < elapsed < 2.0


async def test_a_read_on_a_missing_group_says_so(client_and_prefix) -> None:
    redis, prefix = client_and_prefix
    io = _io(redis, prefix)
    assert await io.groups_missing()
    await io.ensure_groups()
    assert not await io.groups_missing()


# --- the worker ------------------------------------------------------------------------------

FEATURES = ["ret_1d", "ret_5d", "vol_10d"]


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fencing_run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(FEATURES)))
    mf.write_lightgbm(root, "fwd", "LightGBM", X, X[:, 0], FEATURES)
    mf.write_manifest(root, run_id="fencing")
    return root


def _bar(ts_min: int) -> dict[str, object]:
    return {"symbol": "AAA", "ts": ts_min * 60_000, "open": 1.0, "high": 1.0, "low": 1.0,
            "close": 1.0 + ts_min / 100, "volume": 1.0}


async def test_a_worker_whose_lease_is_taken_stops_reading_and_stands_by(lgb_run: Path) -> None:
    redis = fakeredis.FakeAsyncRedis()
    environ = {
        "LIVEPRED_MODELS__RUN_ROOT": str(lgb_run),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "10",
        "LIVEPRED_STREAMS__LEASE_MS": "3000",
        "LIVEPRED_STREAMS__CONSUMER": "inst-a",
    }
    service = Service(load_settings(None, environ), redis=redis)
    await service.start()
    worker = service.workers[0]
    task = asyncio.create_task(service.run())
    try:
        deadline = time.monotonic() + 10
        while worker.role != Role.ACTIVE:
            assert time.monotonic() < deadline, "the worker never became active"
            await asyncio.sleep(0.01)
        await redis.xadd("bars", encode_bar(_bar(1)))
        while await redis.xlen("predictions") < 1:
            assert time.monotonic() < deadline, "no output"
            await asyncio.sleep(0.01)
        # Another instance takes the lease (as after this one stalled past lease_ms).
        await redis.set("livepred:lease", OTHER, px=60_000)
        for minute in range(2, 12):
            await redis.xadd("bars", encode_bar(_bar(minute)))
        while worker.role != Role.STANDBY:
            assert time.monotonic() < deadline, "the worker did not notice the lost lease"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        # Nothing after the takeover was published or delivered to this instance: the new
        # owner reads all ten bars itself.
        assert await redis.xlen("predictions") == 1
        pending = await redis.xpending("bars", "livepred")
        assert pending["pending"] == 0
        reply = await redis.xreadgroup("livepred", "inst-b", {"bars": ">"}, count=100)
        assert len(reply[0][1]) == 10
        assert service.metrics.lease_losses.labels("-")._value.get() == 1
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
        await redis.aclose()
