"""A whole batch of input entries decoded at once, into columns (CONTRACT section 4).

The common entry is one `data` field holding a well-formed msgpack map. Entries whose maps
share a byte layout (a feeder's usual output) are read together from a byte matrix
(`wire_layout`); any other map is unpacked and its seven values taken with one C-level
getter. Types and ranges are then checked for the whole batch with numpy. Any entry the fast
paths are not sure of goes through `decode_bar`, entry by entry, so every value accepted and
every rejection reason is exactly `decode_bar`'s. Pure: no Redis, no asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

import msgpack
import numpy as np

from daemon.wire import MAX_SYMBOL_CHARS, Bar, Rejection, decode_bar
from daemon.wire_layout import decode_uniform

_first, _second = itemgetter(0), itemgetter(1)
_get7 = itemgetter("symbol", "ts", "open", "high", "low", "close", "volume")
_unpackb = msgpack.unpackb
_NUMBER_TYPES = {float, int}
_DATA = b"data"
UNIFORM_MIN_BATCH = 32  # fewer blobs than this: each unpacked, no byte matrix


@dataclass(slots=True)
class BarColumns:
    """The valid bars of a batch, in entry order, as columns; and the rejected entries."""

    positions: list[int]  # index of each valid bar among the entries
    symbols: list[str]
    ts: np.ndarray  # (n,) int64, epoch milliseconds
    ohlcv: np.ndarray  # (n, 5) float64: open, high, low, close, volume
    rejected: list[tuple[int, Rejection]] = field(default_factory=list)  # (position, why)

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    def empty(cls) -> BarColumns:
        return cls([], [], np.empty(0, np.int64), np.empty((0, 5), np.float64))

    @classmethod
    def from_bars(cls, bars: Sequence[Bar]) -> BarColumns:
        """Columns of already decoded bars (positions 0..n-1)."""
        n = len(bars)
        return cls(
            list(range(n)),
            [b.symbol for b in bars],
            np.fromiter((b.ts for b in bars), dtype=np.int64, count=n),
            np.array(
                [(b.open, b.high, b.low, b.close, b.volume) for b in bars], dtype=np.float64
            ).reshape(n, 5),
        )

    def window(self, start: int, stop: int) -> BarColumns:
        """Rows start..stop-1 (views, no copy), without the rejections."""
        return BarColumns(
            self.positions[start:stop], self.symbols[start:stop], self.ts[start:stop],
            self.ohlcv[start:stop],
        )

    def take(self, rows: np.ndarray | list[int]) -> BarColumns:
        """The bars at `rows` (indices into these columns), without the rejections."""
        idx = np.asarray(rows, dtype=np.int64)
        pick = idx.tolist()
        return BarColumns(
            [self.positions[i] for i in pick],
            [self.symbols[i] for i in pick],
            self.ts[idx],
            self.ohlcv[idx],
        )


def field_map(fields: Any) -> dict[Any, Any]:
    """An entry's fields as a dict, from Redis's flat [k, v, k, v, ...] list or a mapping."""
    if isinstance(fields, dict):
        return fields
    if isinstance(fields, Mapping):
        return dict(fields)
    if fields is None:
        return {}
    flat = list(fields)
    return dict(zip(flat[0::2], flat[1::2], strict=False))


def _all_inline(fields: Sequence[Any]) -> bool:
    """True when every entry is `[b"data", <bytes>]` (checked with C-level passes)."""
    return (
        set(map(type, fields)) == {list}
        and set(map(len, fields)) == {2}
        and set(map(_first, fields)) == {_DATA}
        and set(map(type, map(_second, fields))) == {bytes}
    )


def _data_blob(fields: Any) -> Any:
    """The `data` value of an entry (bytes when it is the usual msgpack map), else None."""
    t = type(fields)
    if t is list or t is tuple:
        if len(fields) == 2:
            return fields[1] if fields[0] == _DATA else None
        keys = fields[0::2]
        if len(fields) % 2 == 0 and keys.count(_DATA) == 1:
            return fields[2 * keys.index(_DATA) + 1]
    elif isinstance(fields, Mapping):
        return fields.get(_DATA)
    return None


def decode_columns(
    fields: Sequence[Any],
    stream: str | Sequence[str],
    entry_ids: Sequence[str],
    refuse: dict[int, str] | None = None,
) -> BarColumns:
    """Decode every entry; `fields[i]` is a flat field list or a mapping. `stream` names the
    input stream of every entry (or of each). `refuse`: positions rejected up front, with the
    reason (poison), whatever their content."""
    n = len(fields)
    streams = [stream] * n if isinstance(stream, str) else list(stream)
    refuse = refuse or {}
    inline: list[int] = []
    blobs: list[bytes] = []
    slow: list[int] = []
    data, any_refused = _DATA, bool(refuse)
    if not any_refused and _all_inline(fields):  # every entry the usual one: no per-entry test
        inline, blobs = list(range(n)), list(map(_second, fields))
        fields_to_check: Sequence[Any] = ()
    else:
        fields_to_check = fields
    for i, f in enumerate(fields_to_check):
        if any_refused and i in refuse:
            continue
        if type(f) is list and len(f) == 2 and f[0] == data:  # the usual entry, inline
            blob = f[1]
        else:
            blob = _data_blob(f)
        if type(blob) is not bytes:
            slow.append(i)
            continue
        inline.append(i)
        blobs.append(blob)
    fast_pos, symbols, ts, ohlcv, suspect = _decode_blobs(inline, blobs, slow)
    if suspect:
        keep = np.ones(len(fast_pos), dtype=bool)
        keep[suspect] = False
        slow.extend(fast_pos[j] for j in suspect)
        fast_pos = [p for p, k in zip(fast_pos, keep.tolist(), strict=True) if k]
        symbols = [s for s, k in zip(symbols, keep.tolist(), strict=True) if k]
        ts, ohlcv = ts[keep], ohlcv[keep]
    cols = BarColumns(fast_pos, symbols, ts, ohlcv)
    cols.rejected = [
        (i, Rejection(reason, field_map(fields[i]), streams[i], entry_ids[i]))
        for i, reason in sorted(refuse.items())
    ]
    if slow:
        _merge_slow(cols, slow, fields, streams, entry_ids)
    return cols


def _decode_blobs(
    inline: list[int], blobs: list[bytes], slow: list[int]
) -> tuple[list[int], list[str], np.ndarray, np.ndarray, list[int]]:
    """The `data` blobs at entry positions `inline`: the rows of a shared layout at once
    (wire_layout), the others each unpacked; in entry order, with the rows `decode_bar`
    must judge instead (indices into the result). Blobs that do not unpack to a map with
    the seven keys are added to `slow`."""
    uni = decode_uniform(blobs) if len(blobs) >= UNIFORM_MIN_BATCH else None
    done = uni.rows.tolist() if uni is not None else []
    if len(done) == len(blobs):
        rest: list[int] = []
    elif done:
        taken = np.zeros(len(blobs), dtype=bool)
        taken[done] = True
        rest = np.flatnonzero(~taken).tolist()
    else:
        rest = list(range(len(blobs)))
    values: list[tuple[Any, ...]] = []
    unpacked: list[int] = []
    unpack, get7 = _unpackb, _get7
    for j in rest:
        try:
            # Defaults: str keys only (a map with other keys goes the slow way, which
            # accepts them as decode_bar does).
            values.append(get7(unpack(blobs[j])))
        except Exception:  # not msgpack, not a map, a key missing: the exact reason is slow
            slow.append(inline[j])
            continue
        unpacked.append(j)
    if not done and not values:
        return [], [], np.empty(0, np.int64), np.empty((0, 5), np.float64), []
    if not values:
        assert uni is not None
        positions = [inline[j] for j in done]
        return positions, uni.symbols, uni.ts, uni.ohlcv, _out_of_range(uni.ts, uni.ohlcv)
    symbols, ts, ohlcv, bad = _check_fast(values)
    positions = [inline[j] for j in unpacked]
    if not done:
        return positions, symbols, ts, ohlcv, bad
    assert uni is not None
    # Both kinds: one block in entry order.
    positions = [inline[j] for j in done] + positions
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    pick = order.tolist()
    all_symbols = uni.symbols + symbols
    flagged = np.zeros(len(positions), dtype=bool)
    flagged[[len(done) + j for j in bad]] = True
    ts = np.concatenate([uni.ts, ts])[order]
    ohlcv = np.concatenate([uni.ohlcv, ohlcv])[order]
    flagged = flagged[order]
    suspect = sorted(set(np.flatnonzero(flagged).tolist()) | set(_out_of_range(ts, ohlcv)))
    return [positions[j] for j in pick], [all_symbols[j] for j in pick], ts, ohlcv, suspect


def _out_of_range(ts: np.ndarray, ohlcv: np.ndarray) -> list[int]:
    """Rows `decode_bar` would reject for their values: ts <= 0, a price <= 0, a volume < 0,
    anything not finite."""
    prices, volume = ohlcv[:, :4], ohlcv[:, 4]
    ok = (ts > 0) & ((prices > 0.0) & (prices < np.inf)).all(axis=1)
    ok &= (volume >= 0.0) & (volume < np.inf)
    return [] if ok.all() else np.flatnonzero(~ok).tolist()


def _check_fast(
    values: list[tuple[Any, ...]],
) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """Columns of the fast rows, and the rows (indices into `values`) that `decode_bar` must
    judge instead. A row passes only if `decode_bar` would accept it with these values:
    str symbol of 1..64 characters, int ts in 1..2**63-1, int or float prices > 0 and volume
    >= 0, all finite (bools, strings and nil are not numbers)."""
    columns = list(zip(*values, strict=True))  # seven columns in one pass
    symbols, ts_list = list(columns[0]), list(columns[1])
    numbers = [list(c) for c in columns[2:]]  # open, high, low, close, volume
    suspect: set[int] = set()
    if set(map(type, symbols)) != {str} or not 0 < min(map(len, symbols)) <= max(
        map(len, symbols)
    ) <= MAX_SYMBOL_CHARS:
        suspect.update(
            j
            for j, s in enumerate(symbols)
            if type(s) is not str or not 0 < len(s) <= MAX_SYMBOL_CHARS
        )
    if set(map(type, ts_list)) != {int}:
        suspect.update(j for j, t in enumerate(ts_list) if type(t) is not int)
    if not set(map(type, chain.from_iterable(numbers))) <= _NUMBER_TYPES:
        suspect.update(
            j for j, row in enumerate(zip(*numbers, strict=True))
            if not set(map(type, row)) <= _NUMBER_TYPES
        )
    if suspect:  # placeholders keep the arrays rectangular; these rows go the slow way
        _blank(suspect, symbols, ts_list, numbers)
    try:
        ts = np.array(ts_list, dtype=np.int64)
    except OverflowError:  # an int beyond int64 somewhere: find it
        big = {j for j, t in enumerate(ts_list) if not -(2**63) <= t < 2**63}
        suspect.update(big)
        _blank(big, symbols, ts_list, numbers)
        ts = np.array(ts_list, dtype=np.int64)
    try:
        ohlcv = np.ascontiguousarray(np.array(numbers, dtype=np.float64).T)
    except OverflowError:  # an int too large for a float64
        huge = {j for j, row in enumerate(zip(*numbers, strict=True)) if not _floatable(row)}
        suspect.update(huge)
        _blank(huge, symbols, ts_list, numbers)
        ohlcv = np.ascontiguousarray(np.array(numbers, dtype=np.float64).T)
    suspect.update(_out_of_range(ts, ohlcv))
    return symbols, ts, ohlcv, sorted(suspect)


_PLACEHOLDER = (1.0, 1.0, 1.0, 1.0, 0.0)


def _blank(rows: set[int], symbols: list[Any], ts: list[Any], numbers: list[list[Any]]) -> None:
    """Harmless values in `rows` (judged by decode_bar instead), in place."""
    for j in rows:
        symbols[j] = ""
        ts[j] = 1
        for column, value in zip(numbers, _PLACEHOLDER, strict=True):
            column[j] = value


def _floatable(row: tuple[Any, ...]) -> bool:
    try:
        [float(x) for x in row]
    except OverflowError:
        return False
    return True


def _merge_slow(
    cols: BarColumns,
    slow: list[int],
    fields: Sequence[Any],
    streams: list[str],
    entry_ids: Sequence[str],
) -> None:
    """Decode the `slow` entries one by one and merge the valid ones into `cols`, in order."""
    extra_pos: list[int] = []
    extra_sym: list[str] = []
    extra_ts: list[int] = []
    extra_num: list[tuple[float, ...]] = []
    for i in slow:
        item = decode_bar(field_map(fields[i]), streams[i], entry_ids[i])
        if isinstance(item, Rejection):
            cols.rejected.append((i, item))
            continue
        extra_pos.append(i)
        extra_sym.append(item.symbol)
        extra_ts.append(item.ts)
        extra_num.append((item.open, item.high, item.low, item.close, item.volume))
    cols.rejected.sort(key=lambda r: r[0])
    if not extra_pos:
        return
    positions = cols.positions + extra_pos
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    pick = order.tolist()
    symbols = cols.symbols + extra_sym
    cols.positions = [positions[j] for j in pick]
    cols.symbols = [symbols[j] for j in pick]
    cols.ts = np.concatenate([cols.ts, np.asarray(extra_ts, dtype=np.int64)])[order]
    cols.ohlcv = np.concatenate(
        [cols.ohlcv, np.asarray(extra_num, dtype=np.float64).reshape(-1, 5)]
    )[order]
