"""The demo's synthetic market: a mean-reverting random walk of many symbols, one-minute OHLCV
bars as a feeder sends them, and malformed entries of each kind the daemon dead-letters.
Pure: no Redis, no clock; deterministic for a given seed.

Used by `livepred demo` (its feeder), the demo training run, the benchmark and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BASE_TS_MS = 1_704_205_800_000  # 2024-01-02 14:30 UTC: the market's first bar
BAR_MS = 60_000
TICKERS = (
    "AAPL MSFT NVDA AMZN GOOG META TSLA AVGO JPM V MA UNH XOM LLY HD PG COST JNJ ABBV MRK "
    "ORCL CVX KO PEP ADBE CRM BAC NFLX AMD TMO WMT MCD CSCO ACN ABT LIN DIS INTC QCOM TXN"
).split()
# What the daemon dead-letters each kind of `SyntheticMarket.malformed` entry as.
MALFORMED_KINDS = ("decode_error", "missing_field:close", "bad_value:close", "out_of_order")


class MeanRevertingWalk:
    """Log prices of many symbols, one step per bar: a random walk that bounces back a little
    after each move and is pulled towards its recent average, so short-horizon returns are
    slightly predictable from the features (a demo needs something to learn).

    The demo feeder steps the same process live.
    """

    def __init__(self, rng: np.random.Generator, start_prices: np.ndarray, vol: float = 0.002):
        self.rng = rng
        self.vol = vol
        self.log_price = np.log(np.asarray(start_prices, dtype=np.float64))
        self.average = self.log_price.copy()
        self.last_return = np.zeros_like(self.log_price)

    def step(self) -> np.ndarray:
        """Advance one bar; returns the new prices."""
        noise = self.rng.normal(0.0, self.vol, size=self.log_price.shape)
        move = -0.3 * self.last_return - 0.1 * (self.log_price - self.average) + noise
        self.log_price = self.log_price + move
        self.average += 0.1 * (self.log_price - self.average)
        self.last_return = move
        return np.exp(self.log_price)


def synthetic_closes(rng: np.random.Generator, symbols: int, bars: int) -> np.ndarray:
    """(symbols, bars) close prices from a `MeanRevertingWalk` starting between 20 and 400."""
    walk = MeanRevertingWalk(rng, rng.uniform(20, 400, symbols))
    return np.stack([walk.step() for _ in range(bars)], axis=1)


def symbol_names(count: int) -> list[str]:
    return [TICKERS[i] if i < len(TICKERS) else f"SYM{i:03d}" for i in range(count)]


class SyntheticMarket:
    """One-minute OHLCV bars for many symbols, one tick at a time, as wire-format mappings;
    and malformed input entries of each kind in MALFORMED_KINDS, as raw stream fields."""

    def __init__(self, symbols: Sequence[str], seed: int, base_ts_ms: int = BASE_TS_MS) -> None:
        self.symbols = list(symbols)
        self.rng = np.random.default_rng(seed)
        self.walk = MeanRevertingWalk(self.rng, self.rng.uniform(20, 400, len(self.symbols)))
        self.closes = np.exp(self.walk.log_price)
        self.base_ts_ms = base_ts_ms
        self.tick = 0  # the next bar's index in event time
        self.last_ts: dict[str, int] = {}

    def bars(self, listed: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The next tick's bar of each listed symbol (all by default), ts one minute later."""
        opens, closes = self.closes, self.walk.step()
        self.closes = closes
        ts = self.base_ts_ms + self.tick * BAR_MS
        self.tick += 1
        spread = 1 + np.abs(self.rng.normal(0, 0.0008, size=(2, len(closes))))
        volumes = self.rng.integers(100, 5000, size=len(closes))
        out = []
        for i in range(len(self.symbols)) if listed is None else listed:
            o, c = float(opens[i]), float(closes[i])
            symbol = self.symbols[i]
            out.append(
                {
                    "symbol": symbol,
                    "ts": ts,
                    "open": o,
                    "high": max(o, c) * float(spread[0, i]),
                    "low": min(o, c) / float(spread[1, i]),
                    "close": c,
                    "volume": float(volumes[i]),
                }
            )
            self.last_ts[symbol] = ts
        return out

    def malformed(self, kind: str) -> tuple[str, dict[str, Any]]:
        """(symbol, stream fields) of an entry the daemon dead-letters with reason `kind`.
        Its symbol has had a bar already (an out-of-order bar needs a newer one)."""
        import msgpack

        from daemon.wire import encode_bar

        seen = sorted(self.last_ts)
        if not seen:
            raise ValueError("no bar published yet: call bars() first")
        symbol = seen[int(self.rng.integers(len(seen)))]
        ts = self.last_ts[symbol]
        if kind == "decode_error":
            return symbol, {"data": b"\xc1 this is not msgpack"}
        if kind == "missing_field:close":  # flat fields, as redis-cli would send them
            return symbol, {
                "symbol": symbol,
                "ts": str(ts + BAR_MS // 2),
                "open": "1",
                "high": "1",
                "low": "1",
                "volume": "5",
            }
        if kind == "bad_value:close":
            bar = {
                "symbol": symbol,
                "ts": ts + BAR_MS // 2,
                "open": 1.0,
                "high": 1.0,
                "low": 1.0,
                "close": -1.0,
                "volume": 5.0,
            }
            return symbol, {"data": msgpack.packb(bar)}
        if kind == "out_of_order":  # a valid bar, older than the symbol's last one
            return symbol, encode_bar(
                {
                    "symbol": symbol,
                    "ts": ts - 2 * BAR_MS,
                    "open": 100.0,
                    "high": 100.0,
                    "low": 100.0,
                    "close": 100.0,
                    "volume": 1.0,
                }
            )
        raise ValueError(f"unknown malformed kind {kind!r}; choose from {MALFORMED_KINDS}")
