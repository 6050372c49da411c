"""Property: through the symbol table (duplicates, out-of-order bars, TTL gaps, several symbols
interleaved, any batching), every accepted bar's features equal the exact definition over that
symbol's bars since its last reset. And the whole-batch check (`_clean_batch`) reaches the
per-bar rules' verdict (`_classify`) on every batch it takes, and takes every batch it can."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.state import OUT_OF_ORDER, SymbolTable
from daemon.wire import Bar
from handlers.batch_io import InputSpec
from handlers.features import DEFAULT_FEATURES, exact_reference_frame

NAMES = (*DEFAULT_FEATURES, "rsi_3", "bb_position_5", "vol_2d")
TTL_S = 600
MIN = 60_000

steps = st.sampled_from(["next", "next", "next", "next", "dup", "old", "gap", "flat"])


@st.composite
def histories(draw: st.DrawFn) -> tuple[float, list[tuple[str, str, float]]]:
    scale = draw(st.sampled_from([1e-4, 1.0, 100.0, 5e4, 1e6]))
    n = draw(st.integers(20, 120))
    events = []
    for _ in range(n):
        symbol = draw(st.sampled_from(["A", "B", "C"]))
        kind = draw(steps)
        move = draw(st.floats(-0.03, 0.03, allow_nan=False))
        events.append((symbol, kind, move))
    return scale, events


def build_bars(scale: float, events: list[tuple[str, str, float]]) -> list[Bar]:
    ts = {"A": 0, "B": 0, "C": 0}
    price = {"A": scale, "B": scale * 1.5, "C": scale * 0.7}
    bars = []
    for i, (symbol, kind, move) in enumerate(events):
        if kind == "dup" and ts[symbol]:
            t = ts[symbol]
        elif kind == "old" and ts[symbol] > MIN:
            t = ts[symbol] - MIN
        else:
            t = ts[symbol] + (TTL_S * 1000 + MIN if kind == "gap" else MIN)
            if kind != "flat":
                price[symbol] *= float(np.exp(move))
            ts[symbol] = t
        bars.append(Bar(symbol, t, 1.0, 1.0, 1.0, price[symbol], 1.0, "bars", f"{i}-0"))
    return bars


def expected_rows(bars: list[Bar]) -> dict[int, np.ndarray]:
    """An independent model of CONTRACT §5: per symbol, accepted bars split at TTL gaps and
    at event-time eviction; features from the exact definition over each segment."""
    last: dict[str, int] = {}
    segment: dict[str, list[tuple[int, float]]] = {}
    max_seen = 0
    out_index: dict[int, tuple[str, int]] = {}
    segments: list[list[tuple[int, float]]] = []
    for i, b in enumerate(bars):
        prev = last.get(b.symbol)
        fresh = prev is None or prev < max_seen - TTL_S * 1000 or b.ts - prev > TTL_S * 1000
        if not fresh and b.ts <= prev:  # duplicate or out of order
            continue
        if fresh:
            segment[b.symbol] = []
            segments.append(segment[b.symbol])
        segment[b.symbol].append((i, b.close))
        last[b.symbol] = b.ts
        max_seen = max(max_seen, b.ts)
        out_index[i] = (b.symbol, len(segment[b.symbol]) - 1)
    rows: dict[int, np.ndarray] = {}
    for seg in segments:
        ref = exact_reference_frame(pd.Series([c for _, c in seg]), NAMES).to_numpy()
        for k, (i, _) in enumerate(seg):
            rows[i] = ref[k]
    return rows


@settings(max_examples=60, deadline=None)
@given(history=histories(), cut=st.integers(1, 40), whole=st.booleans())
def test_table_features_equal_the_definition_per_segment(
    history: tuple[float, list[tuple[str, str, float]]], cut: int, whole: bool
) -> None:
    scale, events = history
    bars = build_bars(scale, events)
    table = SymbolTable(InputSpec(NAMES, ()), ttl_s=TTL_S)
    if whole:
        table.clean_min_rows = 1  # every batch checked as a whole first
    got: dict[int, np.ndarray] = {}
    rejected: list[int] = []
    for start in range(0, len(bars), cut):
        res = table.apply(bars[start : start + cut])
        assert res.inputs is not None
        for row, j in enumerate(res.accepted):
            got[start + j] = res.inputs.features[row]
        rejected += [start + j for j, reason in res.rejected if reason == OUT_OF_ORDER]
    expected = expected_rows(bars)
    assert sorted(got) == sorted(expected)
    for i, want in expected.items():
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-9, err_msg=f"bar {i}")
    for i in rejected:
        assert i not in expected


@st.composite
def batches_after_history(draw: st.DrawFn) -> tuple[list[Bar], list[Bar]]:
    """Bars for four symbols, then a batch mixing clean next bars with the odd duplicate,
    older bar, TTL gap, unknown symbol or jump that leaves another symbol behind the horizon."""
    history: list[Bar] = []
    ts = {"A": 10 * MIN, "B": 12 * MIN, "C": 15 * MIN, "D": 9 * MIN}
    for symbol, t in ts.items():
        history.append(Bar(symbol, t, 1.0, 1.0, 1.0, 1.0, 1.0, "bars", "0-0"))
    # One kind of oddity per batch (or none), so that each one is seen alone.
    odd = draw(st.sampled_from(["next", "dup", "old", "gap", "new", "jump", "same"]))
    kinds = st.sampled_from(["next"] * 4 + [odd])
    batch: list[Bar] = []
    for i in range(draw(st.integers(1, 40))):
        symbol = draw(st.sampled_from(sorted(ts)))
        kind = draw(kinds)
        if kind == "new":
            symbol, t = f"N{i}", 20 * MIN
        elif kind == "dup":
            t = ts[symbol]
        elif kind == "old":
            t = ts[symbol] - MIN
        elif kind == "gap":
            t = ts[symbol] = ts[symbol] + TTL_S * 1000 + MIN
        elif kind == "jump":  # within this symbol's TTL, leaving the others behind the horizon
            t = ts[symbol] = ts[symbol] + TTL_S * 1000 - draw(st.integers(0, 3)) * MIN
        elif kind == "same":  # exactly at the TTL: still the same segment
            t = ts[symbol] = ts[symbol] + TTL_S * 1000
        else:
            t = ts[symbol] = ts[symbol] + draw(st.integers(1, 3)) * MIN
        batch.append(Bar(symbol, t, 1.0, 1.0, 1.0, 1.0, 1.0, "bars", f"{i}-1"))
    return history, batch


@settings(max_examples=300, deadline=None)
@given(data=batches_after_history())
def test_the_whole_batch_check_agrees_with_the_per_bar_rules(
    data: tuple[list[Bar], list[Bar]],
) -> None:
    history, batch = data
    table = SymbolTable(InputSpec(("ret_1d",), ()), ttl_s=TTL_S)
    table.apply(history)
    symbols = [b.symbol for b in batch]
    ts = np.array([b.ts for b in batch], dtype=np.int64)
    max_seen = table.max_ts_seen
    clean = table._clean_batch(symbols, ts)
    accepted, rejected, duplicates, slots, waves, fresh = table._classify(symbols, ts)
    everything_plain = len(accepted) == len(batch) and not any(fresh) and all(
        s in {"A", "B", "C", "D"} for s in symbols
    )
    assert (clean is not None) == everything_plain
    if clean is not None:
        assert clean[0].tolist() == slots
        assert clean[1].tolist() == waves
        assert table.max_ts_seen == max(max_seen, int(ts.max()))
