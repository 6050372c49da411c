"""Features: names, the pandas definition, the exact variant, FeatureBuilder and FeatureState."""

from __future__ import annotations

import uuid
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.features import (
    DEFAULT_FEATURES,
    FeatureBuilder,
    FeatureKind,
    FeatureState,
    build_features_from_prices,
    exact_reference_frame,
    parse_feature,
    reference_frame,
    reference_series,
    warmup_bars,
)

SCALES = (1e-4, 1.0, 100.0, 5e4, 1e6)


def extra_features(min_bb_window: int = 2) -> st.SearchStrategy[list[str]]:
    return st.lists(
        st.one_of(
            st.integers(1, 25).map(lambda n: f"ret_{n}d"),
            st.integers(2, 25).map(lambda n: f"vol_{n}d"),
            st.integers(1, 25).map(lambda n: f"rsi_{n}"),
            st.integers(1, 25).map(lambda n: f"ma_ratio_{n}"),
            st.integers(min_bb_window, 25).map(lambda n: f"bb_position_{n}"),
            st.just("not_a_feature"),
        ),
        max_size=6,
    )


# pandas' own rolling std is too coarse for bb_position_2 on small moves: compared to pandas,
# the parametric set leaves it out (the exact reference covers it).
PANDAS_PARAMETRIC = ["ret_3d", "vol_2d", "rsi_1", "rsi_5", "bb_position_7", "ma_ratio_1"]
PARAMETRIC = [*PANDAS_PARAMETRIC, "bb_position_2", "bb_position_3"]


def assert_within_tolerance(actual: np.ndarray, expected: np.ndarray, names: list[str]) -> None:
    """abs(a - b) <= 1e-9 + 1e-6 * abs(b), and NaN exactly where the reference is NaN."""
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    with np.errstate(invalid="ignore"):
        ok = np.where(nan_e, nan_a, np.abs(actual - expected) <= 1e-9 + 1e-6 * np.abs(expected))
    if not ok.all():
        row, col = np.argwhere(~ok)[0]
        raise AssertionError(
            f"{(~ok).sum()} values off; first: bar {row} {names[col]}: "
            f"got {actual[row, col]!r}, reference {expected[row, col]!r}"
        )


