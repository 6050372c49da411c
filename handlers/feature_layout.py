"""Where a feature state keeps what: the channels, window groups and summed quantities a list of
features needs, and the output column each feature reads (computed once, from the specs)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from handlers.features_ref import FeatureKind, FeatureSpec

# The channel a windowed feature sums over: closes, 1-bar returns, or RSI gains/losses.
CHANNEL_KINDS = {
    FeatureKind.MA_RATIO: "close",
    FeatureKind.BB_POSITION: "close",
    FeatureKind.VOL: "ret",
    FeatureKind.RSI: "rsi",
}
# The output each kind of feature is read from ("ret1": the 1-bar return, "lag": ret_Nd).
OUTPUT_KEYS = {
    FeatureKind.RET: "lag",
    FeatureKind.VOL: "vol",
    FeatureKind.RSI: "rsi",
    FeatureKind.MA_RATIO: "ma",
    FeatureKind.BB_POSITION: "bb",
}


class WindowGroup:
    """The windows of one length N: one block schedule, one front region.

    Up to three channels: closes (ma_ratio_N, bb_position_N), 1-bar returns (vol_Nd), RSI
    gains/losses (rsi_N). A channel sums two quantities (d and d*d of its shifted values, or
    gains and losses); the front stores per slot and block offset the group's Q quantities.
    """

    __slots__ = ("window", "close", "ret", "rsi", "width", "lags", "quantities", "shift")

    def __init__(self, window: int) -> None:
        self.window = window
        self.close = self.ret = self.rsi = -1  # the channel's index among its kind, or -1
        self.width = 0  # Q
        self.lags = np.arange(-window, 0)[:, None]
        self.quantities = np.zeros((0, 1), dtype=np.int64)  # in accumulator order
        self.shift = np.zeros((0, 1), dtype=np.int64)  # its shifted channels


class FeatureLayout:
    """The plan of a feature state for `specs` (None: an unknown feature, no channel).

    Channels: closes, then returns (together the "shifted" channels: summed as v - K), then
    RSI; each by window. Quantities in accumulator order: d of each shifted channel, d*d of
    each, gains of each RSI channel, losses of each. Accumulator rows: the block phase per
    group (`k0` rows), K per shifted channel, then the quantities' back sums (from `q0`).
    """

    def __init__(self, specs: Sequence[FeatureSpec | None]) -> None:
        known = [s for s in specs if s is not None]
        # A power of two longer than the longest window: ring positions are `t & (len - 1)`.
        self.ring_len = 1 << max([s.window for s in known] + [1]).bit_length()
        self._plan_channels(specs, known)
        self._plan_groups()

    def _plan_channels(self, specs: Sequence[FeatureSpec | None], known: list[FeatureSpec]) -> None:
        """Channels by kind and window, and each output's columns and channel (or lag) indices."""
        windows = {
            kind: sorted({s.window for s in known if CHANNEL_KINDS.get(s.kind) == kind})
            for kind in ("close", "ret", "rsi")
        }
        self.lag_list = sorted({s.window for s in known if s.kind is FeatureKind.RET} - {1})
        self.lags = np.array(self.lag_list, dtype=np.int64)[:, None]
        self.n_close = len(windows["close"])
        self.n_shifted = self.n_close + len(windows["ret"])
        self.n_rsi = len(windows["rsi"])
        self.channel = {
            "close": {n: i for i, n in enumerate(windows["close"])},
            "ret": {n: self.n_close + i for i, n in enumerate(windows["ret"])},
            "rsi": {n: i for i, n in enumerate(windows["rsi"])},
        }
        shift_windows = windows["close"] + windows["ret"]
        self.shift_window = np.array(shift_windows, dtype=np.float64)[:, None]
        outputs: dict[str, tuple[list[int], list[int]]] = {}
        for col, spec in enumerate(specs):
            if spec is None:
                continue
            key = OUTPUT_KEYS[spec.kind]
            if spec.kind is not FeatureKind.RET:
                index = self.channel[CHANNEL_KINDS[spec.kind]][spec.window]
            elif spec.window == 1:
                key, index = "ret1", 0
            else:
                index = self.lag_list.index(spec.window)
            cols, indices = outputs.setdefault(key, ([], []))
            cols.append(col)
            indices.append(index)
        # output key -> (columns, channel or lag indices)
        self.outputs = {k: (c, np.array(i, dtype=np.int64)) for k, (c, i) in outputs.items()}

    def _plan_groups(self) -> None:
        """Groups by window length; accumulator rows; which group and place each quantity has."""
        n_sh, n_rsi = self.n_shifted, self.n_rsi
        windows = sorted({n for kind in self.channel.values() for n in kind})
        self.groups = [WindowGroup(n) for n in windows]
        q_group = [0] * (2 * n_sh + 2 * n_rsi)
        q_in_group = [0] * len(q_group)
        for g, grp in enumerate(self.groups):
            grp.close = self.channel["close"].get(grp.window, -1)
            grp.ret = self.channel["ret"].get(grp.window, -1)
            grp.rsi = self.channel["rsi"].get(grp.window, -1)
            shifted = [c for c in (grp.close, grp.ret) if c >= 0]
            members = [q for c in shifted for q in (c, n_sh + c)]
            if grp.rsi >= 0:
                members += [2 * n_sh + grp.rsi, 2 * n_sh + n_rsi + grp.rsi]
            grp.width = len(members)
            grp.quantities = np.array(members, dtype=np.int64)[:, None]
            grp.shift = np.array(shifted, dtype=np.int64)[:, None]
            for k, q in enumerate(members):
                q_group[q], q_in_group[q] = g, k
        self.q_group = np.array(q_group, dtype=np.int64)
        self.q_in_group = np.array(q_in_group, dtype=np.int64)[:, None]
        self.q_window = np.array([windows[g] for g in q_group], dtype=np.int64)[:, None]
        self.q_width = np.array([self.groups[g].width for g in q_group], dtype=np.int64)[:, None]
        self.group_window = np.array(windows, dtype=np.float64)[:, None]
        self.k0 = len(self.groups)
        self.q0 = self.k0 + n_sh
        self.acc_rows = self.q0 + len(q_group)

    def front_sizes(self) -> list[int]:
        """Per group, the front values one slot holds (N block offsets x Q quantities)."""
        return [g.window * g.width for g in self.groups]
