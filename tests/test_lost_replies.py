"""A read whose reply is lost: Redis ran it (the entries are delivered to us, pending) and the
connection died before the reply came back. The daemon must take those entries next, before
anything newer, so every bar gets one output computed on the full history of its symbol, and
keep its state (an outage, not a crash). Both ways of reading are checked: the WATCHed
MULTI/EXEC (where redis-py reports the dead connection as a WatchError) and the script."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import fakeredis
import msgpack
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError
from structlog.testing import capture_logs

from daemon import entries, streams
from daemon.service import Service
from daemon.streams import StreamIO
from daemon.wire import encode_bar
from daemon.wire_events import decode_prediction
from tests.test_service_fake import expected_lgb, lgb_run, run_until, settings_for, walk_bars

__all__ = ["lgb_run"]  # the module fixture, shared


def _lose_connection(message: str) -> None:
    """Raise what redis-py raises when a watched connection dies: a WatchError while the
    connection error is being handled."""
    try:
        raise RedisConnectionError("Connection closed by server.")
    except RedisConnectionError:
        raise WatchError(message) from None


class _LosingPipeline:
    """A raw client whose transaction runs for real, then loses its reply, the `nth` time a
    read delivers entries."""

    def __init__(self, raw: Any, lost: dict[str, int]) -> None:
        self.raw, self.lost = raw, lost

    def __getattr__(self, name: str) -> Any:  # everything else: the raw client's
        return getattr(self.raw, name)

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.raw.pipeline(transaction=transaction)
        execute, lost = pipe.execute, self.lost

        async def execute_then_lose() -> Any:
            reply = await execute()
            if reply and reply[0]:
                lost["reads"] += 1
                if lost["reads"] == lost["nth"]:
                    lost["dropped"] = len(entries.read_batch(reply[0]))
                    _lose_connection("A ConnectionError occurred while watching one or more keys")
            return reply

        pipe.execute = execute_then_lose
        return pipe


@pytest.mark.parametrize("read_path", ["watched", "script"])
async def test_entries_of_a_lost_read_reply_are_taken_next_and_state_is_kept(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch, read_path: str
) -> None:
    lost = {"reads": 0, "nth": 3, "dropped": 0}
    if read_path == "watched":
        real_raw = StreamIO._raw_client

        def losing_raw(self: StreamIO) -> Any:
            return _LosingPipeline(real_raw(self), lost)

        monkeypatch.setattr(StreamIO, "_raw_client", losing_raw)
    else:
        monkeypatch.setattr(streams, "WATCH_TRIES", 0)
        real_fenced = StreamIO._read_fenced

        async def losing_fenced(self: StreamIO, token: str, count: int) -> Any:
            read = await real_fenced(self, token, count)
            if read is not None and len(read[0]):
                lost["reads"] += 1
                if lost["reads"] == lost["nth"]:
                    lost["dropped"] = len(read[0])
                    raise RedisConnectionError("Connection closed by server.")
            return read

        monkeypatch.setattr(StreamIO, "_read_fenced", losing_fenced)

    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars([f"S{i}" for i in range(5)], 12, seed=9)
    ids = [(await redis.xadd("bars", encode_bar(b))).decode() for b in bars]
    settings = settings_for(lgb_run, LIVEPRED_STREAMS__BATCH="8")
    service = Service(settings, redis=redis)
    await service.start()

    async def all_out(r: Any) -> bool:
        return await r.xlen("predictions") >= len(bars) and (
            await r.xpending("bars", "livepred")
        )["pending"] == 0

    with capture_logs() as logs:
        await run_until(service, redis, all_out)
    assert lost["dropped"] == 8  # a full read's reply was lost, mid-stream
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    # Every bar once, in input order, each on its symbol's full history (a bar computed
    # before the lost ones of its symbol would differ from the framework's value).
    assert [o.src for o in outputs] == [f"bars/{i}" for i in ids]
    expected = expected_lgb(lgb_run, bars)
    for o in outputs:
        want = expected[(o.symbol, o.ts)]
        assert o.targets["fwd"].preds["LightGBM"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert await redis.xlen("bars:dead") == 0
    events = [e["event"] for e in logs]
    assert any("read whose reply was lost" in e for e in events), events
    assert "partition failed, restarting it" not in events  # an outage, not a crash:
    assert events.count("state rebuilt") == 1, events  # state kept, no second rebuild
    await redis.aclose()


async def test_a_watch_error_from_a_dead_connection_is_an_outage_not_a_changed_key() -> None:
    # redis-py's two WatchErrors: EXEC refused because the watched lease key changed
    # (nothing was read, read again), and a connection that died while watching (maybe read).
    try:
        _lose_connection("A ConnectionError occurred while watching one or more keys")
    except WatchError as exc:
        assert streams._connection_died(exc)
    assert not streams._connection_died(WatchError("Watched variable changed."))


async def test_redis_losing_its_data_keeps_the_state(lgb_run: Path) -> None:
    # A Redis restart without persistence (or a failover to a replica that had not seen the
    # keys) while the daemon holds the lease: the lease key, the streams and the group are
    # gone. The daemon takes the lease again (no one can have taken it over: it had not
    # expired), recreates the group, and predicts the next bars on the state it kept, as an
    # uninterrupted run would (CONTRACT §5: "keeps its state").
    redis, service, before, after = await _service_with_backlog(lgb_run, 40, 100, seed=12)
    bars = before + after

    async def has_group(r: Any) -> bool:
        return bool(await r.exists("bars")) and any(
            g["name"] == b"livepred" for g in await r.xinfo_groups("bars")
        )

    with capture_logs() as logs:
        task = asyncio.create_task(service.run())
        try:
            await _until(lambda: _outputs_at_least(redis, len(before)), task)
            await redis.flushall()
            await _until(lambda: has_group(redis), task)
            for bar in after:
                await redis.xadd("bars", encode_bar(bar))
            await _until(lambda: _outputs_at_least(redis, len(after)), task)
        finally:
            service.request_stop()
            assert await asyncio.wait_for(task, 15) == 0
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert [(o.symbol, o.ts) for o in outputs] == [(b["symbol"], b["ts"]) for b in after]
    expected = expected_lgb(lgb_run, bars)  # on the whole history, before the loss included
    for o in outputs:
        want = expected[(o.symbol, o.ts)]
        assert o.targets["fwd"].preds["LightGBM"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    events = [e["event"] for e in logs]
    assert any(e.startswith("lease key gone while held") for e in events), events
    assert "lease lost: stopped processing this partition" not in events
    assert events.count("state rebuilt") == 1, events
    await redis.aclose()


async def _service_with_backlog(
    lgb_run: Path, per_symbol: int, backlog: int, seed: int, **env: str
) -> tuple[Any, Service, list[dict], list[dict]]:
    """fakeredis with the group and the first `backlog` bars of 4 symbols in the stream (the
    rest to send later), and a started service on it."""
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars([f"S{i}" for i in range(4)], per_symbol, seed=seed)
    for bar in bars[:backlog]:
        await redis.xadd("bars", encode_bar(bar))
    service = Service(settings_for(lgb_run, **env), redis=redis)
    await service.start()
    return redis, service, bars[:backlog], bars[backlog:]


async def _outputs_at_least(redis: Any, n: int) -> bool:
    return await redis.xlen("predictions") >= n


async def _until(condition: Any, task: asyncio.Task[int]) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while not await condition():
        if task.done():
            task.result()
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_redis_losing_its_data_under_a_batch_in_hand_publishes_it_and_keeps_state(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis restarts empty between a batch's compute and its write: the lease, the group and
    # the batch's entries are gone (the backlog behind it too). The batch's bars are in the
    # state; their predictions are still published (nothing is left to ack), and the state
    # is kept for the bars after them: every prediction equals the framework's on the bars
    # the daemon was given, in order.
    real_commit = StreamIO.commit
    commits: list[list[tuple[str, int]]] = []
    flushed = []

    async def commit_after_data_loss(self: StreamIO, token: str, commit: Any, **kw: Any) -> int:
        if len(commits) == 1 and not flushed:
            flushed.append(True)
            await self.redis.flushall()
        result = await real_commit(self, token, commit, **kw)
        if result == 1:
            commits.append([_key(data) for _, data in commit.outputs])
        return result

    monkeypatch.setattr(StreamIO, "commit", commit_after_data_loss)
    redis, service, before, after = await _service_with_backlog(
        lgb_run, 30, 80, seed=14, LIVEPRED_STREAMS__BATCH="8"
    )
    bars = before + after

    async def idle_after_the_loss() -> bool:
        return len(commits) >= 2 and bool(await redis.exists("bars"))

    with capture_logs() as logs:
        task = asyncio.create_task(service.run())
        try:
            await _until(idle_after_the_loss, task)
            in_hand = commits[1]
            for bar in after:
                await redis.xadd("bars", encode_bar(bar))
            await _until(lambda: _all_published(redis, after), task)
        finally:
            service.request_stop()
            assert await asyncio.wait_for(task, 15) == 0
    published = [(o.symbol, o.ts) for o in
                 (decode_prediction(f) for _, f in await redis.xrange("predictions"))]
    # The batch in hand, any batch read before the loss, then every bar sent after it.
    assert published == [k for batch in commits[1:] for k in batch]
    assert published[: len(in_hand)] == in_hand
    assert published[-len(after) :] == [(b["symbol"], b["ts"]) for b in after]
    by_key = {(b["symbol"], b["ts"]): b for b in bars}
    given = [by_key[k] for batch in commits for k in batch]  # what the daemon was given
    expected = expected_lgb(lgb_run, given)
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    for o in outputs:
        want = expected[(o.symbol, o.ts)]
        assert o.targets["fwd"].preds["LightGBM"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    events = [e["event"] for e in logs]
    assert any(e.startswith("consumer group gone under a batch in hand") for e in events)
    assert "partition failed, restarting it" not in events
    assert events.count("state rebuilt") == 1, events
    await redis.aclose()


async def _all_published(redis: Any, bars: list[dict]) -> bool:
    seen = {(o.symbol, o.ts) for o in
            (decode_prediction(f) for _, f in await redis.xrange("predictions"))}
    return all((b["symbol"], b["ts"]) in seen for b in bars)


def _key(data: bytes) -> tuple[str, int]:
    doc = msgpack.unpackb(data)
    return doc["symbol"], doc["ts"]




async def test_a_pending_batch_retried_after_a_lost_write_reply_is_written_once(
    lgb_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our own pending entries (a restart) are taken first; if that batch's write reply is
    # lost, the retry finds it committed (the probe) and writes nothing twice, also in a
    # process where the group was once recreated (the probe is skipped only for batches
    # read before a recreation).
    real_commit = StreamIO.commit
    lost = {"left": 1}

    async def commit_losing_a_reply(self: StreamIO, token: str, commit: Any, **kw: Any) -> int:
        result = await real_commit(self, token, commit, **kw)
        if lost["left"] and commit.outputs:
            lost["left"] -= 1
            raise RedisConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(StreamIO, "commit", commit_losing_a_reply)
    redis = fakeredis.FakeAsyncRedis()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = walk_bars(["AAA", "BBB"], 10, seed=5)
    for bar in bars:
        await redis.xadd("bars", encode_bar(bar))
    await redis.xreadgroup("livepred", "test-consumer", {"bars": ">"}, count=len(bars))
    service = Service(settings_for(lgb_run), redis=redis)
    await service.start()
    service.workers[0].io.group_epoch = 1  # as after an earlier recreation

    async def done(r: Any) -> bool:
        return (await r.xpending("bars", "livepred"))["pending"] == 0 and await r.xlen(
            "predictions"
        ) >= len(bars)

    await run_until(service, redis, done)
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    assert len(outputs) == len(bars) and lost["left"] == 0
    assert len({o.src for o in outputs}) == len(bars)
    await redis.aclose()
