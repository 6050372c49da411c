"""The symbol table: duplicates, out-of-order, TTL resets, eviction, batch-cut invariance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from daemon.state import OUT_OF_ORDER, SymbolTable
from daemon.wire import Bar
from handlers.batch_io import InputSpec
from handlers.features import exact_reference_frame
from handlers.sequences import FEATURES, RAW, SequenceSpec

NAMES = ("ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position")
SEQ = SequenceSpec(FEATURES, ("ret_1d", "rsi_14"), 4)
RAWSEQ = SequenceSpec(RAW, ("close", "volume"), 3, "none")
SPEC = InputSpec(NAMES, (SEQ, RAWSEQ))
MIN = 60_000


def bar(symbol: str, ts: int, close: float, volume: float = 10.0) -> Bar:
    return Bar(symbol, ts, close, close, close, close, volume, "bars", f"{ts}-0")


def walk(rng: np.random.Generator, n: int, start: float = 100.0) -> np.ndarray:
    return start * np.exp(np.cumsum(rng.normal(0, 0.01, n)))


def test_duplicates_are_skipped_and_out_of_order_rejected() -> None:
    table = SymbolTable(SPEC, ttl_s=900)
    res = table.apply([bar("A", MIN, 1.0), bar("A", MIN, 1.0), bar("A", MIN * 2, 2.0)])
    assert res.accepted == [0, 2] and res.duplicates == [1]
    res = table.apply([bar("A", MIN, 3.0), bar("A", MIN * 2, 3.0), bar("A", MIN * 3, 3.0)])
    assert res.rejected == [(0, OUT_OF_ORDER)]
    assert res.duplicates == [1] and res.accepted == [2]
    assert table.duplicates_total == 2


def test_features_equal_the_reference_per_symbol_with_interleaving() -> None:
    rng = np.random.default_rng(1)
    paths = {s: walk(rng, 80, 10 ** (i - 1)) for i, s in enumerate(["A", "B", "C"])}
    table = SymbolTable(SPEC, ttl_s=10**6)
    got: dict[str, list[np.ndarray]] = {s: [] for s in paths}
    # One batch per step with all symbols, in varying order.
    for t in range(80):
        order = list(rng.permutation(list(paths)))
        bars = [bar(s, (t + 1) * MIN, paths[s][t]) for s in order]
        res = table.apply(bars)
        assert res.inputs is not None
        for row, i in enumerate(res.accepted):
            got[bars[i].symbol].append(res.inputs.features[row])
    for s, closes in paths.items():
        expected = exact_reference_frame(pd.Series(closes), NAMES).to_numpy()
        np.testing.assert_allclose(np.stack(got[s]), expected, rtol=1e-6, atol=1e-9)


def test_a_symbol_repeated_in_one_batch_is_updated_in_order() -> None:
    rng = np.random.default_rng(2)
    closes = walk(rng, 40)
    bars = [bar("X", (i + 1) * MIN, c) for i, c in enumerate(closes)]
    one_batch = SymbolTable(SPEC, ttl_s=10**6).apply(bars)
    assert one_batch.inputs is not None
    one_at_a_time = SymbolTable(SPEC, ttl_s=10**6)
    rows = []
    for b in bars:
        r = one_at_a_time.apply([b])
        assert r.inputs is not None
        rows.append((r.inputs.features[0], r.inputs.sequences[SEQ][0], r.inputs.sequences[RAWSEQ][0]))
    np.testing.assert_array_equal(one_batch.inputs.features, np.stack([r[0] for r in rows]))
    np.testing.assert_array_equal(one_batch.inputs.sequences[SEQ], np.stack([r[1] for r in rows]))
    np.testing.assert_array_equal(
        one_batch.inputs.sequences[RAWSEQ], np.stack([r[2] for r in rows])
    )
    np.testing.assert_array_equal(one_batch.inputs.bars_seen, np.arange(1, 41))


@pytest.mark.parametrize("cut", [1, 3, 7, 50, 1000])
def test_state_is_a_function_of_the_bars_not_of_the_batching(cut: int) -> None:
    rng = np.random.default_rng(3)
    bars = []
    ts = {s: 0 for s in "ABCDE"}
    for _ in range(300):
        s = str(rng.choice(list("ABCDE")))
        step = int(rng.choice([0, 1, 1, 1, 30]))  # duplicates and TTL gaps mixed in
        ts[s] += step * MIN
        bars.append(bar(s, max(ts[s], MIN), float(rng.uniform(1, 2))))
    reference = SymbolTable(SPEC, ttl_s=600).apply(bars)
    one_by_one = SymbolTable(SPEC, ttl_s=600)
    counts_one_by_one = [(r.evicted, r.resets) for r in map(one_by_one.apply, ([b] for b in bars))]
    evictions, resets = (sum(c) for c in zip(*counts_one_by_one, strict=True))
    assert evictions > 5  # the history makes symbols go stale and come back
    table = SymbolTable(SPEC, ttl_s=600)
    feats, seen, dups, counts = [], [], [], []
    for start in range(0, len(bars), cut):
        r = table.apply(bars[start : start + cut])
        assert r.inputs is not None
        feats.append(r.inputs.features)
        seen.append(r.inputs.bars_seen)
        dups.extend(start + d for d in r.duplicates)
        counts.append((r.evicted, r.resets))
    assert reference.inputs is not None
    np.testing.assert_array_equal(np.concatenate(feats), reference.inputs.features)
    np.testing.assert_array_equal(np.concatenate(seen), reference.inputs.bars_seen)
    assert dups == reference.duplicates
    # The counts behind the evictions and resets metrics do not depend on the batching either
    # (a symbol gone stale and back within one batch is an eviction, as one bar at a time).
    assert [sum(c) for c in zip(*counts, strict=True)] == [evictions, resets]
    assert table.evictions_total == one_by_one.evictions_total == evictions


def test_gap_longer_than_ttl_resets_the_symbol() -> None:
    table = SymbolTable(SPEC, ttl_s=300)
    table.apply([bar("A", MIN * i, 100.0 + i) for i in range(1, 30)])
    res = table.apply([bar("A", MIN * 29 + 301_000, 50.0)])
    assert res.resets == 1
    assert res.inputs is not None
    assert res.inputs.bars_seen[0] == 1
    assert np.isnan(res.inputs.features[0]).all()  # every window starts empty again
    assert np.isnan(res.inputs.sequences[SEQ][0][:-1]).all()


def test_stale_symbols_are_evicted_and_their_slots_reused() -> None:
    table = SymbolTable(SPEC, ttl_s=60)
    table.apply([bar(f"S{i}", MIN, 1.0) for i in range(100)])
    assert len(table) == 100
    res = table.apply([bar("LIVE", MIN * 3, 1.0)])
    assert res.evicted == 100 and len(table) == 1
    capacity = table.capacity
    table.apply([bar(f"N{i}", MIN * 3, 1.0) for i in range(100)])
    assert table.capacity == capacity  # freed slots were reused, nothing grew
    # An evicted symbol's next bar starts afresh, even with an older ts.
    res = table.apply([bar("S5", MIN // 2, 1.0)])
    assert res.accepted == [0] and res.inputs is not None and res.inputs.bars_seen[0] == 1


def test_memory_per_symbol_with_default_features_and_one_buffer() -> None:
    from handlers.features import DEFAULT_FEATURES

    spec = InputSpec(tuple(DEFAULT_FEATURES), (SequenceSpec(FEATURES, tuple(DEFAULT_FEATURES), 20),))
    table = SymbolTable(spec, ttl_s=900)
    assert table.nbytes_per_slot() < 4096


@pytest.mark.parametrize("whole", [False, True])
def test_the_ttl_boundaries_are_the_same_one_bar_at_a_time_and_as_a_whole(whole: bool) -> None:
    """A gap of exactly the TTL continues the symbol; one more millisecond restarts it; a bar
    that moves the newest ts seen leaves another symbol behind the horizon, whose next bar in
    the same batch restarts it. Whole: each batch checked at once first."""
    ttl_ms = 300_000
    table = SymbolTable(SPEC, ttl_s=ttl_ms / 1000)
    if whole:
        table.clean_min_rows = 1
    table.apply([bar("A", MIN * i, 100.0 + i) for i in range(1, 6)]
                + [bar("B", MIN * i, 50.0 + i) for i in range(1, 6)])
    base = MIN * 5 + ttl_ms
    at_ttl = table.apply([bar("A", base, 99.0), bar("B", base - MIN, 51.0)])
    assert at_ttl.resets == 0 and at_ttl.accepted == [0, 1]
    assert at_ttl.inputs is not None and at_ttl.inputs.bars_seen.tolist() == [6, 6]
    # A moves the newest ts seen to base + TTL: B (last at base - 1 min) falls behind.
    behind = table.apply([bar("A", base + ttl_ms, 98.0), bar("B", base, 52.0)])
    assert behind.resets == 0 and behind.evicted == 1  # B: evicted, then back (no restart)
    assert behind.inputs is not None and behind.inputs.bars_seen.tolist() == [7, 1]
    past = table.apply([bar("A", base + 2 * ttl_ms + 1, 97.0)])
    assert past.resets == 1 and past.inputs is not None and past.inputs.bars_seen.tolist() == [1]


def test_a_clean_batch_is_taken_whole_and_an_odd_one_is_not() -> None:
    table = SymbolTable(SPEC, ttl_s=900)
    table.apply([bar(s, MIN, 1.0) for s in ("A", "B", "C")])
    symbols = ["A", "B", "A", "C", "A"]
    ts = np.array([2, 2, 3, 2, 4], dtype=np.int64) * MIN
    clean = table._clean_batch(symbols, ts)
    assert clean is not None
    assert clean[0].tolist() == [table.slot_of[s] for s in symbols]
    assert clean[1].tolist() == [0, 0, 1, 0, 2]  # the k-th bar of its symbol in the batch
    assert table._clean_batch(["B"], np.array([MIN + 900_000])) is not None  # exactly the TTL
    for odd_symbols, odd_ts in (
        (["A", "A"], [2, 2]),  # a duplicate
        (["A", "A"], [3, 2]),  # out of order
        (["A", "Z"], [2, 2]),  # a new symbol
        (["A", "B"], [2, 17]),  # B's gap is past the TTL (900 s)
    ):
        assert table._clean_batch(odd_symbols, np.array(odd_ts, dtype=np.int64) * MIN) is None
