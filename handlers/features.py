"""Feature state: the features of CONTRACT section 3, updated in O(1) per bar, vectorised over slots.

The definitions (pandas reference, exact variant, FeatureBuilder) live in `features_ref` and are
re-exported here; which channels, windows and sums a list of features needs, in `feature_layout`.

Stability: within 1e-6 rel / 1e-9 abs of the exact window value at any price scale, over any
number of bars. No rolling sum ever subtracts the element leaving its window. A window of N bars
is cut by the slot's bar count into blocks of N; its sum is `front[o] + back`: `back` sums the
current block from zero, `front[o]` is a suffix sum of the previous block, recomputed from the
close ring when a block starts (N work every N bars: amortised O(1)). A sum thus carries at
most ~2N roundings whatever came before: nothing drifts, and the state is a function of the last
2N bars only. Sums for a std are of `v - K`, K being the value at the block's first bar, which
lies in every window of that block: S2 stays within ~N times the window's own spread squared
(no cancellation at price 5e4 with 0.01 moves), and a constant window sums exact zeros, so its
mean is exactly K and its std exactly 0, as pandas gives (bb_position: 0/0 = NaN). RSI sums
non-negative gains and losses unshifted; a window without losses sums to exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from handlers.feature_layout import FeatureLayout
from handlers.features_ref import (
    BB_DEFAULT_WINDOW,
    DEFAULT_FEATURES,
    MAX_WINDOW,
    FeatureBuilder,
    FeatureKind,
    FeatureSpec,
    build_features_from_prices,
    close_column,
    exact_reference_frame,
    log_unknown,
    parse_feature,
    reference_frame,
    reference_series,
    warmup_bars,
)

__all__ = [
    "BB_DEFAULT_WINDOW",
    "DEFAULT_FEATURES",
    "MAX_WINDOW",
    "FeatureBuilder",
    "FeatureKind",
    "FeatureSpec",
    "FeatureState",
    "build_features_from_prices",
    "close_column",
    "exact_reference_frame",
    "parse_feature",
    "reference_frame",
    "reference_series",
    "warmup_bars",
]

_NEVER = np.iinfo(np.int64).max // 4  # warm-up of an unknown feature: never
# Bigger batches are updated in parts of this many slots: the temporaries stay in cache
# (about twice as fast per slot at 100k slots).
_CHUNK_SLOTS = 4096


class FeatureState:
    """Per-slot state of a fixed list of features, updated a batch of (slot, close) at a time.

    `update` appends one close to each given slot's history and returns every feature after
    it. Slots are independent; `reset` starts slots afresh (O(1) per slot). Slot indices must
    be in [0, capacity) (call `ensure_capacity` first) and unique within one call: split a
    batch where a symbol repeats into successive calls, in order (checked: ValueError).

    Per slot: a ring of the last closes (a power of two > the longest window), the bar count,
    an accumulator row (per window length its block phase; per shifted channel its K; per
    summed quantity its `back` sum), and per window length the previous block's suffix sums.
    """

    def __init__(self, names: Sequence[str], capacity: int = 1024) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.specs: tuple[FeatureSpec | None, ...] = tuple(parse_feature(n) for n in self.names)
        self.unknown: tuple[str, ...] = tuple(
            n for n, s in zip(self.names, self.specs, strict=True) if s is None
        )
        log_unknown(self.unknown)
        self._warmup = np.array(
            [s.warmup_bars if s is not None else _NEVER for s in self.specs], dtype=np.int64
        )[:, None]
        self._max_warmup = int(self._warmup.max(initial=0))
        self._unknown_cols = [i for i, s in enumerate(self.specs) if s is None]
        self._layout = FeatureLayout(self.specs)
        self._front_start = [0] * len(self._layout.groups)  # each group's region in `_front`
        self._capacity = 0
        self._ring = np.zeros(0)
        self._nbars = np.zeros(0, dtype=np.int64)
        self._mark = np.zeros(0, dtype=np.int64)
        self._acc = np.zeros((0, self._layout.acc_rows))
        self._front = np.zeros(0)
        self.ensure_capacity(max(int(capacity), 1))

    # ---- capacity -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def ensure_capacity(self, n_slots: int) -> None:
        """Make room for slots 0..n_slots-1 (amortised doubling); existing state is kept."""
        if n_slots <= self._capacity:
            return
        old, new = self._capacity, max(int(n_slots), 2 * self._capacity)
        ring = np.ones(new * self._layout.ring_len)
        ring[: old * self._layout.ring_len] = self._ring
        self._ring = ring
        self._nbars = _grown(self._nbars, new)
        self._mark = _grown(self._mark, new)
        self._acc = _grown(self._acc, new)
        # One flat array; group g owns [start, start + capacity * N * Q), laid out (slot, N, Q).
        lay = self._layout
        sizes = lay.front_sizes()
        front = np.zeros(new * sum(sizes))
        start = 0
        for g, size in enumerate(sizes):
            was = self._front_start[g]
            front[start : start + old * size] = self._front[was : was + old * size]
            self._front_start[g] = start
            start += new * size
        self._front = front
        self._front_base = (
            np.array(self._front_start, dtype=np.int64)[lay.q_group][:, None] + lay.q_in_group
        )
        self._capacity = new

    def nbytes_per_slot(self) -> int:
        """Bytes of state one slot costs."""
        fronts = sum(self._layout.front_sizes())
        return 8 * (self._layout.ring_len + 2 + self._layout.acc_rows + fronts)

    def reset(self, slots: np.ndarray) -> None:
        """Start these slots afresh: their next close is bar 0 of a new history."""
        slots = np.asarray(slots, dtype=np.int64)
        self._nbars[slots] = 0
        self._acc[slots, : self._layout.k0] = 0.0  # block phases

    def bars_seen(self, slots: np.ndarray) -> np.ndarray:
        """Closes appended to each slot since its last reset."""
        return self._nbars[np.asarray(slots, dtype=np.int64)]

    # ---- the update ---------------------------------------------------------------------

    def update(self, slots: np.ndarray, closes: np.ndarray) -> np.ndarray:
        """Append closes[i] to slot slots[i]; float64 (len(slots), len(names)) features after it."""
        slots = np.asarray(slots, dtype=np.int64)
        x = np.asarray(closes, dtype=np.float64)
        size = slots.shape[0]
        if x.shape != (size,):
            raise ValueError(f"closes has shape {x.shape}, expected ({size},)")
        if size > 1:
            order = np.arange(size)
            self._mark[slots] = order
            if (self._mark[slots] != order).any():
                raise ValueError("a slot appears twice in one update: split the batch")
        if size <= _CHUNK_SLOTS:
            return self._update(slots, x).T.copy()
        result = np.empty((size, len(self.names)))
        for start in range(0, size, _CHUNK_SLOTS):
            part = slice(start, start + _CHUNK_SLOTS)
            result[part] = self._update(slots[part], x[part]).T
        return result

    def _update(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """`update` for unique slots; (F, B): one contiguous row per feature."""
        out = np.empty((len(self.names), len(slots)))
        if len(slots) == 0:
            return out
        mask = self._layout.ring_len - 1
        ring = self._ring
        t = self._nbars[slots]  # this close's bar index in the slot's history
        self._nbars[slots] = t + 1
        base = slots * self._layout.ring_len
        ring[base + (t & mask)] = x
        prev = ring[base + ((t - 1) & mask)]
        first = t == 0
        if first.any():
            prev[first] = x[first]  # bar 0 has no diff: pandas counts it as 0
        outputs = self._layout.outputs
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ret1 = x / prev
            ret1 -= 1
            if "ret1" in outputs:
                out[outputs["ret1"][0]] = ret1
            if "lag" in outputs:
                back = (t - self._layout.lags) & mask
                back += base
                value = x / ring[back]
                value -= 1
                out[outputs["lag"][0]] = value[outputs["lag"][1]]
            if self._layout.groups:
                self._window_features(out, slots, t, x, prev, ret1)
        if self._unknown_cols:
            out[self._unknown_cols] = np.nan
        if int(t.min()) + 1 < self._max_warmup:
            out[t + 1 < self._warmup] = np.nan
        return out

    def _window_features(
        self,
        out: np.ndarray,
        slots: np.ndarray,
        t: np.ndarray,
        x: np.ndarray,
        prev: np.ndarray,
        ret1: np.ndarray,
    ) -> None:
        lay = self._layout
        n_close, n_sh, n_rsi = lay.n_close, lay.n_shifted, lay.n_rsi
        k0, q0 = lay.k0, lay.q0
        acc = self._acc.take(slots, axis=0).T.copy()  # (rows, B), one contiguous row each
        shift, sums_back = acc[k0:q0], acc[q0:]
        values = np.empty((n_sh, len(slots)))  # this bar's element of each shifted channel
        values[:n_close] = x
        values[n_close:] = ret1
        phase = acc[:k0]  # position of this bar in its block, per window length
        starts = phase == 0
        if starts.any():
            for g in np.flatnonzero(starts.any(axis=1)):
                rows = starts[g].nonzero()[0]
                self._restart(int(g), acc, slots, t, rows, x, ret1, values)
        phase += 1  # becomes the front offset: where the window starts in the last block
        phase[phase == lay.group_window] = 0
        following = phase.astype(np.int64)
        if n_sh:
            values -= shift
            sums_back[:n_sh] += values
            values *= values
            sums_back[n_sh : 2 * n_sh] += values
        if n_rsi:
            diff = x - prev
            sums_back[2 * n_sh : 2 * n_sh + n_rsi] += np.maximum(diff, 0.0)
            np.negative(diff, out=diff)
            sums_back[2 * n_sh + n_rsi :] += np.maximum(diff, 0.0)
        self._acc[slots] = acc.T
        # Window sums = suffix of the previous block (offset 0: empty) + this block so far.
        index = lay.q_window * slots
        index += following[lay.q_group]
        index *= lay.q_width
        index += self._front_base
        sums = self._front.take(index)
        sums += sums_back
        outputs = lay.outputs
        if n_sh:
            s1, s2 = sums[:n_sh], sums[n_sh : 2 * n_sh]
            offset = s1 / lay.shift_window  # the window's mean minus K
            mean = offset + shift
            std = s1 * s1
            std /= lay.shift_window
            np.subtract(s2, std, out=std)
            np.maximum(std, 0.0, out=std)
            std /= lay.shift_window - 1
            np.sqrt(std, out=std)
            if "vol" in outputs:
                out[outputs["vol"][0]] = std[outputs["vol"][1]]
            if "ma" in outputs:
                ratio = x / mean[outputs["ma"][1]]
                ratio -= 1
                out[outputs["ma"][0]] = ratio
            if "bb" in outputs:
                # (c - (m - 2s)) / ((m + 2s) - (m - 2s)) = ((c - K) - (m - K) + 2s) / 4s:
                # c - m from the shifted sums, without subtracting two prices of 1e6 that
                # agree to the last cents (the exact window value, not float64's rounding of
                # m). A constant window is 0 / 0 = NaN, as in pandas.
                rows = outputs["bb"][1]
                s = std[rows]
                s *= 2
                position = x - shift[rows]
                position -= offset[rows]
                position += s
                s *= 2
                position /= s
                out[outputs["bb"][0]] = position
        if n_rsi:
            rs = sums[2 * n_sh : 2 * n_sh + n_rsi] / sums[2 * n_sh + n_rsi :]  # mean gain/loss
            rs += 1
            np.divide(100.0, rs, out=rs)
            np.subtract(100.0, rs, out=rs)
            out[outputs["rsi"][0]] = rs[outputs["rsi"][1]]

    def _restart(
        self,
        g: int,
        acc: np.ndarray,
        slots: np.ndarray,
        t: np.ndarray,
        rows: np.ndarray,
        x: np.ndarray,
        ret1: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Start block k for the rows whose bar t = kN: back sums to 0, K = this bar's value,
        and the suffix sums of block k-1 into `front`.

        Block k-1 is bars t-N..t-1; front[j] (j = 1..N-1) sums bars t-N+j..t-1, which the ring
        still holds with their predecessors; front[0] = 0 (the empty suffix). Every element is
        recomputed with the float operations it had when its bar arrived, shifted by the new K
        (this bar's value). At t = 0 there is no previous block and front gets garbage, but no
        full window reads it (the first full window, at bar N-1, uses offset 0).
        """
        group = self._layout.groups[g]
        n, k0, q0 = group.window, self._layout.k0, self._layout.q0
        acc[q0 + group.quantities, rows] = 0.0  # back sums restart from this bar
        if group.shift.size:
            acc[k0 + group.shift, rows] = values[group.shift, rows]
        if n == 1:
            return  # the window is the current bar: front stays all zero
        slots = slots[rows]
        index = (t[rows] + group.lags) & (self._layout.ring_len - 1)
        index += slots * self._layout.ring_len
        closes = self._ring[index]  # (N, R): bars t-N .. t-1
        width = group.width
        elems = np.empty((n, width, len(rows)))  # (block offset, quantity, slot)
        elems[0] = 0.0
        k = 0
        if group.close >= 0:
            d = elems[1:, k]
            np.subtract(closes[1:], x[rows], out=d)
            np.multiply(d, d, out=elems[1:, k + 1])
            k += 2
        if group.ret >= 0:
            d = elems[1:, k]
            np.divide(closes[1:], closes[:-1], out=d)
            d -= 1
            d -= ret1[rows]
            np.multiply(d, d, out=elems[1:, k + 1])
            k += 2
        if group.rsi >= 0:
            diff = closes[1:] - closes[:-1]
            np.maximum(diff, 0.0, out=elems[1:, k])
            np.negative(diff, out=diff)
            np.maximum(diff, 0.0, out=elems[1:, k + 1])
        # Suffix sums over the block offsets, by doubling (log2 N vector adds; a sequential
        # cumsum costs one dependent add per element).
        body = elems[1:].reshape(n - 1, -1)
        step = 1
        while step < n - 1:
            body[:-step] += body[step:]
            step *= 2
        start = self._front_start[g]
        region = self._front[start : start + self._capacity * n * width]
        region.reshape(self._capacity, n, width)[slots] = elems.transpose(2, 0, 1)


def _grown(arr: np.ndarray, size: int) -> np.ndarray:
    """`arr` with its first axis grown to `size`, new rows zero."""
    out = np.zeros((size, *arr.shape[1:]), dtype=arr.dtype)
    out[: len(arr)] = arr
    return out
