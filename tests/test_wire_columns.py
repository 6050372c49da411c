"""Batch decoding into columns: `decode_columns` must judge every entry exactly as `decode_bar`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire import Bar, Rejection, decode_bar
from daemon.wire_columns import BarColumns, decode_columns

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1  # the largest int msgpack can carry
KEYS = ("symbol", "ts", "open", "high", "low", "close", "volume")
CHARS = st.characters(blacklist_categories=("Cs",))  # any code point msgpack can pack
STREAM = "bars"


# --- the reference ----------------------------------------------------------------------------


def as_mapping(fields: Any) -> Mapping[Any, Any]:
    """An entry's fields as Redis maps them: a flat [k, v, k, v, ...] list becomes a dict."""
    if isinstance(fields, Mapping):
        return fields
    flat = list(fields)
    return dict(zip(flat[0::2], flat[1::2], strict=False))


def float_bits(values: list[float]) -> list[bytes]:
    return [np.float64(v).tobytes() for v in values]


def assert_parity(
    cols: BarColumns,
    fields: list[Any],
    streams: list[str],
    ids: list[str],
    refuse: dict[int, str] | None = None,
) -> None:
    """`cols` holds exactly what `decode_bar` gives, entry by entry, in entry order."""
    refuse = refuse or {}
    bars: list[tuple[int, Bar]] = []
    rejected: list[tuple[int, Rejection]] = []
    for i, f in enumerate(fields):
        if i in refuse:
            rejected.append((i, Rejection(refuse[i], dict(as_mapping(f)), streams[i], ids[i])))
            continue
        item = decode_bar(as_mapping(f), streams[i], ids[i])
        if isinstance(item, Bar):
            bars.append((i, item))
        else:
            rejected.append((i, item))

    assert cols.positions == [i for i, _ in bars]
    assert len(cols) == len(bars)
    assert cols.symbols == [bar.symbol for _, bar in bars]
    assert all(type(s) is str for s in cols.symbols)
    assert cols.ts.dtype == np.int64 and cols.ts.shape == (len(bars),)
    assert cols.ts.tolist() == [bar.ts for _, bar in bars]
    assert cols.ohlcv.dtype == np.float64 and cols.ohlcv.shape == (len(bars), 5)
    for row, (_, bar) in zip(cols.ohlcv, bars, strict=True):
        expected = [bar.open, bar.high, bar.low, bar.close, bar.volume]
        assert float_bits(row.tolist()) == float_bits(expected), (bar, row)
    assert cols.rejected == rejected


# --- what a batch is made of ------------------------------------------------------------------

symbols = st.text(CHARS, min_size=1, max_size=64)
# Hypothesis favours small ints; ints above 2**53 are where a float64 would round them.
timestamps = st.one_of(
    st.integers(1, INT64_MAX),
    st.integers(2**53, INT64_MAX),
    st.sampled_from([1, 1_700_000_000_000, INT64_MAX]),
)
# Ints up to 2**64-1: a float64 must round them as Python's float() does.
prices = st.one_of(
    st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    st.integers(1, UINT64_MAX),
    st.integers(2**53, UINT64_MAX),
    st.sampled_from([2**53 + 1, 2**63 - 1, 2**63 + 1, 2**64 - 1, 5e-324, 1.7976931348623157e308]),
)
volumes = st.one_of(prices, st.sampled_from([0, 0.0, -0.0]))

# Values that break a bar, for any key; all of them packable by msgpack.
wild_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), UINT64_MAX),
    st.floats(),
    st.text(CHARS, max_size=70),
    st.text(CHARS, min_size=63, max_size=66),
    st.binary(max_size=8),
    st.lists(st.integers(0, 3), max_size=2),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    st.just(msgpack.Timestamp(1_700_000_000, 0)),
    st.sampled_from(
        [
            0, -1, 0.0, -0.0, math.nan, math.inf, -math.inf, 2**63, UINT64_MAX, -(2**63),
            1_700_000_000_000.0, 1_700_000_000_000.5, 9.223372036854775807e18,
            9.223372036854774784e18, "101.5", "", "X" * 64, "X" * 65, "€" * 64, "€" * 65, "AAPL",
        ]
    ),
)
extra_keys = st.one_of(
    st.sampled_from(["exchange", "Symbol", "TS", "data", "", "v"]),
    st.integers(0, 3),
    st.sampled_from([b"symbol", b"ts", b"close"]),  # bin keys: not the str key the bar needs
)


