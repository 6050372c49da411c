"""Property: through the symbol table (duplicates, out-of-order bars, TTL gaps, several symbols
interleaved, any batching), every accepted bar's features equal the exact definition over that
symbol's bars since its last reset."""

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
@given(history=histories(), cut=st.integers(1, 40))
def test_table_features_equal_the_definition_per_segment(
    history: tuple[float, list[tuple[str, str, float]]], cut: int
) -> None:
    scale, events = history
    bars = build_bars(scale, events)
    table = SymbolTable(InputSpec(NAMES, ()), ttl_s=TTL_S)
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