@st.composite
def tick_paths(draw: st.DrawFn, max_bars: int = 200) -> np.ndarray:
    """Prices on a tick grid at one scale: one-tick moves, runs of equal prices, big jumps."""
    scale = draw(st.sampled_from(SCALES))
    rel_tick = draw(st.sampled_from([2e-7, 1e-6, 1e-4, 1e-2]))
    bars = draw(st.integers(1, max_bars))
    p_flat = draw(st.sampled_from([0.0, 0.3, 0.9]))
    p_jump = draw(st.sampled_from([0.0, 0.02, 0.1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    start = round(1 / rel_tick)
    steps = rng.choice([-1, 1], bars) * rng.integers(1, 4, bars)
    steps[rng.random(bars) < p_flat] = 0
    jumps = rng.random(bars) < p_jump
    steps[jumps] = np.round(start * rng.uniform(-0.4, 0.6, jumps.sum()))
    ticks = np.maximum(start + np.cumsum(steps), max(1, start // 20))
    return ticks * (scale * rel_tick)


@st.composite
def smooth_paths(draw: st.DrawFn, max_bars: int = 160) -> np.ndarray:
    """Log-normal random walks at moderate volatility, where pandas' rolling sums are accurate."""
    scale = draw(st.sampled_from((1e-4, 1.0, 100.0, 5e4)))
    vol = draw(st.sampled_from([1e-3, 1e-2]))
    bars = draw(st.integers(1, max_bars))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return scale * np.exp(np.cumsum(rng.normal(0.0, vol, bars)))


def run_interleaved(
    names: list[str], paths: list[np.ndarray], resets: list[int | None], seed: int
) -> list[np.ndarray]:
    """Feed each path to its own slot, several slots per call in random order and subsets."""
    rng = np.random.default_rng(seed)
    slot_ids = rng.choice(64, size=len(paths), replace=False)
    state = FeatureState(names, capacity=1)
    state.ensure_capacity(int(slot_ids.max()) + 1)
    position = [0] * len(paths)
    rows: list[list[np.ndarray]] = [[] for _ in paths]
    while True:
        active = [i for i, p in enumerate(paths) if position[i] < len(p)]
        if not active:
            break
        chosen = [i for i in active if rng.random() < 0.7] or active[:1]
        chosen = list(rng.permutation(chosen))
        for i in chosen:
            if resets[i] is not None and position[i] == resets[i]:
                state.reset(np.array([slot_ids[i]]))
        closes = np.array([paths[i][position[i]] for i in chosen])
        out = state.update(slot_ids[chosen], closes)
        assert out.shape == (len(chosen), len(names)) and out.dtype == np.float64
        for row, i in enumerate(chosen):
            rows[i].append(out[row])
            position[i] += 1
    return [np.array(r).reshape(len(p), len(names)) for r, p in zip(rows, paths, strict=True)]


def reference_for(path: np.ndarray, names: list[str], reset: int | None, exact: bool) -> np.ndarray:
    """The reference over each segment of the slot's history (a reset starts a new one)."""
    frame = exact_reference_frame if exact else _pandas_frame
    cut = [0, reset, len(path)] if reset else [0, len(path)]
    parts = [frame(path[a:b], names).to_numpy() for a, b in zip(cut, cut[1:], strict=False)]
    return np.concatenate(parts)


def _pandas_frame(close: np.ndarray, names: list[str]) -> pd.DataFrame:
    return reference_frame(pd.Series(close), names)


# ---- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "window"),
    [
        ("ret_1d", FeatureKind.RET, 1),
        ("ret_20d", FeatureKind.RET, 20),
        ("vol_2d", FeatureKind.VOL, 2),
        ("rsi_1", FeatureKind.RSI, 1),
        ("rsi_14", FeatureKind.RSI, 14),
        ("ma_ratio_1", FeatureKind.MA_RATIO, 1),
        ("ma_ratio_20", FeatureKind.MA_RATIO, 20),
        ("bb_position", FeatureKind.BB_POSITION, 20),
        ("bb_position_7", FeatureKind.BB_POSITION, 7),
    ],
)
def test_parse_known_names(name: str, kind: FeatureKind, window: int) -> None:
    spec = parse_feature(name)
    assert spec is not None and (spec.name, spec.kind, spec.window) == (name, kind, window)


@pytest.mark.parametrize(
    "name",
    ["", "foo", "ret_0d", "ret_d", "ret_5", "ret_05d", "RET_1D", "vol_1d", "rsi_0", "rsi",
     "ma_ratio", "bb_position_1", "bb_position_", "ma_ratio_20x", " rsi_14", "ret_10001d"],
)  # fmt: skip
def test_unknown_names_parse_to_none(name: str) -> None:
    assert parse_feature(name) is None
    with pytest.raises(ValueError, match="unknown feature"):
        warmup_bars(name)


WARMUP_NAMES = [*DEFAULT_FEATURES, *PARAMETRIC, "ret_25d", "vol_25d", "rsi_2", "ma_ratio_25"]


@pytest.mark.parametrize("name", WARMUP_NAMES)
def test_warmup_bars_is_the_first_non_nan_bar_of_pandas(name: str) -> None:
    rng = np.random.default_rng(7)
    close = pd.Series(100 * np.exp(np.cumsum(rng.normal(0, 0.01, 80))))
    values = reference_series(close, name).to_numpy()
    first = int(np.flatnonzero(~np.isnan(values))[0])
    assert first + 1 == warmup_bars(name)
    assert not np.isnan(values[first:]).any()
    state = FeatureState([name])
    got = np.array([state.update(np.array([0]), np.array([c]))[0, 0] for c in close])
    assert np.isnan(got[:first]).all() and not np.isnan(got[first:]).any()


def test_documented_warmups() -> None:
    assert [warmup_bars(n) for n in DEFAULT_FEATURES] == [2, 6, 11, 21, 11, 21, 14, 20, 20]
    assert (warmup_bars("rsi_1"), warmup_bars("ma_ratio_1"), warmup_bars("vol_2d")) == (2, 1, 3)


# ---- the references ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(path=smooth_paths(), extra=extra_features(min_bb_window=5))
def test_exact_reference_equals_pandas_where_pandas_is_accurate(
    path: np.ndarray, extra: list[str]
) -> None:
    names = [*DEFAULT_FEATURES, *PANDAS_PARAMETRIC, *extra]
    expected = reference_frame(pd.Series(path), names).to_numpy()
    assert_within_tolerance(exact_reference_frame(path, names).to_numpy(), expected, names)


def _fraction_mean_std(window: np.ndarray) -> tuple[float, float]:
    values = [Fraction(float(v)) for v in window]
    mean = sum(values, Fraction(0)) / len(values)
    var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / (len(values) - 1)
    return float(mean), float(var) ** 0.5


def test_exact_reference_agrees_with_rational_arithmetic_at_5e4_with_tick_moves() -> None:
    rng = np.random.default_rng(3)
    close = 50_000 + 0.01 * np.cumsum(rng.choice([-1, 0, 1], 300))
    close[150] += 2_000.0  # a jump that later leaves the window
    frame = exact_reference_frame(close, ["bb_position", "ma_ratio_20"])
    for end in range(19, 300, 7):
        mean, std = _fraction_mean_std(close[end - 19 : end + 1])
        c = close[end]
        bb = (c - (mean - 2 * std)) / ((mean + 2 * std) - (mean - 2 * std)) if std else np.nan
        got = frame.iloc[end].to_numpy()
        if np.isnan(bb):
            assert np.isnan(got[0])
        else:
            assert abs(got[0] - bb) <= 1e-9 * max(1.0, abs(bb))
        assert abs(got[1] - (c / mean - 1)) <= 1e-13


def _fraction_bb(window: np.ndarray) -> float:
    """bb_position of the window's last price in rational arithmetic (std rounded once)."""
    values = [Fraction(float(v)) for v in window]
    mean = sum(values, Fraction(0)) / len(values)
    var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / (len(values) - 1)
    if var == 0:
        return float("nan")
    std = float(var) ** 0.5
    return (float(values[-1] - mean) + 2 * std) / (4 * std)


def test_bb_position_at_1e6_with_one_cent_moves_is_the_exact_window_value() -> None:
    # c - m at 1e6 where the window's prices agree to the cent: taken as the difference of
    # two rounded prices it is off by ~1e-10, which a std of a few cents turns into 3e-6 of
    # the value. Found by an independent audit at bar ~30,000 of a million; here the window
    # it found, then a walk, against rational arithmetic, state and exact reference both.
    found = np.array([999998.85] * 5 + [999998.84, 999998.8300000001])
    rng = np.random.default_rng(8)
    walk = 1e6 + 0.01 * np.cumsum(rng.choice([-1, 0, 0, 1], 3_000))
    for close in (found, walk):
        names = ["bb_position_7", "bb_position"]
        state = FeatureState(names, capacity=1)
        got = np.array([state.update(np.array([0]), np.array([c]))[0] for c in close])
        exact = exact_reference_frame(close, names).to_numpy()
        for col, n in enumerate((7, 20)):
            for end in range(n - 1, len(close)):
                truth = _fraction_bb(close[end - n + 1 : end + 1])
                for value in (got[end, col], exact[end, col]):
                    if np.isnan(truth):
                        assert np.isnan(value)
                    else:
                        assert abs(value - truth) <= 1e-9 + 1e-6 * abs(truth), (n, end)


def test_pandas_rolling_std_drifts_where_the_exact_reference_does_not() -> None:
    """Why the exact variant exists: after a big value leaves the window, pandas is off."""
    rng = np.random.default_rng(5)
    close = 50_000 + 0.01 * np.cumsum(rng.choice([-1, 1], 400))
    close[100:110] += 5_000.0
    exact = exact_reference_frame(close, ["bb_position"]).to_numpy()[:, 0]
    pandas = reference_series(pd.Series(close), "bb_position").to_numpy()
    truth = []
    for end in range(200, 400):
        mean, std = _fraction_mean_std(close[end - 19 : end + 1])
        c = close[end]
        truth.append((c - (mean - 2 * std)) / ((mean + 2 * std) - (mean - 2 * std)))
    assert np.max(np.abs(exact[200:] - truth)) < 1e-9
    assert np.max(np.abs(pandas[200:] - truth)) > 1e-6


def test_edge_values_follow_pandas() -> None:
    """Constant windows: std exactly 0 (bb 0/0 = NaN), RSI 0/0 = NaN; monotone: RSI 100 or 0."""
    flat = pd.Series([7.0] * 30)
    rising = pd.Series(np.arange(1.0, 31.0))
    falling = pd.Series(np.arange(31.0, 1.0, -1.0))
    names = ["rsi_14", "bb_position", "ma_ratio_20", "vol_10d", "ret_5d"]
    for close in (flat, rising, falling):
        expected = reference_frame(close, names).to_numpy()
        assert_within_tolerance(exact_reference_frame(close, names).to_numpy(), expected, names)
        state = FeatureState(names)
        got = np.vstack([state.update(np.array([0]), np.array([c])) for c in close])
        assert_within_tolerance(got, expected, names)
        np.testing.assert_array_equal(got[:, 0], expected[:, 0])  # RSI edges exactly
    state = FeatureState(names)
    last = [state.update(np.array([0]), np.array([c]))[0] for c in flat][-1]
    assert np.isnan(last[0]) and np.isnan(last[1]) and last[2] == 0 and last[3] == 0
    assert reference_series(rising, "rsi_14").iloc[-1] == 100
    assert reference_series(falling, "rsi_14").iloc[-1] == 0


# ---- FeatureBuilder ---------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(path=smooth_paths(max_bars=60), column=st.sampled_from(["Close", "close", "CLOSE"]))
def test_builder_gives_the_last_reference_row(path: np.ndarray, column: str) -> None:
    names = [*DEFAULT_FEATURES, "bb_position_7", "no_such_feature"]
    frame = pd.DataFrame({"Open": path, column: path, "Volume": 1.0})
    got = FeatureBuilder(names).build_features(frame)
    # The definition computed exactly over each window, over the whole history (the builder
    # looks at the last closes only), and the pandas reference within the contract's tolerance.
    exact = exact_reference_frame(pd.Series(path), names).iloc[-1].to_numpy()
    pandas_row = reference_frame(pd.Series(path), names).iloc[-1].to_numpy()
    assert got.dtype == np.float32 and got.shape == (len(names),)
    np.testing.assert_array_equal(got, exact.astype(np.float32))
    np.testing.assert_allclose(got, pandas_row, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
        FeatureBuilder(names).build_features_pandas(frame), pandas_row.astype(np.float32)
    )
    np.testing.assert_array_equal(build_features_from_prices(frame, names), got)
    assert np.isnan(got[-1])


@pytest.mark.parametrize("bars", [14, 15, 16, 40])
@pytest.mark.parametrize(
    "names", [["rsi_14", "ret_5d"], ["rsi_14", "ret_5d", "vol_10d", "bb_position", "rsi_3"]]
)
def test_builder_on_a_long_history_reads_its_tail_exactly(bars: int, names: list[str]) -> None:
    # rsi_14 is defined from the 14th bar, the history's first difference counting as 0: the
    # builder's tail must not turn a real first difference of its own into that 0.
    rng = np.random.default_rng(bars)
    path = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, bars)))
    got = FeatureBuilder(names).build_features(pd.Series(path))
    want = exact_reference_frame(pd.Series(path), names).iloc[-1].to_numpy().astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_builder_gives_nan_where_the_daemon_does_on_a_flat_window_after_a_move() -> None:
    # pandas' rolling std leaves ~1e-8 on ten equal closes after a move: its bb_position is
    # 0.5; the definition is 0/0, NaN, and that is what the daemon's state gives.
    closes = np.array([99.99] + [100.01] * 11)
    names = ["bb_position_10", "vol_10d", "ma_ratio_10"]
    got = FeatureBuilder(names).build_features(pd.Series(closes))
    state = FeatureState(names)
    daemon = [state.update(np.array([0]), np.array([c]))[0] for c in closes][-1]
    assert np.isnan(got[0]) and np.isnan(daemon[0])
    np.testing.assert_array_equal(got[1:], np.asarray(daemon[1:], dtype=np.float32))
    assert FeatureBuilder(names).build_features_pandas(pd.Series(closes))[0] == 0.5


def test_builder_on_an_empty_frame_and_without_a_close_column() -> None:
    got = FeatureBuilder(["ret_1d"]).build_features(pd.DataFrame({"close": []}))
    assert got.shape == (1,) and np.isnan(got).all()
    with pytest.raises(KeyError, match="close"):
        FeatureBuilder(["ret_1d"]).build_features(pd.DataFrame({"open": [1.0]}))


def test_unknown_names_are_logged_once_per_name(caplog: pytest.LogCaptureFixture) -> None:
    name = f"mystery_{uuid.uuid4().hex[:8]}"
    with caplog.at_level("WARNING", logger="livepred.features"):
        FeatureBuilder([name, "ret_1d"])
        FeatureState([name])
        reference_series(pd.Series([1.0, 2.0]), name)
    assert [r.getMessage() for r in caplog.records if name in r.getMessage()] == [
        f"unknown feature {name!r}: its value is NaN"
    ]


# ---- FeatureState -----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    paths=st.lists(tick_paths(), min_size=1, max_size=4),
    extra=extra_features(),
    data=st.data(),
)
def test_state_matches_the_exact_reference_after_every_bar(
    paths: list[np.ndarray], extra: list[str], data: st.DataObject
) -> None:
    names = [*DEFAULT_FEATURES, *extra]
    resets = [
        data.draw(st.one_of(st.none(), st.integers(0, len(p) - 1)), label="reset") for p in paths
    ]
    got = run_interleaved(names, paths, resets, seed=data.draw(st.integers(0, 2**32 - 1)))
    for path, reset, values in zip(paths, resets, got, strict=True):
        assert_within_tolerance(values, reference_for(path, names, reset, exact=True), names)


