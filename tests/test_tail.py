"""`livepred tail`: the newest predictions of every partition, merged in entry order and
decoded as the wire map; then the new ones; dead letters with their msgpack data decoded."""

from __future__ import annotations

import asyncio
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


def _strict(text: str) -> list[dict]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _wire(**changes: object) -> dict[str, bytes]:
    m = {"v": 1, "symbol": "BAD", "ts": 1_700_000_000_000, "src": "bars/1-0", "run": "r",
         "lat_us": 5, "targets": {"t": {"preds": {"F": 0.5}, "selected": "F", "pred": 0.5,
                                        "warming": {}, "failed": {}}}}
    m.update(changes)
    return {"data": msgpack.packb(m, use_bin_type=True)}


NOT_PREDICTIONS = [
    _wire(ts=[1]),  # once a TypeError that ended tail
    _wire(ts="1700000000000"),  # once printed as the int 1700000000000
    _wire(ts=1.5),  # once printed as 1
    _wire(lat_us=msgpack.Timestamp(1, 0)),
    _wire(targets={"t": {"preds": {"F": "abc"}}}),
    {"data": msgpack.packb([[[]]] * 2) + b"\x00"},  # not one msgpack object
]


@pytest.mark.parametrize("follow", [False, True])
async def test_an_entry_that_is_no_prediction_prints_as_an_error_line(follow: bool) -> None:
    r = fakeredis.FakeAsyncRedis()
    good = _event("GOOD", 7, 0.7)
    out = io.StringIO()
    if follow:
        task = asyncio.create_task(tail(
            r, load_settings(None, {}), out, count=0, follow=True,
            stop=lambda: len(out.getvalue().splitlines()) > len(NOT_PREDICTIONS),
        ))
        await asyncio.sleep(0.1)
    for fields in NOT_PREDICTIONS:
        await r.xadd("predictions", fields)
    await r.xadd("predictions", encode_prediction(good))
    if follow:
        assert await asyncio.wait_for(task, 10) == len(NOT_PREDICTIONS) + 1
    else:
        assert await tail(r, load_settings(None, {}), out, count=100) == len(NOT_PREDICTIONS) + 1
    lines = _strict(out.getvalue())
    for line in lines[:-1]:
        assert line["error"].startswith("not a prediction")
        assert "ts" not in line and "targets" not in line  # nothing shown as if valid
        assert "data" in line["fields"]  # what the entry holds, for whoever looks into it
    assert lines[1]["fields"]["data"]["ts"] == "1700000000000"  # as written, a string
    assert lines[2]["fields"]["data"]["ts"] == 1.5
    last = lines[-1]
    del last["stream"], last["id"]
    assert last == good.to_dict()
    await r.aclose()


async def test_an_entry_too_deep_to_print_is_a_line_saying_so() -> None:
    r = fakeredis.FakeAsyncRedis()
    deep = b"\x91" * 1000 + b"\xc0"  # a list in a list ... 1000 deep: msgpack reads it
    await r.xadd("bars:dead", {"data": deep, "error": "decode_error"})
    await r.xadd("bars:dead", {"data": msgpack.packb({"symbol": "Y"}), "error": "bad_value:ts"})
    out = io.StringIO()
    assert await tail(r, load_settings(None, {}), out, dead=True) == 2
    lines = _strict(out.getvalue())
    assert lines[0]["error"].startswith("cannot be shown")
    assert lines[1]["data"] == {"symbol": "Y"} and lines[1]["error"] == "bad_value:ts"
    await r.aclose()


