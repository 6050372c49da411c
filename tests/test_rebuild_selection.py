"""Which history bars a restart replays: each symbol's newest accepted bars, whatever the
rejected bars (out of order, duplicates) after them, so the rebuilt state is the live one."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.batch import drop_stale_symbols, oldest_first, select_recent
from daemon.state import SymbolTable
from daemon.wire import Bar, encode_bar
from handlers.batch_io import InputSpec
from handlers.sequences import FEATURES, SequenceSpec

NAMES = ("ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position")
SPEC = InputSpec(NAMES, (SequenceSpec(FEATURES, ("ret_1d", "rsi_14"), 5),))
MIN = 60_000
TTL_S = 10**7  # no TTL resets or evictions here: the verdicts come from the order alone
LIMIT = 40  # the largest window (20 + 1 bars) and a 5-row sequence of it fit in it


def bar(symbol: str, ts: int, close: float) -> Bar:
    return Bar(symbol, ts, close, close, close, close, 10.0, "bars", f"{ts}-0")


def rebuilt(
    history: list[Bar], limit: int, chunk: int = 37, *, spec: InputSpec = SPEC,
    ttl_s: float = TTL_S,
) -> SymbolTable:
    """What a restart does: the history read newest first in chunks, the kept bars applied
    oldest first to a fresh table, on the live run's clock."""
    fields = [{k.encode(): v for k, v in encode_bar(b).items()} for b in history]
    ids = [f"{i + 1}-0" for i in range(len(history))]
    per_symbol: dict[str, list[int]] = {}
    chunks = []
    for end in range(len(history), 0, -chunk):
        start = max(0, end - chunk)
        chunks.append(select_recent(ids[start:end][::-1], fields[start:end][::-1], "bars",
                                    per_symbol, limit))
    table = SymbolTable(spec, ttl_s=ttl_s)
    kept, clock = oldest_first(drop_stale_symbols(chunks, per_symbol, table.ttl_ms))
    table.apply_columns(kept.symbols, kept.ts, kept.ohlcv, gather=False, clock=clock)
    table.replayed = len(kept)  # type: ignore[attr-defined]
    return table


def same_next(live: SymbolTable, restarted: SymbolTable, after: list[Bar]) -> None:
    """The two tables judge and compute the following bars identically."""
    a, b = live.apply(after), restarted.apply(after)
    assert a.accepted == b.accepted and a.rejected == b.rejected
    assert a.duplicates == b.duplicates
    assert a.inputs is not None and b.inputs is not None
    # Not bit for bit: a window's sums are cut into blocks by the symbol's bar count, which
    # starts later in the replay (the same values within a few roundings, see features.py).
    np.testing.assert_allclose(a.inputs.features, b.inputs.features, rtol=1e-12, atol=1e-15)
    for spec in SPEC.sequences:
        np.testing.assert_allclose(a.inputs.sequences[spec], b.inputs.sequences[spec],
                                   rtol=1e-6, atol=1e-12)
    assert live.max_ts_seen == restarted.max_ts_seen


def walk(rng: np.random.Generator, n: int) -> list[float]:
    return (100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))).tolist()


def test_a_far_future_bar_stays_in_the_window_after_more_rejected_bars_than_the_limit() -> None:
    # One bar ten hours ahead, then 3 x LIMIT bars the live run rejects as out of order: the
    # restart must still know that bar (and the bars before it), or it accepts them all.
    rng = np.random.default_rng(5)
    closes = walk(rng, 400)
    history = [bar("A", (i + 1) * MIN, c) for i, c in enumerate(closes[:60])]
    history.append(bar("A", 60 * MIN + 36_000_000, closes[60]))
    history += [bar("A", (61 + i) * MIN, c) for i, c in enumerate(closes[61 : 61 + 3 * LIMIT])]
    history += [bar("B", (i + 1) * MIN, c) for i, c in enumerate(closes[200:260])]
    live = SymbolTable(SPEC, ttl_s=TTL_S)
    verdicts = live.apply(history)
    assert len(verdicts.rejected) == 3 * LIMIT
    after = [bar("A", 70 * MIN + 36_000_000, 123.0), bar("A", 200 * MIN, 99.0),
             bar("B", 61 * MIN, 101.0)]
    same_next(live, rebuilt(history, LIMIT), after)