@settings(max_examples=50, deadline=None)
@given(paths=st.lists(smooth_paths(), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_state_matches_pandas_at_moderate_scales(paths: list[np.ndarray], seed: int) -> None:
    names = [*DEFAULT_FEATURES, *PANDAS_PARAMETRIC]
    got = run_interleaved(names, paths, [None] * len(paths), seed)
    for path, values in zip(paths, got, strict=True):
        assert_within_tolerance(values, reference_for(path, names, None, exact=False), names)


def test_parametric_features_at_every_scale() -> None:
    names = [*DEFAULT_FEATURES, *PARAMETRIC]
    rng = np.random.default_rng(11)
    paths = []
    for scale in SCALES:
        ticks = 1_000_000 + np.cumsum(rng.choice([-1, 0, 0, 1], 300))
        ticks[120:140] += 80_000  # a jump in and out
        paths.append(ticks * (scale * 1e-6))
    got = run_interleaved(names, paths, [None, 150, None, 40, None], seed=1)
    for path, reset, values in zip(paths, [None, 150, None, 40, None], got, strict=True):
        assert_within_tolerance(values, reference_for(path, names, reset, exact=True), names)


def test_growing_capacity_keeps_every_slot() -> None:
    rng = np.random.default_rng(2)
    paths = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (3, 60)), axis=1))
    state = FeatureState(DEFAULT_FEATURES, capacity=2)
    out = np.empty((3, 60, len(DEFAULT_FEATURES)))
    slots = np.array([0, 1, 2])
    for t in range(60):
        if t == 30:
            state.ensure_capacity(5000)
            assert state.capacity >= 5000
        if t == 0:
            state.ensure_capacity(3)
        out[:, t] = state.update(slots, paths[:, t])
    for i in range(3):
        expected = exact_reference_frame(paths[i], DEFAULT_FEATURES).to_numpy()
        assert_within_tolerance(out[i], expected, list(DEFAULT_FEATURES))


