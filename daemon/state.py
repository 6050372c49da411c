"""The per-symbol state table: slots, event-time TTL, duplicates, and batched model inputs.

Pure: no Redis, no asyncio, no wall clock. The state after a sequence of bars depends only on
that sequence (not on how it was cut into batches), which crash recovery relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from handlers.batch_io import BatchInputs, InputSpec
from handlers.features import FeatureState
from handlers.sequences import RAW, SequenceBuffers

OUT_OF_ORDER = "out_of_order"
# From this many bars a batch is first checked as a whole (`_clean_batch`): the numpy
# calls cost more than the per-bar loop they replace for a handful of bars.
CLEAN_MIN_ROWS = 64


class BarLike(Protocol):
    """What the table reads of a bar (read-only, so frozen dataclasses qualify)."""

    @property
    def symbol(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def open(self) -> float: ...
    @property
    def high(self) -> float: ...
    @property
    def low(self) -> float: ...
    @property
    def close(self) -> float: ...
    @property
    def volume(self) -> float: ...


@dataclass(slots=True)
class ApplyResult:
    """Outcome of one batch: indices refer to the bars passed to `apply`."""

    accepted: list[int]
    inputs: BatchInputs | None  # rows aligned with `accepted`; None when not gathered
    rejected: list[tuple[int, str]] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    # Symbols whose state restarted over one the table had (a gap longer than the TTL since
    # its last bar); a symbol new to the table (never seen, or evicted before, or stale by
    # event time at this bar: evicted, then back) is not counted.
    resets: int = 0
    evicted: int = 0  # symbols evicted: stale when a later bar of theirs came, or at the end


class SymbolTable:
    """Symbol -> slot, plus the feature state and ring buffers indexed by slot."""

    def __init__(self, spec: InputSpec, ttl_s: float, capacity: int = 1024) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.spec = spec
        self.ttl_ms = int(round(ttl_s * 1000))
        capacity = max(int(capacity), 16)
        self._capacity = capacity
        self.features = FeatureState(spec.feature_names, capacity=capacity)
        self.buffers = {s: SequenceBuffers(s, capacity=capacity) for s in spec.sequences}
        index = {name: i for i, name in enumerate(spec.feature_names)}
        # Which columns of the feature values (or OHLCV channels) each buffer stores.
        self._buffer_columns = {
            s: np.array(
                [(_CHANNEL if s.kind == RAW else index)[c] for c in s.columns], dtype=np.int64
            )
            for s in spec.sequences
        }
        self.slot_of: dict[str, int] = {}
        self._symbols: list[str | None] = [None] * capacity
        self.last_ts = np.zeros(capacity, dtype=np.int64)
        self.bars_seen = np.zeros(capacity, dtype=np.int64)
        self._active = np.zeros(capacity, dtype=bool)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self.max_ts_seen = 0
        self.clean_min_rows = CLEAN_MIN_ROWS
        self.duplicates_total = 0
        self.evictions_total = 0
        self.new_symbols_total = 0  # states started for a symbol never seen (or evicted)

    # ---- bookkeeping ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self.slot_of

    @property
    def capacity(self) -> int:
        return self._capacity

    def nbytes_per_slot(self) -> int:
        total = self.features.nbytes_per_slot() + 2 * 8 + 8  # ts, count, symbol ref
        return total + sum(b.nbytes_per_slot() for b in self.buffers.values())

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self._capacity)
        self.features.ensure_capacity(new_cap)
        for buf in self.buffers.values():
            buf.ensure_capacity(new_cap)
        self.last_ts = np.concatenate([self.last_ts, np.zeros(new_cap - self._capacity, np.int64)])
        self.bars_seen = np.concatenate(
            [self.bars_seen, np.zeros(new_cap - self._capacity, np.int64)]
        )
        self._active = np.concatenate([self._active, np.zeros(new_cap - self._capacity, bool)])
        self._symbols.extend([None] * (new_cap - self._capacity))
        self._free.extend(range(new_cap - 1, self._capacity - 1, -1))
        self._capacity = new_cap

    def _allocate(self, symbol: str) -> int:
        if not self._free:
            self._grow(self._capacity + 1)
        slot = self._free.pop()
        self.slot_of[symbol] = slot
        self._symbols[slot] = symbol
        self._active[slot] = True
        return slot

    def _fresh(self, slots: np.ndarray) -> None:
        self.features.reset(slots)
        for buf in self.buffers.values():
            buf.reset(slots)
        self.bars_seen[slots] = 0

    def evict_stale(self) -> int:
        """Free every symbol whose last bar is older than the newest ts seen minus the TTL."""
        if not self.slot_of:
            return 0
        horizon = self.max_ts_seen - self.ttl_ms
        stale = np.flatnonzero(self._active & (self.last_ts < horizon))
        for slot in stale.tolist():
            symbol = self._symbols[slot]
            assert symbol is not None
            del self.slot_of[symbol]
            self._symbols[slot] = None
            self._free.append(slot)
        self._active[stale] = False
        self.evictions_total += int(stale.size)
        return int(stale.size)

    def symbols(self) -> list[str]:
        return sorted(self.slot_of)

    # ---- the batch -----------------------------------------------------------------------

    def apply(self, bars: Sequence[BarLike], *, gather: bool = True) -> ApplyResult:
        """Update state with `bars` in order; return model inputs for the accepted ones."""
        n = len(bars)
        ohlcv = np.array(
            [(b.open, b.high, b.low, b.close, b.volume) for b in bars], dtype=np.float64
        ).reshape(n, 5)
        ts = np.fromiter((b.ts for b in bars), dtype=np.int64, count=n)
        return self.apply_columns([b.symbol for b in bars], ts, ohlcv, gather=gather)

    def apply_columns(
        self,
        symbols: Sequence[str],
        ts: np.ndarray,
        ohlcv: np.ndarray,
        *,
        gather: bool = True,
        clock: np.ndarray | None = None,
    ) -> ApplyResult:
        """`apply` for bars given as columns: symbols, ts (n,) int64, ohlcv (n, 5) float64.
        Indices in the result refer to these rows. `clock` (n,) int64, for a replay of some
        of a stream's bars: the newest ts the live run had seen before each bar (from bars
        not replayed too), so that symbols go stale at the same bars as they did live."""
        n_in = len(symbols)
        evictions_before = self.evictions_total
        new_before = self.new_symbols_total
        clean = self._clean_batch(symbols, ts, clock) if n_in >= self.clean_min_rows else None
        slots: Sequence[int] | np.ndarray
        waves: Sequence[int] | np.ndarray
        fresh: Sequence[bool] | np.ndarray
        rejected: list[tuple[int, str]]
        duplicates: list[int]
        if clean is not None:
            slots, waves = clean
            accepted, rejected, duplicates = list(range(n_in)), [], []
            fresh = np.zeros(n_in, dtype=bool)
            self.max_ts_seen = max(self.max_ts_seen, int(ts.max()))
            if clock is not None:
                self.max_ts_seen = max(self.max_ts_seen, int(clock.max()))
        else:
            accepted, rejected, duplicates, slots, waves, fresh = self._classify(
                symbols, ts, clock
            )
        self.duplicates_total += len(duplicates)

        n = len(accepted)
        inputs = None
        if gather:
            inputs = BatchInputs(
                features=np.empty((n, len(self.spec.feature_names)), dtype=np.float64),
                bars_seen=np.empty(n, dtype=np.int64),
                sequences={
                    s: np.empty((n, s.length, len(s.columns)), dtype=np.float32)
                    for s in self.spec.sequences
                },
            )
        # Restarted: a symbol's state begun anew over one it had (a TTL gap, stale by event
        # time); a symbol's first state is no restart.
        resets = int(np.count_nonzero(fresh)) - (self.new_symbols_total - new_before)
        if n:
            rows = np.asarray(accepted, dtype=np.int64)
            if n == n_in:
                self._run_waves(ts, ohlcv, slots, waves, fresh, inputs)
            else:
                self._run_waves(ts[rows], ohlcv[rows], slots, waves, fresh, inputs)
        self.evict_stale()
        evicted = self.evictions_total - evictions_before  # those within the batch included
        return ApplyResult(accepted, inputs, rejected, duplicates, resets, evicted)

    def _clean_batch(
        self, symbols: Sequence[str], ts: np.ndarray, clock: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(slots, waves) when every bar of the batch is accepted and nothing restarts: every
        symbol known, each bar's ts above the symbol's previous one (in the table or earlier in
        the batch) by at most the TTL, and that previous one within the TTL of the newest ts
        seen before the bar. The same verdicts `_classify` reaches one bar at a time, for the
        usual batch, with numpy; None when any bar needs the per-bar rules."""
        get = self.slot_of.get
        found = [get(s) for s in symbols]
        if None in found:
            return None
        slots = np.array(found, dtype=np.int64)
        n = slots.size
        order = np.argsort(slots, kind="stable")  # each symbol's bars together, in bar order
        by_slot = slots[order]
        first = np.ones(n, dtype=bool)
        np.not_equal(by_slot[1:], by_slot[:-1], out=first[1:])
        ts_by_slot = ts[order]
        previous = np.empty(n, dtype=np.int64)
        previous[1:] = ts_by_slot[:-1]
        previous[first] = self.last_ts[by_slot[first]]
        gap = ts_by_slot - previous
        # The newest ts seen before each bar (every bar before it is accepted too).
        seen_before = np.maximum.accumulate(np.concatenate(([self.max_ts_seen], ts[:-1])))
        if clock is not None:
            seen_before = np.maximum(seen_before, clock)
        if not (
            (gap > 0).all()
            and (gap <= self.ttl_ms).all()
            and (previous >= seen_before[order] - self.ttl_ms).all()
        ):
            return None
        starts = np.flatnonzero(first)
        wave_by_slot = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
        waves = np.empty(n, dtype=np.int64)
        waves[order] = wave_by_slot
        return slots, waves

    def _classify(
        self, symbols: Sequence[str], ts: np.ndarray, clock: np.ndarray | None = None
    ) -> tuple[list[int], list[tuple[int, str]], list[int], list[int], list[int], list[bool]]:
        """Each bar's verdict in order (accepted, rejected, duplicate), allocating slots for
        new symbols; for accepted bars: slot, wave (k-th occurrence of the slot in this batch)
        and whether the symbol restarts fresh before it."""
        ttl_ms = self.ttl_ms
        accepted: list[int] = []
        rejected: list[tuple[int, str]] = []
        duplicates: list[int] = []
        slots: list[int] = []
        waves: list[int] = []
        fresh: list[bool] = []
        occurrences: dict[int, int] = {}
        pending_ts: dict[int, int] = {}
        max_seen = self.max_ts_seen
        horizon = max_seen - ttl_ms
        slot_of = self.slot_of
        last_ts = self.last_ts
        clocks = clock.tolist() if clock is not None else None
        for i, (symbol, t) in enumerate(zip(symbols, ts.tolist(), strict=True)):
            if clocks is not None and clocks[i] > max_seen:
                max_seen = clocks[i]
                horizon = max_seen - ttl_ms
            slot = slot_of.get(symbol)
            restart = False
            if slot is None:
                slot = self._allocate(symbol)
                last_ts = self.last_ts  # may have grown
                restart = True
                self.new_symbols_total += 1
            else:
                last = pending_ts.get(slot)
                if last is None:
                    last = int(last_ts[slot])
                if last < horizon:
                    # Stale by event time: evicted, as one bar at a time would have done before
                    # this bar (counted the same), and this bar starts afresh.
                    restart = True
                    self.evictions_total += 1
                    self.new_symbols_total += 1  # evicted, then back: no restart, as one by one
                elif t == last:
                    duplicates.append(i)
                    continue
                elif t < last:
                    rejected.append((i, OUT_OF_ORDER))
                    continue
                elif t - last > ttl_ms:
                    restart = True
            pending_ts[slot] = t
            if t > max_seen:
                max_seen = t
                horizon = max_seen - ttl_ms
            wave = occurrences.get(slot, 0)
            occurrences[slot] = wave + 1
            accepted.append(i)
            slots.append(slot)
            waves.append(wave)
            fresh.append(restart)
        self.max_ts_seen = max_seen
        return accepted, rejected, duplicates, slots, waves, fresh

    def _run_waves(
        self,
        ts_all: np.ndarray,
        ohlcv: np.ndarray,
        slots_list: Sequence[int] | np.ndarray,
        waves_list: Sequence[int] | np.ndarray,
        fresh_list: Sequence[bool] | np.ndarray,
        inputs: BatchInputs | None,
    ) -> None:
        """Apply the accepted bars (ts, ohlcv rows aligned with `slots_list`), one wave of
        distinct slots at a time, vectorised within a wave."""
        n = len(slots_list)
        slots_all = np.asarray(slots_list, dtype=np.int64)
        waves = np.asarray(waves_list, dtype=np.int64)
        fresh_all = np.asarray(fresh_list, dtype=bool)
        close = ohlcv[:, 3]
        n_waves = int(waves.max()) + 1
        order = np.argsort(waves, kind="stable") if n_waves > 1 else np.arange(n)
        bounds = np.searchsorted(waves[order], np.arange(n_waves + 1))
        for w in range(n_waves):
            rows = order[bounds[w] : bounds[w + 1]] if n_waves > 1 else order
            slots = slots_all[rows]
            restart = slots[fresh_all[rows]]
            if restart.size:
                self._fresh(restart)
            values = self.features.update(slots, close[rows])
            self.bars_seen[slots] += 1
            self.last_ts[slots] = ts_all[rows]
            for spec, buf in self.buffers.items():
                cols = self._buffer_columns[spec]
                if spec.kind == RAW:
                    buf.push(slots, ohlcv[rows][:, cols])
                else:
                    buf.push(slots, values[:, cols])
            if inputs is not None:
                inputs.features[rows] = values
                inputs.bars_seen[rows] = self.bars_seen[slots]
                for spec, buf in self.buffers.items():
                    inputs.sequences[spec][rows] = buf.gather(slots)


_CHANNEL = {"open": 0, "high": 1, "low": 2, "close": 3, "volume": 4}
