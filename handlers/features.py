"""Feature state: every feature of CONTRACT section 3, updated in O(1) per bar, vectorised over slots.

The definitions (pandas reference, exact variant, FeatureBuilder) live in `features_ref` and
are re-exported here.

Stability scheme (why the values stay within 1e-6 rel / 1e-9 abs of the exact window value
at any price scale and over any number of bars): rolling sums are never updated by
subtracting the element that leaves the window. Each window of N bars is cut into blocks of N
bars (by the slot's bar count); the window sum is `front[o] + back`, where `back` sums the
elements of the current block, started from zero at the block's first bar, and `front[o]` is
a suffix sum of the previous block, recomputed from the close ring buffer when the block
starts (amortised O(1): N work every N bars). No sum ever carries more than 2N roundings,
whatever happened earlier, so nothing drifts. Sums for a std are of `x - K`, K being the
element at the start of the block: K lies in every window of that block, so the shift keeps
S2 within about N times the window's own squared spread (no catastrophic cancellation at price
5e4 with 0.01 moves), and a constant window has all-zero shifted elements: mean exactly K,
std exactly 0, as pandas gives (bb_position 0/0 -> NaN). RSI's gains and losses are sums of
non-negative numbers (no shift needed); a window without losses sums exactly to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

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


@dataclass(slots=True)
class _Schedule:
    """Everything summed over windows of one length N: which channels, where they live."""

    window: int
    close_mean: bool = False  # ma_ratio_N or bb_position_N
    close_std: bool = False  # bb_position_N
    ret_std: bool = False  # vol_Nd
    gain_loss: bool = False  # rsi_N
    # Filled by FeatureState._layout: rows of the per-slot accumulator matrix.
    shift_rows: dict[str, int] = field(default_factory=dict)  # channel -> row of K
    back_rows: slice = field(default_factory=lambda: slice(0, 0))  # this schedule's back sums, in `quantities` order
    quantities: list[str] = field(default_factory=list)  # "c1", "c2", "r1", "r2", "g", "l"
    front: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (Q, capacity * N)


class FeatureState:
    """Per-slot state of a fixed list of features, updated a batch of (slot, close) at a time.

    `update` appends one close to each given slot's history and returns every feature after
    it. Slots are independent; `reset` starts slots afresh (O(1) per slot). Slot indices must
    be in [0, capacity) (call `ensure_capacity` first) and unique within one call: split a
    batch where a symbol repeats into successive calls, in order (checked, ValueError).
    """

    def __init__(self, names: Sequence[str], capacity: int = 1024) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.specs: tuple[FeatureSpec | None, ...] = tuple(parse_feature(n) for n in self.names)
        self.unknown: tuple[str, ...] = tuple(
            n for n, s in zip(self.names, self.specs, strict=True) if s is None
        )
        log_unknown(self.unknown)
        known = [s for s in self.specs if s is not None]
        self._warmup = np.array(
            [s.warmup_bars if s is not None else _NEVER for s in self.specs], dtype=np.int64
        )
        # The ring holds the last `max window + 1` closes: ret_N reads c[t-N], and a block
        # restart recomputes returns/diffs of the previous block from closes.
        self._ring_len = max([s.window + 1 for s in known] + [2])
        self._ret_lags = sorted({s.window for s in known if s.kind is FeatureKind.RET})
        self._schedules = self._plan(known)
        self._capacity = 0
        self._ring = np.zeros(0)
        self._nbars = np.zeros(0, dtype=np.int64)
        self._mark = np.zeros(0, dtype=np.int64)
        self._acc = np.zeros((self._acc_rows, 0))
        self.ensure_capacity(max(int(capacity), 1))

    # ---- layout -------------------------------------------------------------------------

    def _plan(self, known: list[FeatureSpec]) -> list[_Schedule]:
        by_window: dict[int, _Schedule] = {}
        for spec in known:
            if spec.kind is FeatureKind.RET:
                continue
            sch = by_window.setdefault(spec.window, _Schedule(window=spec.window))
            if spec.kind is FeatureKind.VOL:
                sch.ret_std = True
            elif spec.kind is FeatureKind.RSI:
                sch.gain_loss = True
            else:
                sch.close_mean = True
                sch.close_std = sch.close_std or spec.kind is FeatureKind.BB_POSITION
        row = 0
        schedules = sorted(by_window.values(), key=lambda s: s.window)
        for sch in schedules:
            if sch.close_mean:
                sch.shift_rows["c"] = row
                row += 1
            if sch.ret_std:
                sch.shift_rows["r"] = row
                row += 1
            q: list[str] = []
            if sch.close_mean:
                q += ["c1", "c2"] if sch.close_std else ["c1"]
            if sch.ret_std:
                q += ["r1", "r2"]
            if sch.gain_loss:
                q += ["g", "l"]
            sch.quantities = q
            sch.back_rows = slice(row, row + len(q))
            row += len(q)
        self._acc_rows = row
        return schedules

    @property
    def capacity(self) -> int:
        return self._capacity

    def ensure_capacity(self, n_slots: int) -> None:
        """Make room for slots 0..n_slots-1 (amortised doubling); existing state is kept."""
        if n_slots <= self._capacity:
            return
        new_cap = max(int(n_slots), 2 * self._capacity)
        old = self._capacity
        ring = np.ones(new_cap * self._ring_len)
        ring[: old * self._ring_len] = self._ring
        self._ring = ring
        self._nbars = _grown(self._nbars, new_cap)
        self._mark = _grown(self._mark, new_cap)
        acc = np.zeros((self._acc_rows, new_cap))
        acc[:, :old] = self._acc
        self._acc = acc
        for sch in self._schedules:
            front = np.zeros((len(sch.quantities), new_cap * sch.window))
            if old:
                front[:, : old * sch.window] = sch.front
            sch.front = front
        self._capacity = new_cap

    def nbytes_per_slot(self) -> int:
        """Bytes of state one slot costs."""
        per_slot = self._ring_len * 8 + 2 * 8 + self._acc_rows * 8
        per_slot += sum(len(s.quantities) * s.window * 8 for s in self._schedules)
        return per_slot

    def reset(self, slots: np.ndarray) -> None:
        """Start these slots afresh (the next close is bar 0 of a new history)."""
        self._nbars[np.asarray(slots, dtype=np.int64)] = 0

    def bars_seen(self, slots: np.ndarray) -> np.ndarray:
        """Closes appended to each slot since its last reset."""
        return self._nbars[np.asarray(slots, dtype=np.int64)].copy()

    # ---- the update -----------------------------------------------------------------------

    def update(self, slots: np.ndarray, closes: np.ndarray) -> np.ndarray:
        """Append closes[i] to slot slots[i]; float64 (len(slots), len(names)) features after it."""
        slots = np.asarray(slots, dtype=np.int64)
        x = np.asarray(closes, dtype=np.float64)
        size = slots.shape[0]
        if x.shape != (size,):
            raise ValueError(f"closes has shape {x.shape}, expected ({size},)")
        out = np.empty((size, len(self.names)))
        if size == 0:
            return out
        order = np.arange(size)
        self._mark[slots] = order
        if not np.array_equal(self._mark[slots], order):
            raise ValueError("a slot appears twice in one update: split the batch")
        ring_len = self._ring_len
        t = self._nbars[slots]  # this close's bar index in the slot's history
        self._nbars[slots] = t + 1
        base = slots * ring_len
        self._ring[base + t % ring_len] = x
        prev = np.where(t > 0, self._ring[base + (t - 1) % ring_len], x)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ret1 = x / prev - 1
            diff = x - prev
            ret_n = {1: ret1}
            for lag in self._ret_lags:
                if lag != 1:
                    ret_n[lag] = x / self._ring[base + (t - lag) % ring_len] - 1
            acc = self._acc[:, slots]
            values: dict[tuple[FeatureKind, int], np.ndarray] = {}
            for sch in self._schedules:
                self._schedule_step(sch, slots, t, x, ret1, diff, acc, values)
            self._acc[:, slots] = acc
            for i, spec in enumerate(self.specs):
                if spec is None:
                    out[:, i] = np.nan
                elif spec.kind is FeatureKind.RET:
                    out[:, i] = ret_n[spec.window]
                else:
                    out[:, i] = values[(spec.kind, spec.window)]
        out[t[:, None] + 1 < self._warmup[None, :]] = np.nan
        return out

    def _schedule_step(
        self,
        sch: _Schedule,
        slots: np.ndarray,
        t: np.ndarray,
        x: np.ndarray,
        ret1: np.ndarray,
        diff: np.ndarray,
        acc: np.ndarray,
        values: dict[tuple[FeatureKind, int], np.ndarray],
    ) -> None:
        n = sch.window
        back = sch.back_rows.start
        qi = {q: back + i for i, q in enumerate(sch.quantities)}
        starts = np.flatnonzero(t % n == 0)  # first bar of a block: restart the sums
        if starts.size:
            self._restart_block(sch, slots[starts], t[starts], starts, ret1, acc)
        if sch.close_mean:
            d = x - acc[sch.shift_rows["c"]]
            acc[qi["c1"]] += d
            if sch.close_std:
                acc[qi["c2"]] += d * d
        if sch.ret_std:
            d = ret1 - acc[sch.shift_rows["r"]]
            acc[qi["r1"]] += d
            acc[qi["r2"]] += d * d
        if sch.gain_loss:
            acc[qi["g"]] += np.maximum(diff, 0.0)
            acc[qi["l"]] += np.maximum(-diff, 0.0)
        # Window sum = suffix of the previous block (empty at offset 0) + this block so far.
        sums = sch.front[:, slots * n + (t + 1) % n] + acc[sch.back_rows]
        q = {name: sums[i] for i, name in enumerate(sch.quantities)}
        if sch.close_mean:
            mean = acc[sch.shift_rows["c"]] + q["c1"] / n
            values[(FeatureKind.MA_RATIO, n)] = x / mean - 1
            if sch.close_std:
                s = _std(q["c1"], q["c2"], n)
                values[(FeatureKind.BB_POSITION, n)] = (x - (mean - 2 * s)) / (
                    (mean + 2 * s) - (mean - 2 * s)
                )
        if sch.ret_std:
            values[(FeatureKind.VOL, n)] = _std(q["r1"], q["r2"], n)
        if sch.gain_loss:
            values[(FeatureKind.RSI, n)] = 100 - 100 / (1 + (q["g"] / n) / (q["l"] / n))

    def _restart_block(
        self,
        sch: _Schedule,
        slots: np.ndarray,
        t: np.ndarray,
        rows: np.ndarray,
        ret1: np.ndarray,
        acc: np.ndarray,
    ) -> None:
        """At bar t = kN: suffix sums of block k-1 into `front`, back sums to 0, new shifts.

        Block k-1 is bars t-N..t-1; front[j] (j = 1..N-1) sums its bars t-N+j..t-1, which
        the ring still holds with their predecessors. front[0] = 0 (the empty suffix). At
        t = 0 there is no previous block and front is garbage, but no full window reads it.
        """
        n = sch.window
        ring_len = self._ring_len
        acc[sch.back_rows, rows] = 0.0
        current = self._ring[slots * ring_len + t % ring_len]
        if "c" in sch.shift_rows:
            acc[sch.shift_rows["c"], rows] = current
        if "r" in sch.shift_rows:
            acc[sch.shift_rows["r"], rows] = ret1[rows]
        if n == 1:
            return  # front stays all zero
        lags = np.arange(-n, 0)  # bars t-N .. t-1
        closes = self._ring[(slots * ring_len)[:, None] + (t[:, None] + lags) % ring_len]
        elems: list[np.ndarray] = []  # each (R, N-1): bars t-N+1 .. t-1
        if sch.close_mean:
            d = closes[:, 1:] - current[:, None]
            elems.append(d)
            if sch.close_std:
                elems.append(d * d)
        if sch.ret_std:
            d = closes[:, 1:] / closes[:, :-1] - 1 - ret1[rows][:, None]
            elems += [d, d * d]
        if sch.gain_loss:
            diff = closes[:, 1:] - closes[:, :-1]
            elems += [np.maximum(diff, 0.0), np.maximum(-diff, 0.0)]
        stacked = np.stack(elems)  # (Q, R, N-1)
        front = np.zeros((len(elems), len(slots), n))
        front[:, :, 1:] = np.cumsum(stacked[:, :, ::-1], axis=2)[:, :, ::-1]
        cols = (slots * n)[:, None] + np.arange(n)
        sch.front[:, cols.ravel()] = front.reshape(len(elems), -1)


def _std(s1: np.ndarray, s2: np.ndarray, n: int) -> np.ndarray:
    """Sample std (ddof 1) from the window's shifted sum and sum of squares."""
    return np.sqrt(np.maximum(s2 - s1 * (s1 / n), 0.0) / (n - 1))


def _grown(arr: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out
