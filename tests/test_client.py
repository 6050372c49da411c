"""daemon.client: BarPublisher and PredictionReader against fakeredis and the real Redis."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import msgpack
import pytest
import redis.asyncio as aioredis

from daemon.client import BarPublisher, PredictionReader, stream_keys
from daemon.wire import Bar, decode_bar
from daemon.wire_events import PredictionEvent, TargetResult, encode_prediction


@dataclass
class Backend:
    redis: Any
    prefix: str  # every key a test writes starts with it

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"


@pytest.fixture(params=["fakeredis", "real_redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
        yield Backend(client, "")
        await client.aclose()
        return
    url = request.getfixturevalue("real_redis_url")
    prefix = request.getfixturevalue("key_prefix")  # deletes every key under it afterwards
    client = aioredis.Redis.from_url(url)
    yield Backend(client, prefix)
    await client.aclose()


def make_bar(symbol: str, minute: int, close: float = 100.0) -> dict[str, Any]:
    return {
        "symbol": symbol,
        "ts": 1_700_000_000_000 + minute * 60_000,
        "open": close,
        "high": close * 1.01,
        "low": close * 0.99,
        "close": close,
        "volume": 10.0,
    }


def make_event(symbol: str, ts: int, value: float = 0.5) -> PredictionEvent:
    return PredictionEvent(
        symbol=symbol,
        ts=ts,
        src=f"bars/{ts}-0",
        run="test-run",
        lat_us=123,
        targets={
            "fwd_ret_5": TargetResult(
                preds={"LightGBM": value, "MLP": value / 2},
                selected="LightGBM",
                pred=value,
                warming={"LSTM": 3},
                failed={},
            )
        },
    )


async def write_events(redis: Any, key: str, events: list[PredictionEvent]) -> list[str]:
    ids = []
    for event in events:
        entry_id = await redis.xadd(key, encode_prediction(event))
        ids.append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
    return ids


# ---- BarPublisher --------------------------------------------------------------------------


async def test_publish_round_trip(backend: Backend) -> None:
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"))
    entry_id = await publisher.publish(make_bar("AAPL", 1, 101.5))
    bar = Bar("MSFT", 1_700_000_060_000, 1.0, 2.0, 0.5, 1.5, 0.0)
    ids = await publisher.publish_many([bar, make_bar("AAPL", 2)])
    rows = await backend.redis.xrange(backend.key("bars"))
    assert [r[0].decode() for r in rows] == [entry_id, *ids]
    assert all(set(fields) == {b"data"} for _, fields in rows)  # CONTRACT §4: msgpack `data`
    decoded = [decode_bar(fields, backend.key("bars"), i.decode()) for i, fields in rows]
    assert all(isinstance(d, Bar) for d in decoded)
    first = decoded[0]
    assert isinstance(first, Bar)
    assert (first.symbol, first.ts, first.close) == ("AAPL", 1_700_000_060_000, 101.5)
    second = decoded[1]
    assert isinstance(second, Bar)
    assert (second.symbol, second.high, second.volume) == ("MSFT", 2.0, 0.0)
    assert publisher.published == 3


async def test_publish_many_validates_everything_first(backend: Backend) -> None:
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"))
    bad = make_bar("BAD", 2)
    bad["close"] = -1.0
    with pytest.raises(ValueError, match="bad_value:close"):
        await publisher.publish_many([make_bar("AAPL", 1), bad, make_bar("AAPL", 3)])
    missing = make_bar("X", 1)
    del missing["volume"]
    with pytest.raises(ValueError, match="missing_field:volume"):
        await publisher.publish(missing)
    assert await backend.redis.xlen(backend.key("bars")) == 0
    assert publisher.published == 0


async def test_partition_routing_is_crc32_mod_n(backend: Backend) -> None:
    partitions = 4
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"), partitions=partitions)
    symbols = [f"S{i:02d}" for i in range(24)] + ["AAPL", "ÆØÅ", "BRK.B"]
    await publisher.publish_many(make_bar(s, 1) for s in symbols)
    expected: dict[str, list[str]] = {}
    for symbol in symbols:
        p = zlib.crc32(symbol.encode()) % partitions
        expected.setdefault(f"{backend.prefix}bars:{{{p}}}", []).append(symbol)
        assert publisher.partition_for(symbol) == p
        assert publisher.stream_for(symbol) == f"{backend.prefix}bars:{{{p}}}"
    assert publisher.keys == [f"{backend.prefix}bars:{{{p}}}" for p in range(partitions)]
    assert await backend.redis.exists(backend.key("bars")) == 0  # no unsuffixed key
    for key in publisher.keys:
        rows = await backend.redis.xrange(key)
        got = [decode_bar(f, key, i.decode()) for i, f in rows]
        assert [b.symbol for b in got if isinstance(b, Bar)] == expected.get(key, [])


async def test_cluster_mode_suffixes_even_one_partition(backend: Backend) -> None:
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"), cluster=True)
    await publisher.publish(make_bar("AAPL", 1))
    assert publisher.stream_for("AAPL") == f"{backend.prefix}bars:{{0}}"
    assert await backend.redis.xlen(f"{backend.prefix}bars:{{0}}") == 1
    assert stream_keys("predictions", 1, cluster=True) == ["predictions:{0}"]
    assert stream_keys("predictions", 3) == [
        "predictions:{0}",
        "predictions:{1}",
        "predictions:{2}",
    ]
    assert stream_keys("predictions") == ["predictions"]


async def test_maxlen_trims_the_stream(backend: Backend) -> None:
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"), maxlen=10)
    await publisher.publish_many(make_bar("AAPL", m) for m in range(1, 1001))
    # MAXLEN ~ trims whole macro nodes: never below 10, far below 1000.
    assert 10 <= await backend.redis.xlen(backend.key("bars")) < 500


# ---- PredictionReader: plain reads --------------------------------------------------------


async def test_reader_round_trip_typed_events(backend: Backend) -> None:
    key = backend.key("predictions")
    events = [make_event("AAPL", 1000 + i, value=0.1 * i) for i in range(5)]
    await write_events(backend.redis, key, events)
    reader = PredictionReader(backend.redis, stream=key, start="0")
    got = await reader.read(count=100, block_ms=50)
    assert got == events  # typed PredictionEvent with TargetResult, equal field by field
    assert isinstance(got[0].targets["fwd_ret_5"], TargetResult)
    assert got[2].targets["fwd_ret_5"].warming == {"LSTM": 3}
    assert await reader.read(count=100, block_ms=20) == []


async def test_reader_merges_all_partitions(backend: Backend) -> None:
    stream = backend.key("predictions")
    reader = PredictionReader(backend.redis, stream=stream, partitions=3, start="0")
    written: list[tuple[str, PredictionEvent]] = []
    for i in range(12):
        p = i % 3
        event = make_event(f"S{i}", 1000 + i)
        entry_id = (await write_events(backend.redis, f"{stream}:{{{p}}}", [event]))[0]
        written.append((entry_id, event))
    got = await reader.read(count=100, block_ms=50)
    assert sorted(got, key=lambda e: e.ts) == [e for _, e in written]
    # Merged in entry-id order (ids of different partitions may tie).
    id_of = {e.symbol: tuple(map(int, entry_id.split("-"))) for entry_id, e in written}
    ids = [id_of[e.symbol] for e in got]
    assert ids == sorted(ids)
    assert set(reader.last_ids) == {f"{stream}:{{{p}}}" for p in range(3)}


async def test_reader_resumes_from_last_ids_without_gaps_or_duplicates(backend: Backend) -> None:
    stream = backend.key("predictions")
    keys = stream_keys(stream, 2)
    first = [make_event(f"S{i}", i) for i in range(10)]
    for i, event in enumerate(first):
        await write_events(backend.redis, keys[i % 2], [event])
    reader = PredictionReader(backend.redis, stream=stream, partitions=2, start="0")
    seen = await reader.read(count=2, block_ms=20)  # 2 per partition
    assert len(seen) == 4
    saved = dict(reader.last_ids)
    more = [make_event(f"T{i}", 100 + i) for i in range(6)]
    for i, event in enumerate(more):
        await write_events(backend.redis, keys[i % 2], [event])
    resumed = PredictionReader(backend.redis, stream=stream, partitions=2, last_ids=saved)
    while batch := await resumed.read(count=3, block_ms=20):
        seen.extend(batch)
    assert sorted(e.symbol for e in seen) == sorted(e.symbol for e in first + more)
    assert len(seen) == len(first) + len(more)


async def test_reader_start_dollar_skips_history(backend: Backend) -> None:
    key = backend.key("predictions")
    await write_events(backend.redis, key, [make_event("OLD", 1)])
    reader = PredictionReader(backend.redis, stream=key)  # start="$"
    assert await reader.read(block_ms=20) == []
    await write_events(backend.redis, key, [make_event("NEW1", 2), make_event("NEW2", 3)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["NEW1", "NEW2"]


async def test_position_fixes_the_start_before_the_first_read(backend: Backend) -> None:
    # Publish, then read: without `position()` a "$" reader resolves "now" at its first read,
    # after the publish, and misses the event; positioned first, it reads it (and only it).
    key = backend.key("predictions")
    await write_events(backend.redis, key, [make_event("OLD", 1)])
    late = PredictionReader(backend.redis, stream=key)
    positioned = PredictionReader(backend.redis, stream=key)
    where = await positioned.position()
    assert where == positioned.last_ids and set(where) == {key}
    await write_events(backend.redis, key, [make_event("NEW", 2)])
    assert [e.symbol for e in await positioned.read(block_ms=20)] == ["NEW"]
    assert await late.read(block_ms=20) == []
    # Plain readers resumed from ids, and group readers, are not moved by it.
    grouped = PredictionReader(backend.redis, stream=key, group="g", consumer="c", start="0")
    assert await grouped.position() == {}
    assert [e.symbol for e in await grouped.read(block_ms=20)] == ["OLD", "NEW"]


async def test_reader_on_missing_stream_waits_then_returns_nothing(backend: Backend) -> None:
    reader = PredictionReader(backend.redis, stream=backend.key("nothing-here"), start="0")
    started = time.monotonic()
    assert await reader.read(block_ms=100) == []
    assert time.monotonic() - started < 5
    assert await reader.read(block_ms=None) == []


async def test_reader_blocked_read_wakes_on_new_entry(backend: Backend) -> None:
    key = backend.key("predictions")
    reader = PredictionReader(backend.redis, stream=key, start="0")
    pending = asyncio.create_task(reader.read(block_ms=3000))
    await asyncio.sleep(0.1)
    await write_events(backend.redis, key, [make_event("LATE", 7)])
    got = await asyncio.wait_for(pending, timeout=5)
    assert [e.symbol for e in got] == ["LATE"]


async def test_reader_skips_malformed_entries(backend: Backend) -> None:
    key = backend.key("predictions")
    await backend.redis.xadd(key, {"data": b"\xc1 not msgpack"})
    await backend.redis.xadd(key, {"symbol": "X"})
    await write_events(backend.redis, key, [make_event("OK", 5)])
    reader = PredictionReader(backend.redis, stream=key, start="0")
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["OK"]
    assert reader.skipped == 2


async def test_reader_async_iterator(backend: Backend) -> None:
    key = backend.key("predictions")
    await write_events(backend.redis, key, [make_event(f"S{i}", i) for i in range(5)])
    reader = PredictionReader(backend.redis, stream=key, start="0")
    symbols = []
    async for event in reader:
        symbols.append(event.symbol)
        if len(symbols) == 5:
            break
    assert symbols == [f"S{i}" for i in range(5)]


async def test_a_position_saved_inside_async_for_resumes_at_the_next_event(
    backend: Backend,
) -> None:
    # A strategy saves `last_ids` after each event it handles, then restarts: nothing lost
    # or repeated, though the reader fetched a whole batch ahead of the loop.
    stream = backend.key("predictions")
    keys = stream_keys(stream, 3)
    events = [make_event(f"S{i}", i) for i in range(60)]
    for i, event in enumerate(events):
        await write_events(backend.redis, keys[i % 3], [event])
    seen: list[str] = []
    saved: dict[str, str] = {}
    reader = PredictionReader(backend.redis, stream=stream, partitions=3, start="0")
    async for event in reader:
        seen.append(event.symbol)
        saved = dict(reader.last_ids)
        if len(seen) == 17:
            break  # the process dies here
    resumed = PredictionReader(backend.redis, stream=stream, partitions=3, last_ids=saved)
    while batch := await resumed.read(count=7, block_ms=20):
        seen.extend(e.symbol for e in batch)
    assert sorted(seen) == sorted(e.symbol for e in events) and len(seen) == len(events)
    # `read` after a stopped loop hands out what the loop had fetched, not skipping it.
    more = PredictionReader(backend.redis, stream=stream, partitions=3, start="0")
    async for _ in more:
        break
    rest = await more.read(count=100, block_ms=20)
    assert 1 + len(rest) + len(await more.read(count=100, block_ms=20)) == len(events)


async def test_group_ack_inside_async_for_acknowledges_only_the_events_handled(
    backend: Backend,
) -> None:
    key = backend.key("predictions")
    group = backend.key("strategy")
    await write_events(backend.redis, key, [make_event(f"S{i}", i) for i in range(40)])
    reader = PredictionReader(
        backend.redis, stream=key, group=group, consumer="c1", start="0", auto_ack=False
    )
    handled = []
    async for event in reader:
        handled.append(event.symbol)
        await reader.ack()
        if len(handled) == 10:
            break  # the process dies here: the 30 fetched but not handled stay pending
    assert await pending_count(backend.redis, key, group) == 30
    restarted = PredictionReader(
        backend.redis, stream=key, group=group, consumer="c1", auto_ack=False
    )
    again = [e.symbol for e in await restarted.read(count=100, block_ms=20)]
    assert again == [f"S{i}" for i in range(10, 40)]


async def test_a_group_reader_creates_its_group_again_after_redis_lost_it(
    backend: Backend,
) -> None:
    key = backend.key("predictions")
    group = backend.key("strategy")
    reader = PredictionReader(backend.redis, stream=key, group=group, consumer="c1", start="0")
    await write_events(backend.redis, key, [make_event("A", 1)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["A"]
    await backend.redis.delete(key)  # Redis restarted without its data
    await write_events(backend.redis, key, [make_event("B", 2)])  # the daemon publishes again
    got = await reader.read(block_ms=20)
    assert [e.symbol for e in got] == ["B"]  # the group created again at `start` ("0")


def test_reader_argument_checks() -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(ValueError, match="group and consumer"):
        PredictionReader(client, group="g")
    with pytest.raises(ValueError, match="last_ids"):
        PredictionReader(client, group="g", consumer="c", last_ids={"predictions": "0-0"})
    with pytest.raises(ValueError, match="does not read"):
        PredictionReader(client, last_ids={"other": "0-0"})
    with pytest.raises(ValueError, match="start"):
        PredictionReader(client, start="1-0")
    with pytest.raises(ValueError, match="maxlen"):
        BarPublisher(client, maxlen=0)
    with pytest.raises(ValueError, match="decode_responses"):
        PredictionReader(fakeredis.FakeAsyncRedis(decode_responses=True))


async def test_block_zero_is_refused() -> None:
    reader = PredictionReader(fakeredis.FakeAsyncRedis(), start="0")
    with pytest.raises(ValueError, match="block_ms"):
        await reader.read(block_ms=0)


# ---- PredictionReader: consumer groups ----------------------------------------------------


async def pending_count(redis: Any, key: str, group: str) -> int:
    summary = await redis.xpending(key, group)
    return int(summary["pending"])


async def test_group_reads_and_acks(backend: Backend) -> None:
    stream = backend.key("predictions")
    group = backend.key("strategy")
    reader = PredictionReader(
        backend.redis, stream=stream, partitions=2, group=group, consumer="c1", start="0"
    )
    keys = stream_keys(stream, 2)
    for i in range(6):
        await write_events(backend.redis, keys[i % 2], [make_event(f"S{i}", i)])
    got = await reader.read(count=100, block_ms=50)
    assert sorted(e.symbol for e in got) == [f"S{i}" for i in range(6)]
    for key in keys:
        assert await pending_count(backend.redis, key, group) == 0
    assert await reader.read(block_ms=20) == []


async def test_group_explicit_ack_and_redelivery_after_restart(backend: Backend) -> None:
    key = backend.key("predictions")
    group = backend.key("strategy")
    events = [make_event(f"S{i}", i) for i in range(4)]
    await write_events(backend.redis, key, events)
    reader = PredictionReader(
        backend.redis, stream=key, group=group, consumer="c1", start="0", auto_ack=False
    )
    assert [e.symbol for e in await reader.read(count=2, block_ms=20)] == ["S0", "S1"]
    assert await pending_count(backend.redis, key, group) == 2
    # A crash before ack: the restarted consumer gets its pending entries first, then new ones.
    restarted = PredictionReader(
        backend.redis, stream=key, group=group, consumer="c1", auto_ack=False
    )
    assert [e.symbol for e in await restarted.read(count=10, block_ms=20)] == ["S0", "S1"]
    assert [e.symbol for e in await restarted.read(count=10, block_ms=20)] == ["S2", "S3"]
    assert await pending_count(backend.redis, key, group) == 4
    assert await restarted.ack() == 4
    assert await pending_count(backend.redis, key, group) == 0
    assert await restarted.read(block_ms=20) == []


async def test_group_start_dollar_skips_history(backend: Backend) -> None:
    key = backend.key("predictions")
    group = backend.key("strategy")
    await write_events(backend.redis, key, [make_event("OLD", 1)])
    reader = PredictionReader(backend.redis, stream=key, group=group, consumer="c1")
    assert await reader.read(block_ms=20) == []
    await write_events(backend.redis, key, [make_event("NEW", 2)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["NEW"]


async def test_group_acks_malformed_entries(backend: Backend) -> None:
    key = backend.key("predictions")
    group = backend.key("strategy")
    reader = PredictionReader(backend.redis, stream=key, group=group, consumer="c1", start="0")
    await backend.redis.xadd(key, {"data": b"\xc1"})
    await write_events(backend.redis, key, [make_event("OK", 2)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["OK"]
    assert reader.skipped == 1
    assert await pending_count(backend.redis, key, group) == 0


# ---- feeder -> daemon wire -> strategy, through the client helpers ------------------------


async def test_from_settings_uses_the_daemon_names(backend: Backend) -> None:
    from daemon.partitions import partition_keys
    from daemon.settings import load_settings

    settings = load_settings(
        None,
        environ={
            "LIVEPRED_STREAMS__INPUT": backend.key("in"),
            "LIVEPRED_STREAMS__OUTPUT": backend.key("out"),
            "LIVEPRED_STREAMS__DEAD_LETTER": backend.key("dead"),
            "LIVEPRED_STREAMS__PARTITIONS": "3",
        },
    )
    publisher = BarPublisher.from_settings(backend.redis, settings)
    reader = PredictionReader.from_settings(backend.redis, settings, start="0")
    keys = partition_keys(settings)
    assert publisher.keys == [k.inputs[0] for k in keys]
    assert reader.keys == [k.output for k in keys]


# ---- failures a strategy or a feeder meets ----------------------------------------------------


async def _group_reader_over(
    backend: Backend, events: int, *, auto_ack: bool
) -> tuple[str, PredictionReader]:
    """A group reader (consumer c1, from the start) over a stream of `events` events S0..."""
    key = backend.key("predictions")
    reader = PredictionReader(backend.redis, stream=key, group=backend.key("strategy"),
                              consumer="c1", start="0", auto_ack=auto_ack)
    await write_events(backend.redis, key, [make_event(f"S{i}", i) for i in range(events)])
    return key, reader


@pytest.mark.parametrize("how", ["error", "silent_retry", "cancelled"])
@pytest.mark.parametrize("auto_ack", [True, False])
async def test_a_group_read_whose_reply_is_lost_hands_out_those_events_next(
    backend: Backend, auto_ack: bool, how: str
) -> None:
    # Redis delivered entries to this consumer and the reply never came: the connection
    # dropped (an error), the client sent the read again by itself (`redis.Redis()` retries:
    # no error at all), or the caller cancelled the read. The entries are in this consumer's
    # pending list; the reader hands them out (at once after an error, within a second
    # otherwise), every event exactly once.
    from redis.exceptions import ConnectionError as RedisConnectionError

    key, reader = await _group_reader_over(backend, 30, auto_ack=auto_ack)
    got = [e.symbol for e in await reader.read(count=10, block_ms=20)]
    real = backend.redis.xreadgroup
    lost = {"armed": True}

    async def loses_one_reply(*args: Any, **kwargs: Any) -> Any:
        reply = await real(*args, **kwargs)
        if lost["armed"] and ">" in str(args[2]):
            lost["armed"] = False
            if how == "error":
                raise RedisConnectionError("connection dropped")
            if how == "silent_retry":
                return await real(*args, **kwargs)  # the first reply is gone
            await asyncio.sleep(10)  # the caller gives up first
        return reply

    backend.redis.xreadgroup = loses_one_reply
    try:
        if how == "error":
            with pytest.raises(RedisConnectionError):
                await reader.read(count=10, block_ms=20)
        elif how == "cancelled":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(count=10, block_ms=20), 0.2)
        deadline = time.monotonic() + 5
        while len(got) < 30 and time.monotonic() < deadline:
            got += [e.symbol for e in await reader.read(count=10, block_ms=50)]
            await reader.ack()
    finally:
        backend.redis.xreadgroup = real
    assert sorted(got) == sorted(f"S{i}" for i in range(30))  # every event
    assert len(got) == 30  # once
    pending = await backend.redis.xpending(key, backend.key("strategy"))
    assert pending["pending"] == 0


async def test_a_position_the_stream_was_trimmed_past_is_said(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    key = backend.key("predictions")
    await write_events(backend.redis, key, [make_event("A", 1)])
    reader = PredictionReader(backend.redis, stream=key, start="0")
    assert len(await reader.read(block_ms=20)) == 1
    saved = dict(reader.last_ids)
    await write_events(backend.redis, key, [make_event("B", t) for t in range(2, 12)])
    await backend.redis.xtrim(key, maxlen=4, approximate=False)  # the daemon's MAXLEN
    resumed = PredictionReader(backend.redis, stream=key, last_ids=saved)
    assert len(await resumed.read(block_ms=20)) == 4
    assert resumed.trimmed_past == 1
    untouched = PredictionReader(backend.redis, stream=key, start="0")
    await untouched.read(block_ms=20)
    assert untouched.trimmed_past == 0
    # A reader that falls behind while it reads: the trim is seen by the very next read.
    behind = PredictionReader(backend.redis, stream=key, start="0")
    assert len(await behind.read(count=2, block_ms=20)) == 2
    await write_events(backend.redis, key, [make_event("C", t) for t in range(20, 30)])
    await backend.redis.xtrim(key, maxlen=3, approximate=False)
    assert behind.trimmed_past == 0
    assert [e.symbol for e in await behind.read(count=2, block_ms=20)] == ["C", "C"]
    assert behind.trimmed_past == 1


async def test_publish_many_says_what_was_written_when_redis_fails_midway(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from daemon import client as client_module

    monkeypatch.setattr(client_module, "PIPELINE_CHUNK", 10)
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"))
    real = backend.redis.pipeline
    calls = {"n": 0}

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        pipe = real(*args, **kwargs)
        if calls["n"] == 3:
            async def dropped() -> Any:
                raise RedisConnectionError("connection dropped")
            pipe.execute = dropped
        return pipe

    backend.redis.pipeline = pipeline
    bars = [make_bar("A", m) for m in range(35)]
    try:
        with pytest.raises(RedisConnectionError) as info:
            await publisher.publish_many(bars)
    finally:
        backend.redis.pipeline = real
    sent = info.value.sent  # type: ignore[attr-defined]
    assert len(sent) == 20
    stored = [entry_id.decode() for entry_id, _ in await backend.redis.xrange(backend.key("bars"))]
    assert stored == sent
    assert len(await publisher.publish_many(bars[len(sent):])) == 15  # resend the rest


async def test_a_symbol_that_is_not_text_is_refused_before_sending() -> None:
    publisher = BarPublisher(fakeredis.FakeAsyncRedis())
    with pytest.raises(ValueError, match="^bad_value:symbol$"):
        await publisher.publish(make_bar("\udcff", 1))


async def test_a_cluster_reader_returns_soon_when_one_partition_has_data() -> None:
    # One blocking read per partition: the call must not wait for every one of them.
    r = fakeredis.FakeAsyncRedis()
    reader = PredictionReader(r, partitions=3, cluster=True, start="$")
    await reader.position()

    async def publish_later() -> None:
        await asyncio.sleep(0.2)
        await r.xadd("predictions:{1}", encode_prediction(make_event("A", 1)))

    started = time.monotonic()
    task = asyncio.create_task(publish_later())
    events = await reader.read(block_ms=3000)
    await task
    assert [e.symbol for e in events] == ["A"]
    assert time.monotonic() - started < 1.0
    await r.aclose()


async def test_acknowledging_while_a_read_looks_for_lost_entries_hands_none_out_twice(
    backend: Backend,
) -> None:
    from daemon import client as client_module

    key, reader = await _group_reader_over(backend, 10, auto_ack=False)
    got = [e.symbol for e in await reader.read(count=10, block_ms=20)]
    real = backend.redis.xack
    acking = asyncio.Event()

    async def slow_ack(*args: Any) -> Any:
        acking.set()
        await asyncio.sleep(0.3)
        return await real(*args)

    backend.redis.xack = slow_ack
    reader._lost_checked_at = -client_module.LOST_CHECK_EVERY_S  # the check is due
    try:
        acked = asyncio.create_task(reader.ack())
        await acking.wait()
        got += [e.symbol for e in await reader.read(count=10, block_ms=20)]
        assert await acked == 10
    finally:
        backend.redis.xack = real
    assert got == [f"S{i}" for i in range(10)]


async def test_an_acknowledgement_that_failed_is_made_by_the_next_ack(backend: Backend) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    key = backend.key("predictions")
    group = backend.key("strategy")
    reader = PredictionReader(backend.redis, stream=key, group=group, consumer="c1",
                              start="0", auto_ack=False, partitions=2)
    for p in (0, 1):
        await write_events(backend.redis, f"{key}:{{{p}}}", [make_event(f"P{p}", p)])
    got = [e.symbol for e in await reader.read(block_ms=20)]
    real = backend.redis.xack

    async def fails(*args: Any) -> Any:
        raise RedisConnectionError("connection dropped")

    backend.redis.xack = fails
    with pytest.raises(RedisConnectionError):
        await reader.ack()
    backend.redis.xack = real
    got += [e.symbol for e in await reader.read(block_ms=20)]  # nothing lost, nothing again
    assert sorted(got) == ["P0", "P1"]
    assert await reader.ack() == 2


async def test_rows_whose_auto_ack_failed_are_handed_out_by_the_next_read(
    backend: Backend,
) -> None:
    key, reader = await _group_reader_over(backend, 5, auto_ack=True)
    real = backend.redis.xack

    async def applied_then_cancelled(*args: Any) -> Any:
        await real(*args)
        raise asyncio.CancelledError  # the reply never came back to this caller

    backend.redis.xack = applied_then_cancelled
    with pytest.raises(asyncio.CancelledError):
        await reader.read(block_ms=20)
    backend.redis.xack = real
    assert [e.symbol for e in await reader.read(block_ms=20)] == [f"S{i}" for i in range(5)]
    assert await reader.read(block_ms=20) == []


async def test_a_stream_recreated_with_older_ids_is_read_from_its_start() -> None:
    r = fakeredis.FakeAsyncRedis()
    await r.xadd("predictions", encode_prediction(make_event("A", 1)), id="5000-0")
    reader = PredictionReader(r, start="0")
    assert len(await reader.read(block_ms=20)) == 1
    await r.delete("predictions")  # Redis lost its data, its clock is behind
    await r.xadd("predictions", encode_prediction(make_event("B", 2)), id="100-0")
    assert await reader.read(block_ms=20) == []  # noticed: the position goes back
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["B"]
    await r.aclose()


# ---- what an audit found --------------------------------------------------------------------


def _wire_map(**changes: Any) -> dict[str, Any]:
    """A valid prediction map as CONTRACT section 4 writes it, with `changes` applied (a
    `target` key changes the one target's result)."""
    result: dict[str, Any] = {"preds": {"F": 0.5}, "selected": "F", "pred": 0.5,
                              "warming": {"L": 2}, "failed": {"M": "non_finite_output"}}
    result.update(changes.pop("target", {}))
    m: dict[str, Any] = {"v": 1, "symbol": "OK", "ts": 1_700_000_000_000, "src": "bars/1-0",
                         "run": "r", "lat_us": 5, "targets": {"t": result}}
    m.update(changes)
    return m


def _packed(m: Any) -> dict[str, bytes]:
    return {"symbol": b"X", "data": msgpack.packb(m, use_bin_type=True)}


NOT_PREDICTIONS = {
    "v True": _wire_map(v=True),
    "v 1.0": _wire_map(v=1.0),
    "ts text": _wire_map(ts="1700000000000"),
    "ts fraction": _wire_map(ts=1.5),
    "ts whole float": _wire_map(ts=1_700_000_000_000.0),
    "ts list": _wire_map(ts=[1]),
    "ts null": _wire_map(ts=None),
    "ts bool": _wire_map(ts=True),
    "symbol int": _wire_map(symbol=5),
    "symbol null": _wire_map(symbol=None),
    "src int": _wire_map(src=1),
    "lat_us null": _wire_map(lat_us=None),
    "lat_us timestamp": _wire_map(lat_us=msgpack.Timestamp(1, 0)),
    "run ext": _wire_map(run=msgpack.ExtType(5, b"xx")),
    "targets list": _wire_map(targets=[1]),
    "target text": _wire_map(targets={"t": "x"}),
    "pred text": _wire_map(target={"pred": "0.5"}),
    "pred nan": _wire_map(target={"pred": float("nan")}),
    "pred inf": _wire_map(target={"pred": float("inf")}),
    "pred bool": _wire_map(target={"pred": True}),
    "preds nan": _wire_map(target={"preds": {"F": float("nan")}}),
    "preds inf": _wire_map(target={"preds": {"F": float("-inf")}}),
    "preds text": _wire_map(target={"preds": {"F": "abc"}}),
    "preds list": _wire_map(target={"preds": [["F", 1.0]]}),
    "preds null": _wire_map(target={"preds": None}),
    "selected int": _wire_map(target={"selected": 3}),
    "warming null": _wire_map(target={"warming": {"L": None}}),
    "warming text": _wire_map(target={"warming": {"L": "x"}}),
    "warming float": _wire_map(target={"warming": {"L": 2.0}}),
    "warming negative": _wire_map(target={"warming": {"L": -1}}),
    "failed int": _wire_map(target={"failed": {"L": 3}}),
}


@pytest.mark.parametrize("group", [False, True])
async def test_an_entry_whose_values_are_not_of_their_wire_type_is_skipped(
    backend: Backend, group: bool
) -> None:
    # Each of these once came out as an event (and a strategy's arithmetic on it failed).
    key = backend.key("predictions")
    for m in NOT_PREDICTIONS.values():
        await backend.redis.xadd(key, _packed(m))
    # Valid: a whole-number value written as a msgpack int (a JavaScript writer) is a float.
    await backend.redis.xadd(key, _packed(_wire_map(target={"preds": {"F": 2}, "pred": 2})))
    kind: dict[str, Any] = {"group": backend.key("g"), "consumer": "c"} if group else {}
    reader = PredictionReader(backend.redis, stream=key, start="0", **kind)
    got = await reader.read(count=1000, block_ms=20)
    assert reader.skipped == len(NOT_PREDICTIONS)
    assert len(got) == 1
    result = got[0].targets["t"]
    assert (result.preds, result.pred) == ({"F": 2.0}, 2.0)
    assert type(result.preds["F"]) is float and type(result.pred) is float
    assert (got[0].symbol, got[0].ts, got[0].lat_us) == ("OK", 1_700_000_000_000, 5)


async def test_a_plain_reader_repeats_nothing_when_redis_restores_an_older_snapshot(
    backend: Backend,
) -> None:
    # Redis restarts from a snapshot taken before the last 20 events: their entries are gone,
    # the stream's newest id is older than the reader's position. What the reader had handed
    # out is not handed out again; events after the snapshot are.
    key = backend.key("predictions")
    events = [make_event(f"S{i % 3}", 1000 + i) for i in range(60)]
    ids = await write_events(backend.redis, key, events)
    reader = PredictionReader(backend.redis, stream=key, start="0")
    assert len(await reader.read(count=100, block_ms=20)) == 60
    snapshot = list(zip(ids[:40], events[:40], strict=True))
    await backend.redis.delete(key)
    for entry_id, event in snapshot:  # restored with the ids they had
        await backend.redis.xadd(key, encode_prediction(event), id=entry_id)
    assert await reader.read(count=100, block_ms=20) == []  # went back: read from the start
    got: list[PredictionEvent] = []
    for _ in range(8):  # 7 a read: a read of repeats only returns nothing
        got.extend(await reader.read(count=7, block_ms=20))
    assert got == []
    assert reader.repeated == 40
    assert reader.last_ids[key] == ids[39]
    # The daemon goes on: a new bar of a symbol, and a bar it already had predicted (after
    # the snapshot its input was restored too, so it predicts it again) which is a repeat.
    newer = make_event("S0", 2000)
    again = events[45]
    await write_events(backend.redis, key, [again, newer])
    assert await reader.read(count=100, block_ms=20) == [newer]
    assert reader.repeated == 41


async def test_a_plain_reader_hands_out_new_bars_of_a_stream_recreated_behind_it() -> None:
    r = fakeredis.FakeAsyncRedis()
    await r.xadd("predictions", encode_prediction(make_event("A", 5)), id="5000-0")
    reader = PredictionReader(r, start="0")
    assert len(await reader.read(block_ms=20)) == 1
    await r.delete("predictions")  # Redis lost its data and its clock is behind
    newer = [make_event("A", 6), make_event("A", 7)]
    for i, event in enumerate(newer):
        await r.xadd("predictions", encode_prediction(event), id=f"{100 + i}-0")
    assert await reader.read(block_ms=20) == []  # the position goes back
    assert await reader.read(block_ms=20) == newer
    assert reader.repeated == 0
    await r.aclose()


async def test_a_group_reader_loses_nothing_published_after_redis_came_back_empty(
    backend: Backend,
) -> None:
    key = backend.key("predictions")
    group = backend.key("strategy")
    reader = PredictionReader(backend.redis, stream=key, group=group, consumer="c1")  # "$"
    assert await reader.read(block_ms=20) == []  # the group is made, at "$"
    await write_events(backend.redis, key, [make_event("A", 1)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["A"]
    await backend.redis.delete(key)  # Redis restarted without its data: stream and group gone
    # The daemon publishes before the strategy's next read.
    await write_events(backend.redis, key, [make_event("B", 2), make_event("C", 3)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["B", "C"]
    await write_events(backend.redis, key, [make_event("D", 4)])
    assert [e.symbol for e in await reader.read(block_ms=20)] == ["D"]


async def test_a_group_reader_loses_nothing_on_a_quiet_partition_after_redis_came_back_empty(
    backend: Backend,
) -> None:
    # A partition the reader had read nothing from was created again at "$": what the daemon
    # published there after Redis came back, before the reader's next read, was skipped.
    keys = [backend.key("predictions:{0}"), backend.key("predictions:{1}")]
    group = backend.key("strategy")
    readers = [PredictionReader(backend.redis, stream=key, group=group, consumer="c1")
               for key in keys]
    for reader in readers:
        assert await reader.read(block_ms=20) == []  # groups made at "$"
    await write_events(backend.redis, keys[0], [make_event("A", 1)])
    assert [e.symbol for e in await readers[0].read(block_ms=20)] == ["A"]
    await backend.redis.delete(*keys)  # Redis restarted without its data
    await write_events(backend.redis, keys[0], [make_event("A", 2)])
    await write_events(backend.redis, keys[1], [make_event("B", 2)])  # the quiet one
    assert [e.symbol for e in await readers[0].read(block_ms=20)] == ["A"]
    assert [e.symbol for e in await readers[1].read(block_ms=20)] == ["B"]


async def test_a_read_of_the_largest_count_still_works(backend: Backend) -> None:
    key = backend.key("predictions")
    await write_events(backend.redis, key, [make_event("A", t) for t in range(3)])
    reader = PredictionReader(backend.redis, stream=key, start="0")
    assert [e.ts for e in await reader.read(count=2**63 - 1, block_ms=20)] == [0, 1, 2]


@pytest.mark.parametrize("how", ["wait_for", "cancel"])
async def test_publish_many_cancelled_midway_says_what_was_written(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from daemon import client as client_module

    monkeypatch.setattr(client_module, "PIPELINE_CHUNK", 10)
    publisher = BarPublisher(backend.redis, stream=backend.key("bars"))
    real = backend.redis.pipeline
    calls = {"n": 0}
    stuck = asyncio.Event()

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        pipe = real(*args, **kwargs)
        if calls["n"] == 3:  # the third round trip never answers
            async def hangs() -> Any:
                stuck.set()
                await asyncio.sleep(30)
            pipe.execute = hangs
        return pipe

    backend.redis.pipeline = pipeline
    bars = [make_bar("A", m) for m in range(35)]
    try:
        if how == "wait_for":
            with pytest.raises(TimeoutError) as info:
                await asyncio.wait_for(publisher.publish_many(bars), 0.5)
            carrier: BaseException | None = info.value.__cause__
        else:
            task = asyncio.create_task(publisher.publish_many(bars))
            await stuck.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as cancelled:
                await task
            carrier = cancelled.value
    finally:
        backend.redis.pipeline = real
    assert carrier is not None
    sent = carrier.sent  # type: ignore[attr-defined]
    stored = [entry_id.decode() for entry_id, _ in await backend.redis.xrange(backend.key("bars"))]
    assert len(sent) == 20 and stored == sent
    assert len(await publisher.publish_many(bars[len(sent):])) == 15


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"open": 10**400}, "bad_value:open"),
        ({"high": 10**400}, "bad_value:high"),
        ({"low": 10**400}, "bad_value:low"),
        ({"close": 10**400}, "bad_value:close"),
        ({"volume": 10**400}, "bad_value:volume"),
        ({"volume": -(10**400)}, "bad_value:volume"),
        ({"close": -(10**400)}, "bad_value:close"),
        ({"ts": -5, "open": 10**400}, "bad_value:ts"),  # the first bad field, in field order
        ({"symbol": "\ud800"}, "bad_value:symbol"),
        ({"symbol": "A\udcff"}, "bad_value:symbol"),
        ({"close": True}, "bad_value:close"),
        ({"close": float("nan")}, "bad_value:close"),
        ({"symbol": "A" * 65}, "bad_value:symbol"),
    ],
)
async def test_every_bar_the_daemon_would_refuse_is_a_value_error_naming_the_field(
    changes: dict[str, Any], reason: str
) -> None:
    from daemon.client import encode_bar

    bar = {**make_bar("AAPL", 1), **changes}
    with pytest.raises(ValueError, match=f"^{reason}$"):
        encode_bar(bar)
    with pytest.raises(ValueError, match=f"^{reason}$"):
        encode_bar(Bar(**bar))
    publisher = BarPublisher(fakeredis.FakeAsyncRedis())
    with pytest.raises(ValueError, match=f"^{reason}$"):
        await publisher.publish_many([make_bar("OK", 1), bar])
    assert await publisher.redis.xlen("bars") == 0


def test_encode_bar_writes_what_the_daemon_reads() -> None:
    # Plain values (the quick path) and numpy ones (the full path): the daemon decodes each
    # to the bar given, prices as float64.
    import numpy as np

    from daemon.client import encode_bar

    bars: list[Any] = [
        make_bar("AAPL", 1, 101.25),
        {**make_bar("INT", 2), "open": 3, "high": 4, "low": 2, "close": 3, "volume": 0},
        {**make_bar("FLT", 3), "ts": 1_700_000_180_000.0, "extra": "ignored"},
        {**make_bar("NP", 4), "ts": np.int64(1_700_000_240_000), "close": np.float32(1.5)},
        Bar("BAR", 1_700_000_300_000, 1.0, 2.0, 0.5, 1.5, 7.0),
        {**make_bar("ÆØÅ", 5), "volume": 2**70},
    ]
    for bar in bars:
        values = {k: getattr(bar, k) for k in ("symbol", "ts", "open", "high", "low", "close",
                                               "volume")} if isinstance(bar, Bar) else bar
        decoded = decode_bar(encode_bar(bar), "bars", "1-0")
        assert isinstance(decoded, Bar), decoded
        assert decoded.symbol == values["symbol"] and decoded.ts == int(values["ts"])
        for name in ("open", "high", "low", "close", "volume"):
            got = getattr(decoded, name)
            assert type(got) is float and got == float(values[name])


async def test_an_exact_trim_of_entries_read_already_is_no_loss(backend: Backend) -> None:
    # MAXLEN ~ trims whole nodes: a lagging reader's position can be the last entry of one.
    key = backend.key("predictions")
    ids = await write_events(backend.redis, key, [make_event("S", t) for t in range(50)])
    reader = PredictionReader(backend.redis, stream=key, start="0")
    got = [e.ts for e in await reader.read(count=20, block_ms=20)]
    await write_events(backend.redis, key, [make_event("S", t) for t in range(50, 100)])
    await backend.redis.xtrim(key, minid=ids[20], approximate=False)  # up to the position
    while batch := await reader.read(count=30, block_ms=20):
        got.extend(e.ts for e in batch)
    assert got == list(range(100))
    assert reader.trimmed_past == 0
    # A trim that takes one entry more is a loss, said.
    behind = PredictionReader(backend.redis, stream=key, start="0")
    first = await behind.read(count=10, block_ms=20)
    await backend.redis.xtrim(key, minid=ids[31], approximate=False)
    rest = await behind.read(count=100, block_ms=20)
    assert [e.ts for e in first] == list(range(20, 30))
    assert [e.ts for e in rest] == list(range(31, 100))
    assert behind.trimmed_past == 1


def test_the_client_module_loads_no_model_code() -> None:
    # A strategy or a feeder imports daemon.client (and `livepred tail` daemon.tail): neither
    # should pull in the model side (handlers, its frameworks), seconds of start-up.
    import subprocess
    import sys

    code = ("import sys, daemon.client, daemon.tail;"
            " print(sorted(m for m in sys.modules if m.split('.')[0] == 'handlers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
