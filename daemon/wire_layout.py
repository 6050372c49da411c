"""Many msgpack bar maps of one byte layout, decoded together with numpy (CONTRACT section 4).

A feeder writes every bar the same way: the same keys in the same order, the same value
types; only the values and the symbol's length change. Blobs of equal length are stacked as
rows of a byte matrix; the first row's layout is read with a small msgpack parser, and every
row whose structural bytes (map header, keys, type bytes, the symbol's length) equal the
template's has its values at the same offsets, read for all rows at once. A row this module
is not sure of (another layout, a type it does not read, an integer a float64 cannot hold
exactly, a symbol that is not valid UTF-8) is left to the caller's msgpack path, so what is
accepted is exactly what `msgpack.unpackb` then `decode_bar` would accept. Pure: no Redis,
no asyncio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from daemon.wire import MAX_SYMBOL_CHARS

_KEYS = ("symbol", "ts", "open", "high", "low", "close", "volume")
_COLUMN = {k: i for i, k in enumerate(_KEYS)}
_TEMPLATES_PER_LENGTH = 3  # layouts tried per blob length before leaving the rest
_MIN_ROWS = 8  # fewer rows of one length than this: not worth a matrix
_EXACT = 2**53  # integers beyond this may not be a float64 exactly

# msgpack numeric type byte -> (numpy dtype, size); positive fixints are handled apart.
_INTS = {
    0xCC: ("u1", 1), 0xCD: (">u2", 2), 0xCE: (">u4", 4), 0xCF: (">u8", 8),
    0xD0: ("i1", 1), 0xD1: (">i2", 2), 0xD2: (">i4", 4), 0xD3: (">i8", 8),
}
_FLOATS = {0xCA: (">f4", 4), 0xCB: (">f8", 8)}


@dataclass(frozen=True, slots=True)
class _Value:
    column: int  # index in _KEYS
    offset: int  # first byte of the value (after the type byte); -1 for a fixint
    type_at: int  # the type byte's offset
    dtype: str  # numpy dtype of the value bytes; "fixint" or "str"
    size: int


@dataclass(frozen=True, slots=True)
class _Layout:
    structural: np.ndarray  # offsets of the bytes every matching row must share
    expected: np.ndarray  # their values
    values: tuple[_Value, ...]  # one per key, in _KEYS order


@dataclass(slots=True)
class Uniform:
    """The rows decoded here (indices into the blobs, ascending) and their columns. Types
    are settled; the caller still checks the ranges (ts > 0, prices > 0, ...)."""

    rows: np.ndarray  # int64
    symbols: list[str]
    ts: np.ndarray  # int64
    ohlcv: np.ndarray  # (n, 5) float64


def decode_uniform(blobs: Sequence[bytes]) -> Uniform:
    """Decode the blobs that share a layout; the others are not in `rows`."""
    n = len(blobs)
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=n)
    if n and lengths[0] == lengths.min() == lengths.max():  # one length: no reordering
        order = np.arange(n)
        lengths_sorted = lengths
        buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    else:
        order = np.argsort(lengths, kind="stable")
        lengths_sorted = lengths[order]
        buffer = np.frombuffer(b"".join([blobs[i] for i in order.tolist()]), dtype=np.uint8)
    bounds = np.flatnonzero(np.diff(lengths_sorted)) + 1
    starts = np.concatenate(([0], bounds)).tolist()
    stops = np.concatenate((bounds, [n])).tolist()
    parts: list[tuple[np.ndarray, list[str], np.ndarray, np.ndarray]] = []
    offset = 0
    for start, stop in zip(starts, stops, strict=True):
        width = int(lengths_sorted[start])
        count = stop - start
        if count >= _MIN_ROWS and width > 0:
            matrix = buffer[offset : offset + width * count].reshape(count, width)
            for local, symbols, ts, ohlcv in _decode_group(matrix):
                parts.append((order[start + local], symbols, ts, ohlcv))
        offset += width * count
    if not parts:
        return Uniform(np.empty(0, np.int64), [], np.empty(0, np.int64),
                       np.empty((0, 5), np.float64))
    if len(parts) == 1 and (len(parts[0][0]) < 2 or (np.diff(parts[0][0]) > 0).all()):
        return Uniform(*parts[0])  # already in blob order
    rows = np.concatenate([p[0] for p in parts])
    symbols = [s for p in parts for s in p[1]]
    ts = np.concatenate([p[2] for p in parts])
    ohlcv = np.concatenate([p[3] for p in parts])
    back = np.argsort(rows, kind="stable")
    pick = back.tolist()
    return Uniform(rows[back], [symbols[j] for j in pick], ts[back], ohlcv[back])


def _decode_group(
    matrix: np.ndarray,
) -> list[tuple[np.ndarray, list[str], np.ndarray, np.ndarray]]:
    """Rows of one length: up to a few layouts, each decoded for its matching rows."""
    out = []
    remaining = np.arange(len(matrix))
    for _ in range(_TEMPLATES_PER_LENGTH):
        if len(remaining) < _MIN_ROWS:
            break
        layout = parse_layout(matrix[remaining[0]].tobytes())
        if layout is None:
            remaining = remaining[1:]  # that row goes the msgpack way
            continue
        sub = matrix if len(remaining) == len(matrix) else matrix[remaining]
        match = (sub[:, layout.structural] == layout.expected).all(axis=1)
        for v in layout.values:
            if v.dtype == "fixint":
                match &= sub[:, v.type_at] < 0x80
        hit = np.flatnonzero(match)
        if len(hit):
            good, symbols, ts, ohlcv = _values(sub if len(hit) == len(sub) else sub[hit], layout)
            out.append((remaining[hit[good]], symbols, ts, ohlcv))
        remaining = remaining[~match]
    return out


def _values(
    rows: np.ndarray, layout: _Layout
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The values of rows that share `layout`: the indices of the rows kept (the others go the
    msgpack way: an integer a float64 may not hold exactly, a symbol that is not UTF-8 or
    too long) and their columns."""
    k = len(rows)
    good = np.ones(k, dtype=bool)
    ohlcv = np.empty((k, 5), dtype=np.float64)
    ts = np.empty(k, dtype=np.int64)
    symbols: list[str] = []
    for v in layout.values:
        if v.dtype == "str":
            block = rows[:, v.offset : v.offset + v.size]
            symbols, ok = _symbols(block)
            good &= ok
            continue
        if v.dtype == "fixint":
            raw = rows[:, v.type_at].astype(np.int64)
        else:
            raw = np.ascontiguousarray(rows[:, v.offset : v.offset + v.size]).view(v.dtype)[:, 0]
        if v.column == 1:  # ts: an integer type (the layout allows no other)
            if raw.dtype == np.dtype(">u8"):
                good &= raw <= np.iinfo(np.int64).max  # decode_bar says why, not us
            ts = raw.astype(np.int64)
        else:
            if raw.dtype.kind in "iu":
                good &= np.abs(raw.astype(np.float64)) <= _EXACT
            ohlcv[:, v.column - 2] = raw.astype(np.float64)  # columns 2..6: open..volume
    keep = np.flatnonzero(good)
    if len(keep) < k:
        symbols = [symbols[j] for j in keep.tolist()]
    return keep, symbols, ts[keep], ohlcv[keep]


