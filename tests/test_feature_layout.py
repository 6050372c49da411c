"""The feature state's layout: channels, window groups, accumulator rows, output columns."""

from __future__ import annotations

import numpy as np

from handlers.feature_layout import FeatureLayout
from handlers.features import parse_feature

NAMES = [
    "ret_1d",  # 0: the 1-bar return
    "ret_5d",  # 1: lag 5
    "vol_10d",  # 2: returns, window 10
    "vol_20d",  # 3: returns, window 20
    "rsi_14",  # 4: RSI, window 14
    "ma_ratio_20",  # 5: closes, window 20
    "bb_position",  # 6: closes, window 20 (the default)
    "bb_position_10",  # 7: closes, window 10
    "no_such_feature",  # 8: unknown
]


def layout_of(names: list[str]) -> FeatureLayout:
    return FeatureLayout([parse_feature(n) for n in names])


def test_channels_by_kind_and_window() -> None:
    lay = layout_of(NAMES)
    # closes at windows 10 and 20, then returns at 10 and 20 (after the closes), RSI at 14
    assert lay.channel == {"close": {10: 0, 20: 1}, "ret": {10: 2, 20: 3}, "rsi": {14: 0}}
    assert (lay.n_close, lay.n_shifted, lay.n_rsi) == (2, 4, 1)
    assert lay.lag_list == [5]
    assert lay.shift_window.ravel().tolist() == [10.0, 20.0, 10.0, 20.0]
    assert lay.ring_len == 32  # a power of two longer than the longest window (20)


def test_every_known_column_is_read_from_exactly_one_output() -> None:
    lay = layout_of(NAMES)
    expected = {
        "ret1": ([0], [0]),
        "lag": ([1], [0]),
        "vol": ([2, 3], [2, 3]),
        "rsi": ([4], [0]),
        "ma": ([5], [1]),
        "bb": ([6, 7], [1, 0]),
    }
    got = {key: (cols, idx.tolist()) for key, (cols, idx) in lay.outputs.items()}
    assert got == expected
    columns = sorted(c for cols, _ in lay.outputs.values() for c in cols)
    assert columns == list(range(8))  # the unknown column 8 is in none


def test_groups_and_their_quantities() -> None:
    lay = layout_of(NAMES)
    assert [g.window for g in lay.groups] == [10, 14, 20]
    g10, g14, g20 = lay.groups
    assert (g10.close, g10.ret, g10.rsi, g10.width) == (0, 2, -1, 4)
    assert (g14.close, g14.ret, g14.rsi, g14.width) == (-1, -1, 0, 2)
    assert (g20.close, g20.ret, g20.rsi, g20.width) == (1, 3, -1, 4)
    # quantities: d of the 4 shifted channels (0-3), d*d (4-7), RSI gains (8), losses (9)
    assert g10.quantities.ravel().tolist() == [0, 4, 2, 6]
    assert g14.quantities.ravel().tolist() == [8, 9]
    assert g20.quantities.ravel().tolist() == [1, 5, 3, 7]
    for g, grp in enumerate(lay.groups):
        for k, q in enumerate(grp.quantities.ravel()):
            assert lay.q_group[q] == g
            assert lay.q_in_group[q, 0] == k
            assert lay.q_window[q, 0] == grp.window
            assert lay.q_width[q, 0] == grp.width
    # rows: a block phase per group, K per shifted channel, a back sum per quantity
    assert (lay.k0, lay.q0, lay.acc_rows) == (3, 7, 17)
    assert lay.front_sizes() == [40, 28, 80]


def test_returns_only_and_unknown_only_need_no_groups() -> None:
    lay = layout_of(["ret_1d", "ret_10d", "ret_3d"])
    assert lay.groups == [] and lay.acc_rows == 0 and lay.front_sizes() == []
    assert lay.lag_list == [3, 10]
    assert lay.outputs["lag"][0] == [1, 2] and lay.outputs["lag"][1].tolist() == [1, 0]
    assert lay.ring_len == 16
    empty = layout_of(["nothing_known"])
    assert empty.outputs == {} and empty.groups == [] and empty.ring_len == 2
    assert np.asarray(empty.lags).size == 0