async def test_follow_waits_for_redis_at_the_start_saying_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from daemon import tail as tail_module

    monkeypatch.setattr(tail_module, "OUTAGE_RETRY_S", 0.01)
    r = fakeredis.FakeAsyncRedis()
    await r.xadd("predictions", encode_prediction(_event("OLD", 1, 0.1)))
    real = r.xrevrange
    calls = {"n": 0}
    back = asyncio.Event()

    async def down_at_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 5:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        back.set()
        return await real(*args, **kwargs)

    r.xrevrange = down_at_first
    out, notes = io.StringIO(), io.StringIO()
    task = asyncio.create_task(tail(
        r, load_settings(None, {}), out, count=1, follow=True, notes=notes,
        stop=lambda: len(out.getvalue().splitlines()) >= 2,
    ))
    await asyncio.wait_for(back.wait(), 10)
    await r.xadd("predictions", encode_prediction(_event("NEW", 2, 0.2)))
    assert await asyncio.wait_for(task, 10) == 2
    assert [line["symbol"] for line in _strict(out.getvalue())] == ["OLD", "NEW"]
    assert notes.getvalue().splitlines() == [
        "livepred tail: Redis: Error 111 connecting to 127.0.0.1:6379. Connection refused.;"
        " retrying"
    ]
    await r.aclose()


@pytest.mark.parametrize("follow", [False, True])
async def test_without_follow_or_on_a_refusal_the_error_is_raised(follow: bool) -> None:
    # Printing what is there has nothing to wait for; a wrong password does not pass.
    from redis.exceptions import AuthenticationError
    from redis.exceptions import ConnectionError as RedisConnectionError

    r = fakeredis.FakeAsyncRedis()
    error = AuthenticationError("invalid username-password pair") if follow else (
        RedisConnectionError("Connection refused"))

    async def fails(*args, **kwargs):
        raise error

    r.xrevrange = fails
    with pytest.raises(type(error)):
        await asyncio.wait_for(tail(r, load_settings(None, {}), io.StringIO(), follow=follow,
                                    notes=io.StringIO()), 10)
    await r.aclose()


@pytest.mark.redis
def test_a_reader_that_leaves_ends_tail_with_status_0(
    real_redis_url: str, key_prefix: str, tmp_path
) -> None:
    # `livepred tail -f | head -1`: the reader leaving is how a follower ends; tail exited 1.
    import os
    import subprocess
    import sys

    import redis

    stream = f"{key_prefix}predictions"
    client = redis.Redis.from_url(real_redis_url)
    for i in range(50):
        client.xadd(stream, encode_prediction(_event(f"S{i}", 1000 + i, i / 10)))
    client.close()
    env = {**os.environ, "LIVEPRED_REDIS__URL": real_redis_url,
           "LIVEPRED_STREAMS__OUTPUT": stream}
    script = (f"{sys.executable} -m daemon.cli tail -n 50 -f | head -1; "
              "echo \"status ${PIPESTATUS[0]}\"")
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    first, status = done.stdout.splitlines()
    assert json.loads(first)["symbol"] == "S0"
    assert status == "status 0", done.stderr
    assert "Traceback" not in done.stderr


def test_tail_and_the_config_load_no_model_code() -> None:
    # `livepred tail` read its config through modules that imported the whole engine
    # (pandas, the features) for its error classes: a second before any output.
    import subprocess
    import sys

    code = ("import sys, daemon.settings, daemon.tail, daemon.redis_client; "
            "print(sorted(m for m in ('pandas', 'handlers.engine', 'daemon.service') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_tail_refused_by_redis_exits_2_as_run_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A wrong password: `run` exits 2 (a configuration error), `tail` exited 1.
    from redis.exceptions import AuthenticationError

    from daemon import redis_client
    from daemon.cli import main

    class Refusing(fakeredis.FakeAsyncRedis):
        async def execute_command(self, *args: object, **kwargs: object) -> object:
            raise AuthenticationError("invalid username-password pair or user is disabled.")

    monkeypatch.setattr(redis_client, "make_redis", lambda settings: Refusing())
    monkeypatch.setenv("LIVEPRED_REDIS__URL", "redis://app:wrong@127.0.0.1:6379/13")
    assert main(["tail", "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert "invalid username-password" in err and "wrong" not in err