@pytest.mark.parametrize("seed", range(6))
def test_a_messy_history_rebuilds_the_live_state(seed: int) -> None:
    rng = np.random.default_rng(seed)
    symbols = ["A", "B", "C", "D"]
    last = dict.fromkeys(symbols, 0)
    history = []
    for _ in range(2000):
        s = str(rng.choice(symbols))
        kind = rng.random()
        if kind < 0.05 and last[s]:
            ts = last[s]  # a duplicate
        elif kind < 0.12 and last[s] > 5 * MIN:
            ts = last[s] - int(rng.integers(1, 5)) * MIN  # out of order
        elif kind < 0.125:
            ts = last[s] + int(rng.integers(20, 200)) * MIN  # a bar ahead of its feed
        else:
            last[s] += MIN
            ts = last[s]
        history.append(bar(s, max(ts, MIN), float(rng.uniform(50, 150))))
    live = SymbolTable(SPEC, ttl_s=TTL_S)
    live.apply(history)
    after = [bar(s, last[s] + k * MIN, float(rng.uniform(50, 150)))
             for k in range(1, 4) for s in symbols]
    same_next(live, rebuilt(history, LIMIT), after)


@pytest.mark.parametrize("chunk", [1, 4, 37])
def test_a_symbol_made_stale_by_a_bar_the_replay_leaves_out_is_evicted_in_the_replay_too(
    chunk: int,
) -> None:
    # A's bar at minute 100 makes C (last bar at 85) stale: C's bar at 92 starts afresh live.
    # A's newer bars push that bar out of A's window; the replay's clock still has it.
    spec = InputSpec(("ret_1d", "ret_5d"), ())
    history = [bar("C", t * MIN, 100.0 + t) for t in range(80, 86)]
    history.append(bar("A", 100 * MIN, 50.0))
    history.append(bar("C", 92 * MIN, 200.0))
    history += [bar("A", 100 * MIN + k * 1000, 50.0 + k) for k in range(1, 6)]
    history.append(bar("C", 93 * MIN, 201.0))
    live = SymbolTable(spec, ttl_s=600)
    outcome = live.apply(history)
    assert outcome.evicted == 1 and outcome.resets == 0  # C, stale by A's bar, back anew
    restarted = rebuilt(history, 5, chunk, spec=spec, ttl_s=600)
    a, b = live.apply([bar("C", 94 * MIN, 202.0)]), restarted.apply([bar("C", 94 * MIN, 202.0)])
    assert a.inputs is not None and b.inputs is not None
    np.testing.assert_array_equal(a.inputs.features, b.inputs.features)  # ret_5d NaN: afresh
    assert np.isnan(a.inputs.features[0, 1])


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_under_churn_only_the_symbols_alive_at_the_end_are_replayed(chunk: int) -> None:
    # Symbols come for a while and go; some come back after being evicted, some after a gap
    # just under the TTL, one with a bar far ahead. The restart replays only the symbols not
    # stale at the end of the history, and every next bar (of every symbol ever seen, and a
    # new one) gets the live run's verdict and values.
    rng = np.random.default_rng(9)
    ttl_s = 600
    history: list[Bar] = []
    closes: dict[str, float] = {}
    last: dict[str, int] = {}
    for minute in range(1, 400):
        alive = [f"S{k}" for k in range(minute // 10, minute // 10 + 8)]
        if minute % 37 == 0:
            alive.append("BACK")  # back every 37 minutes: evicted (TTL 10 min) in between
        if minute % 9 == 0:
            alive.append("NEAR")  # every 9 minutes: never stale
        for symbol in alive:
            closes[symbol] = closes.get(symbol, 100.0) * float(np.exp(rng.normal(0, 0.01)))
            ts = minute * MIN + int(rng.integers(0, 1000))
            if symbol == "S30" and minute == 305:
                ts += 20 * MIN  # ahead: the newest ts seen jumps, others go stale
            if ts <= last.get(symbol, 0):
                continue
            last[symbol] = ts
            history.append(bar(symbol, ts, closes[symbol]))
    live = SymbolTable(SPEC, ttl_s=ttl_s)
    live.apply(history)
    restarted = rebuilt(history, LIMIT, chunk, ttl_s=ttl_s)
    assert restarted.symbols() == live.symbols()
    newest = max(b.ts for b in history)
    alive_at_end = {s for s, t in last.items() if t >= newest - ttl_s * 1000}
    counts = {s: sum(1 for b in history if b.symbol == s) for s in alive_at_end}
    replayed = restarted.replayed  # type: ignore[attr-defined]
    assert replayed == sum(min(n, LIMIT) for n in counts.values()) < len(history) / 5
    after = [bar(s, newest + 30_000, 123.0) for s in sorted(last)] + [bar("NEW", newest, 50.0)]
    same_next(live, restarted, after)