@st.composite
def bar_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid bar, then a few changes: a key set to a wild value, removed, or an extra key."""
    m: dict[Any, Any] = {
        "symbol": draw(symbols),
        "ts": draw(timestamps),
        **{key: draw(prices) for key in ("open", "high", "low", "close")},
        "volume": draw(volumes),
    }
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "del", "extra"]))
        if op == "set":
            m[draw(st.sampled_from(KEYS))] = draw(wild_values)
        elif op == "del":
            m.pop(draw(st.sampled_from(KEYS)), None)
        else:
            m[draw(extra_keys)] = draw(wild_values)
    if draw(st.booleans()):
        items = list(m.items())
        m = dict(draw(st.permutations(items)))
    return m


@st.composite
def data_blobs(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["map", "map", "map", "other", "garbage", "cut", "extra"]))
    if kind == "garbage":
        return draw(st.binary(max_size=40))
    if kind == "other":  # msgpack, but not a map
        return msgpack.packb(draw(wild_values), use_bin_type=True)
    m = draw(bar_maps())
    use_bin_type = draw(st.booleans())  # False: bytes pack as str (maybe not UTF-8)
    try:
        blob = msgpack.packb(
            m, use_bin_type=use_bin_type, use_single_float=draw(st.booleans())
        )
    except OverflowError:  # a float beyond float32's range
        blob = msgpack.packb(m, use_bin_type=use_bin_type)
    if kind == "cut":
        return blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    if kind == "extra":
        return blob + draw(st.binary(min_size=1, max_size=3))
    return blob


flat_texts = st.one_of(
    st.sampled_from(
        [
            b"", b"nan", b"inf", b"-inf", b"-1", b"0", b"0.0", b"-0.0", b"1e400", b"1" + b"0" * 400,
            b"abc", b"1_000", b" 12 ", b"0x10", b"1e-400", b"1.7e12", b"1700000000000.0",
            b"1700000000000.5", b"9223372036854775807", b"9223372036854775808",
            b"9.223372036854775807e18", "\u0661\u0662".encode(), b"\xff\xfe", b"A" * 65,
        ]
    ),
    st.text(CHARS, max_size=12).map(str.encode),
    st.binary(max_size=6),
)


def number_text(value: Any) -> bytes:
    return (repr(value) if isinstance(value, float) else str(value)).encode()


@st.composite
def flat_pairs(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Flat fields as Redis returns them: a valid bar in decimal strings, then a few changes."""
    pairs = {
        b"symbol": draw(symbols).encode(),
        b"ts": draw(
            st.one_of(
                timestamps.map(number_text),
                timestamps.map(lambda t: f"{t}.0".encode()),
                timestamps.map(lambda t: f"{t:e}".encode()),
            )
        ),
        **{key.encode(): number_text(draw(prices)) for key in ("open", "high", "low", "close")},
        b"volume": number_text(draw(volumes)),
    }
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KEYS)).encode()
        op = draw(st.sampled_from(["set", "del", "extra"]))
        if op == "set":
            pairs[key] = draw(flat_texts)
        elif op == "del":
            pairs.pop(key, None)
        else:
            pairs[draw(st.sampled_from([b"exchange", b"Symbol", b"error"]))] = draw(flat_texts)
    return draw(st.permutations(list(pairs.items())))


def flatten(pairs: list[tuple[Any, Any]]) -> list[Any]:
    return [x for pair in pairs for x in pair]


@st.composite
def entries(draw: st.DrawFn) -> Any:
    """One entry's fields, in one of the forms a Redis client hands over."""
    kind = draw(
        st.sampled_from(
            ["data", "data", "data", "data+", "data-dict", "flat", "flat-dict", "flat-str", "odd"]
        )
    )
    if kind == "data":
        pair = [b"data", draw(data_blobs())]
        return tuple(pair) if draw(st.booleans()) else pair
    if kind == "data+":  # other fields beside `data`, maybe a second `data` (the last one wins)
        pairs = [(b"data", draw(data_blobs()))]
        more = st.tuples(
            st.sampled_from([b"data", b"symbol", b"ts", b"x", "data", b"DATA"]),
            st.one_of(data_blobs(), flat_texts),
        )
        pairs += draw(st.lists(more, min_size=1, max_size=3))
        return flatten(draw(st.permutations(pairs)))
    if kind == "data-dict":
        extra = draw(st.dictionaries(st.sampled_from([b"symbol", b"x", "data"]), flat_texts))
        return {**extra, b"data": draw(data_blobs())}
    if kind == "flat":
        return flatten(draw(flat_pairs()))
    if kind == "flat-dict":
        return dict(draw(flat_pairs()))
    if kind == "flat-str":  # a client with decode_responses=True
        return {
            k.decode(): v.decode("utf-8", "surrogateescape") for k, v in draw(flat_pairs())
        }
    whole = flatten(draw(st.one_of(flat_pairs(), st.just([(b"data", b"")]))))
    return whole[: draw(st.integers(0, len(whole)))]  # empty, or a key without its value


