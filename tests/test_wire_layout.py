"""Blobs of one byte layout decoded together: every entry judged exactly as `decode_bar` does.

Batches here are large enough, and their rows alike enough, that `decode_columns` takes the
byte-matrix path of `wire_layout`; each test also checks that it did, so a change that
quietly sends every row the msgpack way fails here instead of passing untested.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire_columns import decode_columns
from daemon.wire_layout import decode_uniform, parse_layout
from tests.test_wire_columns import CHARS, EDGE_VALUES, KEYS, STREAM, assert_parity, ids_for

ROWS = 40  # above the batch and per-length minimums of the matrix path


def pack(m: dict[str, Any], single_float: bool = False) -> bytes:
    return msgpack.packb(m, use_bin_type=True, use_single_float=single_float)


def check(blobs: list[bytes]) -> None:
    fields = [[b"data", b] for b in blobs]
    ids = ids_for(len(fields))
    assert_parity(decode_columns(fields, STREAM, ids), fields, [STREAM] * len(fields), ids)


def bar(i: int, **changes: Any) -> dict[str, Any]:
    close = 100.0 + i * 0.37
    m = {"symbol": f"S{i % 7:04d}", "ts": 1_700_000_000_000 + i * 60_000, "open": close - 0.5,
         "high": close + 1.25, "low": close - 1.0, "close": close, "volume": 1000.0 + i}
    m.update(changes)
    return m


# --- the matrix path is taken, and agrees -----------------------------------------------------


def test_a_feeder_batch_is_decoded_by_layout_and_matches_decode_bar() -> None:
    blobs = [pack(bar(i)) for i in range(ROWS)]
    assert decode_uniform(blobs).rows.tolist() == list(range(ROWS))
    check(blobs)


@pytest.mark.parametrize(
    "variant",
    [
        {"order": list(reversed(KEYS))},
        {"single_float": True},
        {"volume": 12},  # a positive fixint: its value is its type byte
        {"volume": 0},
        {"volume": 70_000},  # uint32
        {"open": 7, "high": 300, "low": -3},  # int prices; the negative one is rejected
        {"ts": 100},  # a fixint ts
        {"ts": 2**63},  # a uint64 beyond int64: rejected as bad_value:ts
        {"ts": -5},
        {"symbol": "X" * 40},  # str8 header
        {"symbol": "X" * 64},
        {"symbol": "X" * 65},  # too long: rejected
        {"symbol": "€" * 64},  # not ASCII, 192 bytes, 64 characters
        {"symbol": "€" * 65},
        {"open": 2**53 + 1},  # a float64 rounds it: left to msgpack, decode_bar rounds it
        {"high": 2**64 - 1},
        {"close": math.nan},
        {"close": -math.inf},
        {"volume": -0.0},
    ],
    ids=lambda v: ",".join(f"{k}={str(x)[:12]}" for k, x in v.items()),
)
def test_every_row_of_a_variant_layout(variant: dict[str, Any]) -> None:
    variant = dict(variant)
    order = variant.pop("order", KEYS)
    single = variant.pop("single_float", False)
    blobs = []
    for i in range(ROWS):
        m = bar(i, **variant)
        if "symbol" in variant:
            m["symbol"] = variant["symbol"]
        blobs.append(pack({k: m[k] for k in order}, single))
    check(blobs)


@pytest.mark.parametrize(("key", "value"), EDGE_VALUES)
def test_an_edge_value_in_every_row(key: str, value: Any) -> None:
    # Same layout throughout, so a whole-matrix check (not a row's own unpack) must judge it.
    check([pack(bar(i, **{key: value})) for i in range(ROWS)])


def test_utf8_symbols_and_a_broken_one_in_the_same_layout() -> None:
    good = [pack(bar(i, symbol="Ü" + "ab"[i % 2])) for i in range(ROWS)]
    assert len({len(b) for b in good}) == 1
    broken = bytearray(good[3])
    at = broken.index("Ü".encode())
    broken[at : at + 2] = b"\xff\xfe"  # same length, not UTF-8: msgpack refuses it
    blobs = good[:3] + [bytes(broken)] + good[4:]
    assert 3 not in decode_uniform(blobs).rows.tolist()
    check(blobs)


def test_rows_of_many_lengths_and_layouts_keep_their_order() -> None:
    blobs = []
    for i in range(6 * ROWS):
        kind = i % 6
        m = bar(i, symbol="A" * (1 + i % 5))
        if kind == 1:
            m = {k: m[k] for k in reversed(KEYS)}
        elif kind == 2:
            m["volume"] = i  # ints of several widths
        elif kind == 3:
            m["extra"] = 1  # another key: left to msgpack, accepted there
        blobs.append(pack(m, single_float=kind == 4))
    decoded = decode_uniform(blobs).rows
    assert len(decoded) > 3 * ROWS and (np.diff(decoded) > 0).all()
    check(blobs)


# --- corrupted rows among good ones -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.data(),
    st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, 200), st.integers(0, 255)),
             min_size=1, max_size=6),
)
def test_a_byte_changed_in_some_rows(data: st.DataObject, edits: list[tuple[int, int, int]]) -> None:
    # Every byte of a layout is either structure, a value or part of the symbol; changing any
    # of them in one row must leave that row judged as decode_bar judges it.
    symbol = data.draw(st.text(CHARS, min_size=1, max_size=6), label="symbol")
    volume = data.draw(st.sampled_from([5, 300, 70_000, 2.5, 2**40]), label="volume")
    single = data.draw(st.booleans(), label="single_float")
    blobs = [bytearray(pack(bar(i, symbol=symbol, volume=volume), single)) for i in range(ROWS)]
    assert len({len(b) for b in blobs}) == 1
    for row, at, value in edits:
        blobs[row][at % len(blobs[row])] = value
    check([bytes(b) for b in blobs])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, ROWS - 1), max_size=5), st.integers(1, 9))
def test_rows_cut_or_extended_to_another_length(rows: list[int], by: int) -> None:
    blobs = [pack(bar(i)) for i in range(ROWS)]
    for r in rows:
        blobs[r] = blobs[r][:-by] if r % 2 else blobs[r] + b"\x00" * by
    check(blobs)


# --- the layout parser ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m",
    [
        {"symbol": "A", "ts": 1.5, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1},
        {"symbol": b"A", "ts": 1, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1},
        {"symbol": "A", "ts": 1, "open": True, "high": 1, "low": 1, "close": 1, "volume": 1},
        {"symbol": "A", "ts": 1, "open": None, "high": 1, "low": 1, "close": 1, "volume": 1},
        {"symbol": "A", "ts": 1, "open": 1, "high": 1, "low": 1, "close": 1},
        {"symbol": "A", "ts": 1, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1, "x": 1},
        {"symbol": "A", "ts": 1, "open": 1, "high": 1, "low": 1, "close": 1, "vol": 1},
        {"symbol": "", "ts": 1, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1},
    ],
)
def test_layouts_the_parser_leaves_to_msgpack(m: dict[str, Any]) -> None:
    assert parse_layout(pack(m)) is None


def test_a_layout_with_trailing_bytes_is_not_one() -> None:
    blob = pack(bar(0))
    assert parse_layout(blob) is not None
    assert parse_layout(blob + b"\x00") is None
    assert parse_layout(blob[:-1]) is None