def _symbols(block: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Each row's bytes as a str; rows that are not valid UTF-8 (or decode to a length out
    of bounds) are marked False (and get a placeholder)."""
    k, width = block.shape
    ok = np.ones(k, dtype=bool)
    if not (block >= 0x80).any():  # ASCII: one decode, then fixed-width slices
        text = block.tobytes().decode("ascii")
        ok[:] = width <= MAX_SYMBOL_CHARS
        return [text[i : i + width] for i in range(0, k * width, width)], ok
    symbols: list[str] = []
    for j, raw in enumerate(block):
        try:
            s = raw.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            s = ""
        if not 0 < len(s) <= MAX_SYMBOL_CHARS:
            ok[j] = False
        symbols.append(s)
    return symbols, ok


def parse_layout(blob: bytes) -> _Layout | None:
    """The layout of one bar map, or None if it is not a 7-key map of the bar's keys with
    a str symbol, an integer ts and integer or float numbers filling the whole blob."""
    if not blob or blob[0] != 0x87:  # a fixmap of exactly the seven keys
        return None
    structural = [0]
    pos = 1
    found: dict[int, _Value] = {}
    end = len(blob)
    for _ in range(7):
        key, pos_after = _read_str(blob, pos)
        if key is None or key not in _COLUMN or _COLUMN[key] in found:
            return None
        structural.extend(range(pos, pos_after))
        column = _COLUMN[key]
        pos = pos_after
        if pos >= end:
            return None
        t = blob[pos]
        if column == 0:
            header = _str_header(blob, pos)
            if header is None:
                return None
            start, size = header
            if not 0 < size or start + size > end:
                return None
            structural.extend(range(pos, start))
            found[column] = _Value(column, start, pos, "str", size)
            pos = start + size
            continue
        if t < 0x80:
            found[column] = _Value(column, -1, pos, "fixint", 1)
            pos += 1
            continue
        kind = _INTS.get(t) or (_FLOATS.get(t) if column != 1 else None)
        if kind is None:
            return None
        dtype, size = kind
        if pos + 1 + size > end:
            return None
        structural.append(pos)
        found[column] = _Value(column, pos + 1, pos, dtype, size)
        pos += 1 + size
    if pos != end or len(found) != 7:
        return None
    sb = np.asarray(structural, dtype=np.intp)
    expected = np.frombuffer(blob, dtype=np.uint8)[sb]
    symbol = found[0]
    if symbol.size > 4 * MAX_SYMBOL_CHARS:
        return None
    return _Layout(sb, expected, tuple(found[c] for c in range(7)))


def _str_header(blob: bytes, pos: int) -> tuple[int, int] | None:
    """(first byte, length) of a msgpack str at `pos`, or None if it is not a str."""
    t = blob[pos]
    if 0xA0 <= t <= 0xBF:
        return pos + 1, t & 0x1F
    if t == 0xD9 and pos + 1 < len(blob):
        return pos + 2, blob[pos + 1]
    if t == 0xDA and pos + 2 < len(blob):
        return pos + 3, int.from_bytes(blob[pos + 1 : pos + 3], "big")
    return None


def _read_str(blob: bytes, pos: int) -> tuple[str | None, int]:
    if pos >= len(blob):
        return None, pos
    header = _str_header(blob, pos)
    if header is None:
        return None, pos
    start, size = header
    if start + size > len(blob):
        return None, pos
    try:
        return blob[start : start + size].decode("utf-8"), start + size
    except UnicodeDecodeError:
        return None, pos