batches = st.lists(entries(), max_size=50)


def ids_for(n: int) -> list[str]:
    return [f"1700000000000-{i}" for i in range(n)]


def clean_bar(symbol: str, ts: int, close: float) -> list[bytes]:
    m = {"symbol": symbol, "ts": ts, "open": close, "high": close, "low": close, "close": close,
         "volume": 1}
    return [b"data", msgpack.packb(m, use_bin_type=True)]


# --- parity with decode_bar -------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(batches)
def test_every_entry_is_judged_as_decode_bar_judges_it(fields: list[Any]) -> None:
    ids = ids_for(len(fields))
    assert_parity(decode_columns(fields, STREAM, ids), fields, [STREAM] * len(fields), ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["bars", "bars:b", "ß"]), entries()), max_size=30))
def test_each_entry_keeps_its_own_stream(tagged: list[tuple[str, Any]]) -> None:
    streams = [s for s, _ in tagged]
    fields = [f for _, f in tagged]
    ids = ids_for(len(fields))
    assert_parity(decode_columns(fields, streams, ids), fields, streams, ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(bar_maps(), wild_values), min_size=1, max_size=50))
def test_batches_of_msgpack_maps_only(maps: list[Any]) -> None:
    # Every entry takes the `data` path, so the whole-batch numpy checks see every bad value.
    fields = [[b"data", msgpack.packb(m, use_bin_type=True)] for m in maps]
    ids = ids_for(len(fields))
    assert_parity(decode_columns(fields, STREAM, ids), fields, [STREAM] * len(fields), ids)


EDGE_VALUES = [
    ("ts", 0), ("ts", -1), ("ts", INT64_MAX), ("ts", 2**63), ("ts", UINT64_MAX),
    ("ts", 1_700_000_000_000.0), ("ts", 1_700_000_000_000.5), ("ts", 9.223372036854775807e18),
    ("ts", 9.223372036854774784e18), ("ts", True), ("ts", None), ("ts", "1700000000000"),
    ("ts", math.nan), ("open", 0), ("open", 0.0), ("open", -0.0), ("open", -1.5),
    ("open", math.nan), ("open", math.inf), ("open", True), ("open", None), ("open", "101"),
    ("open", 2**53 + 1), ("open", 2**64 - 1), ("close", 5e-324), ("volume", 0),
    ("volume", -0.0), ("volume", -1), ("volume", math.inf), ("volume", False),
    ("symbol", ""), ("symbol", "X" * 64), ("symbol", "X" * 65), ("symbol", "€" * 64),
    ("symbol", "€" * 65), ("symbol", b"AAPL"), ("symbol", 7), ("symbol", None),
]


@pytest.mark.parametrize(("key", "value"), EDGE_VALUES)
def test_a_value_at_the_edge_between_good_bars(key: str, value: Any) -> None:
    # Alone among good bars, so a check made for the whole batch at once must catch it too.
    m = {"symbol": "AAPL", "ts": 1_700_000_000_000, "open": 1.0, "high": 2.0, "low": 0.5,
         "close": 1.5, "volume": 10.0, key: value}
    good = clean_bar("MSFT", 1_700_000_000_000, 3.0)
    fields = [good, [b"data", msgpack.packb(m)], good]
    ids = ids_for(len(fields))
    cols = decode_columns(fields, STREAM, ids)
    assert_parity(cols, fields, [STREAM] * len(fields), ids)
    assert cols.positions[0] == 0 and cols.positions[-1] == 2


def test_every_edge_value_in_one_batch() -> None:
    fields: list[Any] = []
    for key, value in EDGE_VALUES:
        m = {"symbol": "AAPL", "ts": 1_700_000_000_000, "open": 1.0, "high": 2.0, "low": 0.5,
             "close": 1.5, "volume": 10.0, key: value}
        fields += [clean_bar("MSFT", 1_700_000_000_000, 3.0), [b"data", msgpack.packb(m)]]
    for key in KEYS:
        m = {"symbol": "AAPL", "ts": 1, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}
        del m[key]
        fields.append([b"data", msgpack.packb(m)])
    huge = {b"symbol": b"AAPL", b"ts": b"1", b"open": 10**400, b"high": b"1", b"low": b"1",
            b"close": b"1", b"volume": b"1"}  # a Python int no float holds, in a mapping
    fields += [huge, {**huge, b"ts": 10**400, b"open": b"1"}, [], [b"data"], [b"data", b"\xc1"]]
    ids = ids_for(len(fields))
    cols = decode_columns(fields, STREAM, ids)
    assert_parity(cols, fields, [STREAM] * len(fields), ids)
    assert len(cols) > len(EDGE_VALUES)  # the good bars all came through


