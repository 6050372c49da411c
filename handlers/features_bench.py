"""Cost of the incremental feature update against the pandas recompute, per bar per symbol.

Run `python -m handlers.features_bench` to print the table for 10, 1k and 100k symbols.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from handlers.features import DEFAULT_FEATURES, FeatureBuilder, FeatureState

PANDAS_HISTORY_BARS = 256  # what the seed recomputed from on every bar
_WARM_BARS = 64  # updates before timing: windows full, blocks restarting at their usual rate


def _walks(symbols: int, bars: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 1e-3, size=(bars, symbols))
    return 100.0 * np.exp(np.cumsum(steps, axis=0))


def bench_feature_update(
    symbols: int, bars: int, names: Sequence[str] = DEFAULT_FEATURES
) -> dict[str, Any]:
    """Time `bars` batched updates of `symbols` symbols (one call per bar, all symbols in it).

    The pandas figure is FeatureBuilder on a 256-bar history, per symbol per bar, measured in
    the same run; it does not depend on the number of symbols.
    """
    names = list(names)
    prices = _walks(symbols, _WARM_BARS + bars)
    state = FeatureState(names, capacity=symbols)
    slots = np.arange(symbols, dtype=np.int64)
    for row in prices[:_WARM_BARS]:
        state.update(slots, row)
    start = time.perf_counter()
    for row in prices[_WARM_BARS:]:
        state.update(slots, row)
    incremental_s = (time.perf_counter() - start) / bars

    builder = FeatureBuilder(names)
    frame = pd.DataFrame({"close": _walks(1, PANDAS_HISTORY_BARS, seed=1)[:, 0]})
    builder.build_features_pandas(frame)
    repeats = 30
    start = time.perf_counter()
    for _ in range(repeats):
        builder.build_features_pandas(frame)
    pandas_s = (time.perf_counter() - start) / repeats

    per_symbol_us = incremental_s / symbols * 1e6
    bytes_per_slot = state.nbytes_per_slot()
    return {
        "symbols": symbols,
        "bars": bars,
        "features": len(names),
        "incremental_us_per_bar": incremental_s * 1e6,
        "incremental_us_per_symbol_bar": per_symbol_us,
        "pandas_us_per_symbol_bar": pandas_s * 1e6,
        "speedup": pandas_s * 1e6 / per_symbol_us,
        "bytes_per_slot": bytes_per_slot,
        "state_mib": bytes_per_slot * symbols / 2**20,
    }


def main() -> None:
    print(
        f"{'symbols':>8} {'bars':>6} {'us/bar':>10} {'us/sym/bar':>11} "
        f"{'pandas us/sym/bar':>18} {'speedup':>9} {'B/slot':>7} {'state MiB':>10}"
    )
    for symbols, bars in ((10, 2000), (1_000, 400), (100_000, 20)):
        r = bench_feature_update(symbols, bars)
        print(
            f"{r['symbols']:>8} {r['bars']:>6} {r['incremental_us_per_bar']:>10.1f} "
            f"{r['incremental_us_per_symbol_bar']:>11.3f} {r['pandas_us_per_symbol_bar']:>18.0f} "
            f"{r['speedup']:>9.0f} {r['bytes_per_slot']:>7} {r['state_mib']:>10.1f}"
        )


if __name__ == "__main__":
    main()
