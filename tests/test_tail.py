"""`livepred tail`: the newest predictions of every partition, merged in entry order and
decoded as the wire map; then the new ones; dead letters with their msgpack data decoded."""

from __future__ import annotations

import io
import json

import fakeredis
import msgpack
import pytest

from daemon.settings import load_settings
from daemon.tail import tail
from daemon.wire_events import PredictionEvent, TargetResult, encode_prediction


def _event(symbol: str, ts: int, value: float) -> PredictionEvent:
    result = TargetResult(preds={"LightGBM": value}, selected="LightGBM", pred=value,
                          warming={"LSTM": 3}, failed={"MLP": "non_finite_output"})
    return PredictionEvent(symbol, ts, f"bars/{ts}-0", "run-1", 250, {"fwd": result})


def _settings(**env: str):
    return load_settings(None, {"LIVEPRED_STREAMS__PARTITIONS": "3", **env})


async def test_the_newest_of_every_partition_merged_in_entry_order() -> None:
    r = fakeredis.FakeAsyncRedis()
    events = [_event(f"S{i}", 1000 + i, i / 10) for i in range(8)]
    for i, event in enumerate(events):  # entry ids in this order, spread over the partitions
        await r.xadd(f"predictions:{{{i % 3}}}", encode_prediction(event), id=f"{i + 1}-0")
    await r.xadd("predictions:{1}", {"data": b"\x01junk"}, id="9-0")
    out = io.StringIO()
    assert await tail(r, _settings(), out, count=4) == 4
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["id"] for line in lines] == ["6-0", "7-0", "8-0", "9-0"]
    for line, event in zip(lines[:3], events[5:], strict=True):
        stream = line.pop("stream")
        assert stream == f"predictions:{{{(int(line.pop('id')[0]) - 1) % 3}}}"
        assert line == event.to_dict()
    assert lines[3]["error"].startswith("not a prediction")
    await r.aclose()


@pytest.mark.parametrize("count", [0, 2])
async def test_follow_shows_what_is_published_after_it_started(count: int) -> None:
    # With -n 0 from the end as it was; with -n 2 the newest first. Partition 1, empty at the
    # start, is followed from its beginning.
    import asyncio

    r = fakeredis.FakeAsyncRedis()
    await r.xadd("predictions:{0}", encode_prediction(_event("OLD", 1, 0.1)), id="1-0")
    out = io.StringIO()
    want = (["OLD"] if count else []) + ["NEW", "NEXT"]
    following = asyncio.create_task(tail(
        r, _settings(), out, count=count, follow=True,
        stop=lambda: len(out.getvalue().splitlines()) >= len(want),
    ))
    await asyncio.sleep(0.2)
    await r.xadd("predictions:{1}", encode_prediction(_event("NEW", 2, 0.2)), id="2-0")
    await r.xadd("predictions:{0}", encode_prediction(_event("NEXT", 3, 0.3)), id="3-0")
    assert await asyncio.wait_for(following, 10) == len(want)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["symbol"] for line in lines] == want
    assert lines[-2]["stream"] == "predictions:{1}"
    await r.aclose()


async def test_following_keeps_entry_order_and_waits_out_an_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from redis.exceptions import ConnectionError as RedisConnectionError

    from daemon import tail as tail_module

    monkeypatch.setattr(tail_module, "FOLLOW_COUNT", 3)  # partition 0 needs two reads
    monkeypatch.setattr(tail_module, "OUTAGE_RETRY_S", 0.01)
    r = fakeredis.FakeAsyncRedis()
    real = r.xread
    calls = {"n": 0}

    async def restarting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # Redis restarting while the entries below come in
            await asyncio.sleep(0.3)
            raise RedisConnectionError("Connection closed by server")
        return await real(*args, **kwargs)

    r.xread = restarting
    out, notes = io.StringIO(), io.StringIO()
    following = asyncio.create_task(tail(
        r, _settings(), out, count=0, follow=True, notes=notes,
        stop=lambda: len(out.getvalue().splitlines()) >= 8,
    ))
    await asyncio.sleep(0.05)
    for i, p in enumerate([0, 0, 1, 0, 0, 0, 1, 0]):
        await r.xadd(f"predictions:{{{p}}}", encode_prediction(_event(f"S{i}", i + 1, 0.1)),
                     id=f"{i + 10}-0")
    assert await asyncio.wait_for(following, 10) == 8
    ids = [json.loads(line)["id"] for line in out.getvalue().splitlines()]
    assert ids == [f"{i + 10}-0" for i in range(8)]
    assert "Connection closed by server; retrying" in notes.getvalue()
    await r.aclose()


async def test_any_dead_letter_prints_as_strict_json() -> None:
    r = fakeredis.FakeAsyncRedis()
    data = msgpack.packb({b"symbol": b"A", "close": float("nan"), "ts": 5}, use_bin_type=True)
    await r.xadd("bars:dead", {"data": data, "error": "bad_value:close", b"\xff": b"\xfe"})
    out = io.StringIO()
    assert await tail(r, load_settings(None, {}), out, dead=True) == 1

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    line = json.loads(out.getvalue(), parse_constant=refuse)
    assert line["data"] == {"symbol": "A", "close": None, "ts": 5}
    assert line["error"] == "bad_value:close"
    await r.aclose()
