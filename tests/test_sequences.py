"""Ring buffers: order, wrap-around, batched gathers, reset, raw z-scoring."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.sequences import FEATURES, RAW, SequenceBuffers, SequenceSpec, zscore


def _spec(length: int = 4, width: int = 2) -> SequenceSpec:
    return SequenceSpec(FEATURES, tuple(f"f{i}" for i in range(width)), length)


def test_rows_come_back_oldest_first_after_wrap_around() -> None:
    buf = SequenceBuffers(_spec(length=4), capacity=4)
    slot = np.array([2])
    for step in range(1, 11):  # 10 pushes into a ring of 4
        buf.push(slot, np.array([[step, -step]], dtype=np.float32))
    window = buf.gather(slot)[0]
    np.testing.assert_array_equal(window[:, 0], [7, 8, 9, 10])
    np.testing.assert_array_equal(window[:, 1], [-7, -8, -9, -10])


def test_missing_rows_are_nan_until_the_window_fills() -> None:
    buf = SequenceBuffers(_spec(length=3), capacity=2)
    slot = np.array([0])
    buf.push(slot, np.array([[1.0, 1.0]]))
    window = buf.gather(slot)[0]
    assert np.isnan(window[:2]).all() and (window[2] == 1.0).all()


def test_gather_of_many_slots_matches_each_slot_alone() -> None:
    rng = np.random.default_rng(0)
    buf = SequenceBuffers(_spec(length=5, width=3), capacity=8)
    history: dict[int, list[np.ndarray]] = {s: [] for s in range(50)}
    buf.ensure_capacity(50)
    for _ in range(12):
        slots = rng.choice(50, size=20, replace=False)
        rows = rng.normal(size=(20, 3)).astype(np.float32)
        buf.push(slots, rows)
        for s, r in zip(slots.tolist(), rows, strict=True):
            history[s].append(r)
    slots = np.arange(50)
    batch = buf.gather(slots)
    assert batch.shape == (50, 5, 3) and batch.dtype == np.float32
    for s in range(50):
        rows = history[s][-5:]
        expected = np.full((5, 3), np.nan, dtype=np.float32)
        if rows:
            expected[5 - len(rows) :] = np.stack(rows)
        np.testing.assert_array_equal(batch[s], expected)


def test_reset_forgets_a_slot_and_leaves_the_others() -> None:
    buf = SequenceBuffers(_spec(length=2), capacity=4)
    buf.push(np.array([0, 1]), np.ones((2, 2)))
    buf.reset(np.array([0]))
    assert np.isnan(buf.gather(np.array([0]))).all()
    assert (buf.gather(np.array([1]))[0, 1] == 1).all()


def test_growing_keeps_existing_windows() -> None:
    buf = SequenceBuffers(_spec(length=2), capacity=2)
    buf.push(np.array([1]), np.full((1, 2), 3.0))
    buf.ensure_capacity(1000)
    assert buf.capacity >= 1000
    assert (buf.gather(np.array([1]))[0, 1] == 3.0).all()
    assert np.isnan(buf.gather(np.array([999]))).all()


def test_raw_zscore_is_population_std_per_channel_and_zero_for_constant() -> None:
    spec = SequenceSpec(RAW, ("close", "volume"), 4, "zscore")
    buf = SequenceBuffers(spec, capacity=2)
    closes = [100.0, 101.0, 103.0, 102.0]
    for c in closes:
        buf.push(np.array([0]), np.array([[c, 5.0]]))
    window = buf.gather(np.array([0]))[0]
    arr = np.array(closes)
    expected = (arr - arr.mean()) / arr.std(ddof=0)
    np.testing.assert_allclose(window[:, 0], expected.astype(np.float32), rtol=1e-6)
    assert (window[:, 1] == 0).all()


def test_zscore_of_constant_tenth_is_exactly_zero() -> None:
    window = np.full((1, 3, 1), 0.1)
    assert (zscore(window) == 0).all()


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        SequenceSpec("bogus", ("a",), 2)
    with pytest.raises(ValueError):
        SequenceSpec(FEATURES, ("a",), 0)
