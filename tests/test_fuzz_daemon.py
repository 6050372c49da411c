"""Hypothesis against the in-process daemon on fakeredis: random bytes, random field maps and
random msgpack maps mixed with valid bars. Nothing escapes the loop, and every entry ends as
exactly one output, one dead letter or one counted duplicate, with nothing left pending."""

from __future__ import annotations

import asyncio
from pathlib import Path

import fakeredis
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.service import Service
from daemon.settings import load_settings
from daemon.wire_events import decode_prediction
from daemon.worker import Role
from tests import daemon_harness as h
from tests import model_factory as mf

STREAM, OUTPUT, DEAD, GROUP = "bars", "predictions", "bars:dead", "livepred"
# Valid bars use symbols a random text of <= 5 characters can't hit, so the random entries
# never touch their per-symbol state and their outcome can be predicted independently.
VALID_SYMBOLS = ("VALID-A", "VALID-B", "VALID-C")
BAR_KEYS = ("symbol", "ts", "open", "high", "low", "close", "volume")
MIN_MS = 60_000
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(h.FEATURES)))
    y = X[:, 0] + rng.normal(0, 0.1, 300)
    mf.write_lightgbm(root, "fwd", "LightGBM", X, y, h.FEATURES)
    mf.write_routing(root, "fwd", "LightGBM")
    mf.write_manifest(root, run_id="fuzz-run")
    return root


# ---- entries --------------------------------------------------------------------------------

# (kind, fields, (symbol, ts) for valid bars)
Item = tuple[str, dict, tuple[str, int] | None]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(), st.text(max_size=70), st.binary(max_size=8),
    st.lists(st.integers(min_value=0, max_value=9), max_size=2),
)


@st.composite
def valid_bar(draw: st.DrawFn) -> Item:
    symbol = draw(st.sampled_from(VALID_SYMBOLS))
    ts = T0 + draw(st.integers(0, 10)) * MIN_MS  # a 10-minute span: below the TTL, no eviction
    close = draw(st.floats(0.01, 1e5))
    bar = {"symbol": symbol, "ts": ts, "open": close, "high": close, "low": close,
           "close": close, "volume": draw(st.floats(0, 1e6))}
    if draw(st.booleans()):
        fields = {"data": msgpack.packb(bar)}
    else:
        fields = {k.encode(): repr(v).encode() for k, v in bar.items()}
        fields[b"symbol"] = symbol.encode()
    return ("valid", fields, (symbol, ts))


random_bytes_map = st.dictionaries(st.binary(max_size=10), st.binary(max_size=40), min_size=1,
                                   max_size=6).map(lambda m: ("bytes", m, None))
random_data = st.binary(max_size=80).map(lambda b: ("data", {b"data": b}, None))
random_msgpack = st.dictionaries(
    st.one_of(st.sampled_from(BAR_KEYS), st.text(max_size=5), st.integers(-3, 3)), scalars,
    max_size=9,
).map(lambda m: ("msgpack", {b"data": msgpack.packb(m, use_bin_type=True)}, None))
random_msgpack_other = st.one_of(scalars, st.lists(scalars, max_size=3)).map(
    lambda v: ("msgpack", {b"data": msgpack.packb(v, use_bin_type=True)}, None)
)
random_flat = st.dictionaries(
    st.sampled_from(BAR_KEYS).map(str.encode),
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b"1", b"0", b"-1", b"nan", b"inf", b"1e3", b"1.5", b"", b" 2 ",
                         b"1700000000000", b"1700000000000.0", b"9" * 30, b"0x10"]),
    ),
    min_size=1,
).map(lambda m: ("flat", m, None))


@st.composite
def near_valid(draw: st.DrawFn) -> Item:
    """A valid bar with one key removed or replaced by anything (own symbols, so it can't
    disturb the valid bars' outcome)."""
    bar: dict = {"symbol": draw(st.sampled_from(("NEAR-1", "NEAR-2"))),
                 "ts": T0 + draw(st.integers(0, 10)) * MIN_MS, "open": 1.0, "high": 1.0,
                 "low": 1.0, "close": 1.0, "volume": 0}
    key = draw(st.sampled_from(BAR_KEYS))
    if draw(st.booleans()):
        del bar[key]
    else:
        bar[key] = draw(scalars)
    return ("near", {b"data": msgpack.packb(bar, use_bin_type=True)}, None)


entries = st.lists(
    st.one_of(valid_bar(), valid_bar(), near_valid(), random_bytes_map, random_data,
              random_msgpack, random_msgpack_other, random_flat),
    min_size=1, max_size=60,
)


