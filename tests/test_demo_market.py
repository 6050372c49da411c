"""The demo's synthetic market (daemon/demo_market.py): bars as a feeder sends them, the
malformed entries of each kind, and the walk they come from."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.demo_market import (
    BAR_MS,
    MALFORMED_KINDS,
    MeanRevertingWalk,
    SyntheticMarket,
    symbol_names,
    synthetic_closes,
)
from daemon.wire import Bar, Rejection, decode_bar, encode_bar


def test_synthetic_market_bars_and_malformed_entries() -> None:
    market = SyntheticMarket(symbol_names(50), seed=3)
    first, second = market.bars(), market.bars(range(5))
    assert len(first) == 50 and len(second) == 5
    assert len({b["symbol"] for b in first}) == 50
    assert {b["ts"] for b in second} == {first[0]["ts"] + BAR_MS}
    for bar in first + second:
        encode_bar(bar)  # valid on the wire
        assert (
            bar["low"]
            <= min(bar["open"], bar["close"])
            <= max(bar["open"], bar["close"])
            <= bar["high"]
        )
    for kind in MALFORMED_KINDS:
        symbol, fields = market.malformed(kind)
        decoded = decode_bar(fields, "bars", "1-0")
        if kind == "out_of_order":  # well-formed; the state table rejects it for its ts
            assert isinstance(decoded, Bar) and decoded.ts < market.last_ts[symbol]
        else:
            assert isinstance(decoded, Rejection) and decoded.reason == kind


def test_a_malformed_entry_needs_a_bar_first_and_a_known_kind() -> None:
    market = SyntheticMarket(symbol_names(3), seed=1)
    with pytest.raises(ValueError, match="no bar published"):
        market.malformed("decode_error")
    market.bars()
    with pytest.raises(ValueError, match="unknown malformed kind"):
        market.malformed("nonsense")


def test_the_walk_reverts_and_is_seeded() -> None:
    # One step of the walk against its definition, computed here from the same noise.
    rng = np.random.default_rng(5)
    walk = MeanRevertingWalk(np.random.default_rng(5), np.array([100.0, 50.0]))
    log_p, average, last = np.log([100.0, 50.0]), np.log([100.0, 50.0]), np.zeros(2)
    for _ in range(3):
        noise = rng.normal(0.0, 0.002, size=2)
        move = -0.3 * last - 0.1 * (log_p - average) + noise
        log_p = log_p + move
        average = average + 0.1 * (log_p - average)
        last = move
        np.testing.assert_allclose(walk.step(), np.exp(log_p), rtol=1e-12)
    # Returns bounce back: consecutive one-bar returns are negatively correlated.
    closes = synthetic_closes(np.random.default_rng(0), symbols=20, bars=2000)
    assert closes.shape == (20, 2000) and (closes > 0).all()
    r = np.diff(np.log(closes), axis=1)
    lag1 = np.mean([np.corrcoef(row[:-1], row[1:])[0, 1] for row in r])
    assert lag1 < -0.1
    np.testing.assert_array_equal(
        closes, synthetic_closes(np.random.default_rng(0), symbols=20, bars=2000)
    )


def test_symbol_names_are_tickers_then_numbered() -> None:
    names = symbol_names(45)
    assert names[:3] == ["AAPL", "MSFT", "NVDA"] and names[-1] == "SYM044"
    assert len(set(names)) == 45
