"""Long horizons: the incremental features stay on the exact window values, whatever the history."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.features import DEFAULT_FEATURES, FeatureState, exact_reference_frame

NAMES = [*DEFAULT_FEATURES, "bb_position_7", "vol_2d", "rsi_1", "ma_ratio_1", "ret_3d"]
MAX_WINDOW = 20
CHUNK_BARS = 100_000


def tick_walk(rng: np.random.Generator, bars: int, price: float, tick: float) -> np.ndarray:
    """One-tick moves and flat bars, with a rare jump of up to +-6% (in and out of windows)."""
    steps = rng.choice(np.array([-1, 0, 1]), bars)
    jumps = rng.random(bars) < 2e-4
    span = int(0.06 * price / tick)
    steps[jumps] = rng.integers(-span, span, jumps.sum())
    ticks = np.maximum(round(price / tick) + np.cumsum(steps), round(0.5 * price / tick))
    return ticks * tick


def worst_error(values: np.ndarray, close: np.ndarray) -> float:
    """Largest |a - b| / (1e-9 + 1e-6 |b|) against the exact reference, computed in chunks.

    A NaN mismatch counts as infinity. Each chunk's reference gets the preceding bars it needs.
    """
    worst = 0.0
    lead = 2 * MAX_WINDOW
    for start in range(0, len(close), CHUNK_BARS):
        lo = max(0, start - lead)
        ref = exact_reference_frame(close[lo : start + CHUNK_BARS], NAMES).to_numpy()[start - lo :]
        got = values[start : start + CHUNK_BARS]
        nan_ref = np.isnan(ref)
        if (np.isnan(got) != nan_ref).any():
            return float("inf")
        with np.errstate(invalid="ignore"):
            ratio = np.abs(got - ref) / (1e-9 + 1e-6 * np.abs(ref))
        worst = max(worst, float(np.max(np.where(nan_ref, 0.0, ratio))))
    return worst


@pytest.mark.slow
def test_a_million_bars_over_a_thousand_slots_at_5e4() -> None:
    rng = np.random.default_rng(1)
    slots, bars = 1000, 1000
    closes = np.stack([tick_walk(rng, bars, 50_000.0, 0.01) for _ in range(slots)], axis=1)
    state = FeatureState(NAMES, capacity=slots)
    out = np.empty((bars, slots, len(NAMES)))
    ids = np.arange(slots)
    for t in range(bars):
        out[t] = state.update(ids, closes[t])
    for s in range(0, slots, 7):
        assert worst_error(out[:, s], closes[:, s]) <= 1.0, f"slot {s}"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_million_consecutive_bars_of_one_symbol_at_every_scale() -> None:
    """Each slot sees 10^6 consecutive bars (one call per bar, four slots per call): price 5e4
    with one-tick and half-unit moves, 1e-4 with 1e-8 ticks, 1e6 with 0.01 ticks. Checked
    chunk by chunk against the exact reference so memory stays small (1.5-3 minutes here)."""
    rng = np.random.default_rng(2)
    bars = 1_000_000
    setups = [(50_000.0, 0.01), (50_000.0, 0.5), (1e-4, 1e-8), (1e6, 0.01)]
    closes = np.stack([tick_walk(rng, bars, price, tick) for price, tick in setups], axis=1)
    state = FeatureState(NAMES, capacity=len(setups))
    ids = np.arange(len(setups))
    lead = 2 * MAX_WINDOW
    worst = [0.0] * len(setups)
    for start in range(0, bars, CHUNK_BARS):
        stop = min(bars, start + CHUNK_BARS)
        out = np.empty((stop - start, len(setups), len(NAMES)))
        for t in range(start, stop):
            out[t - start] = state.update(ids, closes[t])
        lo = max(0, start - lead)
        for s in range(len(setups)):
            # The reference gets the preceding bars its windows need; compare this chunk only.
            ref_close = closes[lo:stop, s]
            worst[s] = max(worst[s], _chunk_error(out[:, s], ref_close, start - lo))
    for s, (price, tick) in enumerate(setups):
        assert worst[s] <= 1.0, f"price {price} tick {tick}: worst {worst[s]} of tolerance"


def _chunk_error(got: np.ndarray, close: np.ndarray, skip: int) -> float:
    ref = exact_reference_frame(close, NAMES).to_numpy()[skip:]
    nan_ref = np.isnan(ref)
    if (np.isnan(got) != nan_ref).any():
        return float("inf")
    with np.errstate(invalid="ignore"):
        ratio = np.abs(got - ref) / (1e-9 + 1e-6 * np.abs(ref))
    return float(np.max(np.where(nan_ref, 0.0, ratio)))


def test_state_forgets_history_beyond_two_windows() -> None:
    """Bit-identical outputs once the last 2N+1 bars agree (prefix lengths equal mod the block
    lengths): the state carries nothing older, so no error can accumulate over any horizon."""
    rng = np.random.default_rng(3)
    period = 2 * 3 * 5 * 7 * 2  # lcm of every window in NAMES (1, 2, 3, 7, 10, 14, 20)
    prefix_a = tick_walk(rng, 30 * period, 50_000.0, 0.01)
    prefix_b = tick_walk(rng, 2 * period, 900.0, 0.5)  # another price, scale, length
    common = tick_walk(rng, 400, 51_000.0, 0.01)
    state = FeatureState(NAMES, capacity=2)
    for close in prefix_a[: -len(prefix_b)]:
        state.update(np.array([0]), np.array([close]))
    for a, b in zip(prefix_a[-len(prefix_b) :], prefix_b, strict=True):
        state.update(np.array([0, 1]), np.array([a, b]))
    got = np.stack([state.update(np.array([0, 1]), np.array([c, c])) for c in common])
    settled = 2 * MAX_WINDOW + 1
    np.testing.assert_array_equal(got[settled:, 0], got[settled:, 1])