def expected_valid_outcomes(items: list[Item]) -> dict[int, str]:
    """Position -> "output" / "duplicate" / "out_of_order" for the valid bars (CONTRACT §4)."""
    last: dict[str, int] = {}
    out = {}
    for i, (kind, _, key) in enumerate(items):
        if kind != "valid":
            continue
        assert key is not None
        symbol, ts = key
        previous = last.get(symbol)
        if previous is None or ts > previous:
            out[i], last[symbol] = "output", ts
        elif ts == previous:
            out[i] = "duplicate"
        else:
            out[i] = "out_of_order"
    return out


# ---- the run --------------------------------------------------------------------------------


async def _run_daemon(run: Path, items: list[Item]) -> None:
    environ = {
        "LIVEPRED_MODELS__RUN_ROOT": str(run),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "5",
        "LIVEPRED_STREAMS__BATCH": "7",
        "LIVEPRED_STREAMS__CONSUMER": "fuzz",
    }
    redis = fakeredis.FakeAsyncRedis()
    service = Service(load_settings(None, environ), redis=redis)
    task: asyncio.Task[int] | None = None
    try:
        await service.start()
        await redis.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
        half = len(items) // 2
        ids = [(await redis.xadd(STREAM, fields)).decode() for _, fields, _ in items[:half]]
        task = asyncio.create_task(service.run())
        for _, fields, _ in items[half:]:  # the rest while the daemon runs
            ids.append((await redis.xadd(STREAM, fields)).decode())
            await asyncio.sleep(0)

        def duplicates() -> int:
            value = service.metrics.registry.get_sample_value("livepred_duplicates_total")
            return int(value or 0)

        async def settled() -> bool:
            handled = await redis.xlen(OUTPUT) + await redis.xlen(DEAD) + duplicates()
            pending = (await redis.xpending(STREAM, GROUP))["pending"]
            return handled >= len(items) and pending == 0

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await settled():
            assert not task.done(), f"service.run() ended early: {task.result()!r}"
            # A worker that died of an exception is STOPPED while the service runs on.
            assert all(w.role != Role.STOPPED for w in service.workers), "a worker died"
            assert loop.time() < deadline, "entries left unhandled"
            await asyncio.sleep(0.01)
        assert all(w.role == Role.ACTIVE for w in service.workers)

        outputs = [decode_prediction(f) for _, f in await redis.xrange(OUTPUT)]
        dead = [f for _, f in await redis.xrange(DEAD)]
        position = {f"{STREAM}/{entry_id}": i for i, entry_id in enumerate(ids)}
        out_pos = [position[o.src] for o in outputs]
        dead_pos = [position[f"{f[b'src_stream'].decode()}/{f[b'src_id'].decode()}"] for f in dead]
        assert len(set(out_pos)) == len(out_pos), "an entry has two outputs"
        assert len(set(dead_pos)) == len(dead_pos), "an entry has two dead letters"
        assert not set(out_pos) & set(dead_pos), "an entry has an output and a dead letter"
        assert len(out_pos) + len(dead_pos) + duplicates() == len(items)

        # Dead letters keep the original fields, bytes for bytes.
        for f, i in zip(dead, dead_pos, strict=True):
            original = items[i][1]
            for k, v in original.items():
                kb = k if isinstance(k, bytes) else k.encode()
                if kb not in (b"error", b"src_stream", b"src_id"):
                    assert f[kb] == (v if isinstance(v, bytes) else str(v).encode())
            assert f[b"error"]

        # The valid bars end exactly as the contract says.
        outcome = {i: "output" for i in out_pos}
        outcome.update({i: dead[j][b"error"].decode() for j, i in enumerate(dead_pos)})
        for i, want in expected_valid_outcomes(items).items():
            assert outcome.get(i, "duplicate") == want, (i, items[i])
        for o, i in zip(outputs, out_pos, strict=True):
            if items[i][0] == "valid":
                assert (o.symbol, o.ts) == items[i][2]
            assert o.run == "fuzz-run"
            assert set(o.targets) == {"fwd"}
    finally:
        service.request_stop()
        if task is not None:
            assert await asyncio.wait_for(task, 15) == 0
        else:
            await service.close()
        await redis.aclose()


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(items=entries)
def test_every_entry_ends_exactly_once_whatever_it_holds(lgb_run: Path, items: list[Item]) -> None:
    asyncio.run(asyncio.wait_for(_run_daemon(lgb_run, items), 60))