def test_update_contract() -> None:
    state = FeatureState(["ret_1d", "nope", "rsi_3"], capacity=4)
    assert state.names == ("ret_1d", "nope", "rsi_3") and state.unknown == ("nope",)
    empty = state.update(np.array([], dtype=np.int64), np.array([]))
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="twice"):
        state.update(np.array([1, 1]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        state.update(np.array([1, 2]), np.array([1.0]))
    out = state.update(np.array([3, 1]), np.array([10.0, 20.0]))
    assert np.isnan(out).all()  # nothing warm after one bar, unknown always NaN
    out = state.update(np.array([1, 3]), np.array([22.0, 11.0]))
    np.testing.assert_allclose(out[:, 0], [0.1, 0.1])
    assert np.isnan(out[:, 1]).all()
    assert state.bars_seen(np.array([1, 3, 0])).tolist() == [2, 2, 0]
    state.reset(np.array([1]))
    assert state.bars_seen(np.array([1])).tolist() == [0]
    assert np.isnan(state.update(np.array([1]), np.array([5.0]))).all()


def test_no_features_and_only_unknown_features() -> None:
    for names in ([], ["x", "y"]):
        state = FeatureState(names)
        out = state.update(np.arange(3), np.array([1.0, 2.0, 3.0]))
        assert out.shape == (3, len(names)) and np.isnan(out).all()


def test_memory_per_slot_grows_with_the_windows() -> None:
    small = FeatureState(["ret_1d"]).nbytes_per_slot()
    default = FeatureState(DEFAULT_FEATURES).nbytes_per_slot()
    assert 0 < small < default < 4096


def test_a_batch_bigger_than_one_chunk() -> None:
    """Batches over 4096 slots are updated in parts; duplicates are caught across parts."""
    rng = np.random.default_rng(4)
    slots, bars = 5000, 30
    closes = 50_000 + 0.01 * np.cumsum(rng.choice([-1, 0, 1], (bars, slots)), axis=0)
    ids = rng.permutation(slots)
    state = FeatureState(DEFAULT_FEATURES, capacity=slots)
    out = np.stack([state.update(ids, row) for row in closes])
    for i in (0, 4095, 4096, 4999):
        expected = exact_reference_frame(closes[:, i], DEFAULT_FEATURES).to_numpy()
        assert_within_tolerance(out[:, i], expected, list(DEFAULT_FEATURES))
    with pytest.raises(ValueError, match="twice"):
        state.update(np.r_[ids, ids[:1]], np.r_[closes[0], 1.0])