def test_a_mapping_that_is_not_a_dict() -> None:
    # decode_columns documents `fields[i]` as "a flat field list or a mapping"; decode_bar
    # takes any Mapping. A read-only view of a valid entry must decode like the dict itself.
    entry = {b"data": clean_bar("AAPL", 1_700_000_000_000, 1.0)[1], b"x": b"y"}
    fields = [MappingProxyType(entry), MappingProxyType({b"symbol": b"AAPL"})]
    ids = ids_for(len(fields))
    cols = decode_columns(fields, STREAM, ids)
    assert_parity(cols, fields, [STREAM] * len(fields), ids)


# --- refused entries --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_refused_entries_are_rejected_with_the_given_reason(data: st.DataObject) -> None:
    fields = data.draw(batches)
    positions = st.integers(0, max(0, len(fields) - 1))
    reasons = st.sampled_from(["poison", "too_many_deliveries"])
    refuse = data.draw(st.dictionaries(positions, reasons, max_size=10 if fields else 0))
    ids = ids_for(len(fields))
    cols = decode_columns(fields, STREAM, ids, refuse=refuse)
    assert_parity(cols, fields, [STREAM] * len(fields), ids, refuse)
    assert not set(refuse) & set(cols.positions)


def test_a_refused_good_bar_is_not_decoded() -> None:
    fields = [clean_bar("A", 1, 1.0), clean_bar("B", 2, 2.0), clean_bar("C", 3, 3.0)]
    cols = decode_columns(fields, STREAM, ["1-0", "2-0", "3-0"], refuse={1: "poison"})
    assert cols.positions == [0, 2]
    assert cols.symbols == ["A", "C"]
    assert cols.rejected == [(1, Rejection("poison", dict(as_mapping(fields[1])), STREAM, "2-0"))]


# --- BarColumns -------------------------------------------------------------------------------

good_bars = st.builds(
    Bar,
    symbol=symbols,
    ts=timestamps,
    open=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    high=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    low=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    close=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    volume=st.one_of(st.floats(min_value=0.0, allow_infinity=False), st.just(-0.0)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(good_bars, max_size=30))
def test_from_bars(bars: list[Bar]) -> None:
    cols = BarColumns.from_bars(bars)
    assert cols.positions == list(range(len(bars)))
    assert cols.symbols == [b.symbol for b in bars]
    assert cols.ts.dtype == np.int64 and cols.ts.tolist() == [b.ts for b in bars]
    assert cols.ohlcv.dtype == np.float64 and cols.ohlcv.shape == (len(bars), 5)
    expected = [v for b in bars for v in (b.open, b.high, b.low, b.close, b.volume)]
    assert float_bits(cols.ohlcv.ravel().tolist()) == float_bits(expected)
    assert cols.rejected == []


def rows_of(cols: BarColumns) -> list[tuple[int, str, int, list[bytes]]]:
    """Every row as plain values (floats by their bits), to compare column sets."""
    return [
        (p, s, t, float_bits(row))
        for p, s, t, row in zip(
            cols.positions, cols.symbols, cols.ts.tolist(), cols.ohlcv.tolist(), strict=True
        )
    ]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_take_picks_rows_in_the_order_given(data: st.DataObject) -> None:
    fields = data.draw(batches)
    cols = decode_columns(fields, STREAM, ids_for(len(fields)))
    picks = st.integers(0, max(0, len(cols) - 1))
    rows = data.draw(st.lists(picks, max_size=20 if len(cols) else 0))  # any order, repeats
    as_array = data.draw(st.booleans())
    taken = cols.take(np.asarray(rows, dtype=np.int64) if as_array else rows)
    everything = rows_of(cols)
    assert rows_of(taken) == [everything[r] for r in rows]
    assert taken.ts.dtype == np.int64 and taken.ohlcv.shape == (len(rows), 5)
    assert taken.rejected == []


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_window_is_a_slice(data: st.DataObject) -> None:
    fields = data.draw(batches)
    cols = decode_columns(fields, STREAM, ids_for(len(fields)))
    n = len(cols)
    start = data.draw(st.integers(-n - 2, n + 2))
    stop = data.draw(st.integers(-n - 2, n + 2))
    window = cols.window(start, stop)
    assert rows_of(window) == rows_of(cols)[start:stop]
    assert window.ts.dtype == np.int64 and window.ohlcv.shape[1:] == (5,)
    assert window.rejected == []
    if len(window):  # views of the batch's arrays, not copies
        assert np.shares_memory(window.ts, cols.ts)
        assert np.shares_memory(window.ohlcv, cols.ohlcv)
