"""Wire format of bars: decoding and every rejection, encoding, dead letters, fuzzing."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire import (
    Bar,
    Rejection,
    dead_letter_fields,
    decode_bar,
    encode_bar,
)

GOOD: dict[str, Any] = {
    "symbol": "AAPL",
    "ts": 1_700_000_000_000,
    "open": 101.5,
    "high": 102.0,
    "low": 100.25,
    "close": 101.0,
    "volume": 1234.0,
}
INT64_MAX = 2**63 - 1


def packed(**changes: Any) -> dict[bytes, bytes]:
    """An entry with a `data` field: GOOD with `changes` (a value of ... removes the key)."""
    m = {**GOOD, **changes}
    m = {k: v for k, v in m.items() if v is not ...}
    return {b"data": msgpack.packb(m, use_bin_type=True)}


def flat(**changes: Any) -> dict[bytes, bytes]:
    """Flat fields as Redis returns them (bytes), from GOOD with `changes`."""
    m = {**GOOD, **changes}
    return {k.encode(): str(v).encode() for k, v in m.items() if v is not ...}


def reason(fields: Any) -> str:
    result = decode_bar(fields, "bars", "1-0")
    assert isinstance(result, Rejection), result
    return result.reason


def decoded(fields: Any) -> Bar:
    result = decode_bar(fields, "bars", "1700000000000-0")
    assert isinstance(result, Bar), result
    return result


# --- accepted bars ----------------------------------------------------------------------------


def test_msgpack_bar() -> None:
    bar = decoded(packed())
    assert bar == Bar(
        "AAPL", 1_700_000_000_000, 101.5, 102.0, 100.25, 101.0, 1234.0, "bars", "1700000000000-0"
    )
    assert bar.src == "bars/1700000000000-0"
    assert type(bar.ts) is int
    assert all(type(getattr(bar, k)) is float for k in ("open", "high", "low", "close", "volume"))


def test_bar_is_frozen() -> None:
    bar = decoded(packed())
    with pytest.raises(AttributeError):
        bar.close = 5.0  # type: ignore[misc]


def test_msgpack_int_prices_are_floats() -> None:
    # A JavaScript feeder sends 101.0 as the int 101.
    bar = decoded(packed(open=101, high=102, low=100, close=101, volume=0))
    assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == (101.0, 102.0, 100.0, 101.0, 0.0)
    assert type(bar.open) is float and type(bar.volume) is float


def test_flat_fields_like_redis_cli() -> None:
    fields = {
        b"symbol": b"AAPL",
        b"ts": b"1700000000000",
        b"open": b"1",
        b"high": b"1",
        b"low": b"1",
        b"close": b"1",
        b"volume": b"5",
    }
    bar = decoded(fields)
    assert (bar.symbol, bar.ts, bar.close, bar.volume) == ("AAPL", 1_700_000_000_000, 1.0, 5.0)


def test_flat_fields_with_str_keys_and_values() -> None:
    fields = {k.decode(): v.decode() for k, v in flat(close="99.5").items()}
    assert decoded(fields).close == 99.5


@pytest.mark.parametrize("text", ["1700000000000.0", "1.7e12", "1700000000000.000"])
def test_flat_ts_integral_decimal_strings_are_accepted(text: str) -> None:
    assert decoded(flat(ts=text)).ts == 1_700_000_000_000


def test_ts_float_with_integral_value_is_accepted() -> None:
    assert decoded(packed(ts=1_700_000_000_000.0)).ts == 1_700_000_000_000


def test_ts_int64_max_is_accepted() -> None:
    assert decoded(packed(ts=INT64_MAX)).ts == INT64_MAX
    assert decoded(flat(ts=INT64_MAX)).ts == INT64_MAX


def test_symbol_of_64_chars_and_unicode() -> None:
    assert decoded(packed(symbol="X" * 64)).symbol == "X" * 64
    assert decoded(packed(symbol="€URO")).symbol == "€URO"
    assert decoded(flat(symbol="€URO")).symbol == "€URO"


def test_unknown_keys_are_ignored() -> None:
    assert decoded(packed(exchange="XNAS", extra={"a": [1, 2]})).symbol == "AAPL"
    assert decoded({**flat(), b"exchange": b"XNAS"}).symbol == "AAPL"


def test_data_field_wins_over_flat_fields() -> None:
    fields = {**flat(symbol="FLAT"), **packed(symbol="PACKED")}
    assert decoded(fields).symbol == "PACKED"


def test_zero_volume_is_valid() -> None:
    assert decoded(packed(volume=0.0)).volume == 0.0
    assert decoded(flat(volume="0")).volume == 0.0


# --- rejected bars ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x81\xa1a",
        msgpack.packb([1, 2]),
        msgpack.packb("str"),
        msgpack.packb(None),
        msgpack.packb(5),
        msgpack.packb(GOOD) + b"\x00",
    ],
    ids=[
        "empty",
        "reserved_byte",
        "truncated_array",
        "truncated_map",
        "array",
        "string",
        "nil",
        "int",
        "trailing_bytes",
    ],
)
def test_undecodable_data_is_decode_error(data: bytes) -> None:
    assert reason({b"data": data}) == "decode_error"


def test_non_utf8_msgpack_string_is_decode_error() -> None:
    # A str header (0xa2) followed by bytes that are not UTF-8.
    data = b"\x81\xa6symbol\xa2\xff\xfe"
    assert reason({b"data": data}) == "decode_error"


def test_non_str_map_keys_are_ignored() -> None:
    m = {**GOOD, 5: "x", b"bin": 1}
    bar = decode_bar({b"data": msgpack.packb(m, use_bin_type=True)}, "bars", "1-0")
    assert isinstance(bar, Bar)


@pytest.mark.parametrize("key", ["symbol", "ts", "open", "high", "low", "close", "volume"])
def test_missing_field(key: str) -> None:
    assert reason(packed(**{key: ...})) == f"missing_field:{key}"
    assert reason(flat(**{key: ...})) == f"missing_field:{key}"


def test_no_fields_at_all() -> None:
    # XADD needs a field: an entry without any is one deleted from the stream while pending.
    assert reason({}) == "entry_deleted"


def test_first_bad_field_in_order_is_reported() -> None:
    assert reason(packed(ts=-1, close=-1)) == "bad_value:ts"
    assert reason(packed(open=..., close="x")) == "missing_field:open"


@pytest.mark.parametrize("key", ["open", "high", "low", "close"])
@pytest.mark.parametrize(
    "value", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "101", None, True, False, [1.0]]
)
def test_bad_prices(key: str, value: Any) -> None:
    assert reason(packed(**{key: value})) == f"bad_value:{key}"


@pytest.mark.parametrize("key", ["open", "high", "low", "close"])
@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "", "abc", "1,5", "0x10"])
def test_bad_flat_prices(key: str, text: str) -> None:
    assert reason(flat(**{key: text})) == f"bad_value:{key}"


@pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, "5", None, True])
def test_bad_volume(value: Any) -> None:
    assert reason(packed(volume=value)) == "bad_value:volume"


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        0.0,
        -5.0,
        1.5,
        1_700_000_000_000.5,
        math.nan,
        math.inf,
        2**63,
        2**64 - 1,
        9.3e18,
        "1700000000000",
        None,
        True,
        False,
        [1],
    ],
)
def test_bad_ts(value: Any) -> None:
    assert reason(packed(ts=value)) == "bad_value:ts"


@pytest.mark.parametrize(
    "text", ["0", "-1", "1.5", "1700000000000.5", "nan", "inf", "", "x", str(2**63), "1e999999999"]
)
def test_bad_flat_ts(text: str) -> None:
    assert reason(flat(ts=text)) == "bad_value:ts"


@pytest.mark.parametrize("value", ["", "X" * 65, 5, None, True, b"AAPL", ["AAPL"]])
def test_bad_symbol(value: Any) -> None:
    assert reason(packed(symbol=value)) == "bad_value:symbol"


def test_bad_flat_symbol() -> None:
    assert reason(flat(symbol="")) == "bad_value:symbol"
    assert reason(flat(symbol="X" * 65)) == "bad_value:symbol"
    assert reason({**flat(), b"symbol": b"\xff\xfe"}) == "bad_value:symbol"


def test_rejection_keeps_the_original_fields_and_source() -> None:
    fields = packed(close=-1.0)
    result = decode_bar(fields, "bars:{3}", "5-1")
    assert result == Rejection("bad_value:close", fields, "bars:{3}", "5-1")
    assert result.fields is not fields  # a copy: the caller may reuse its dict


def test_misbehaving_mapping_is_a_rejection() -> None:
    class Broken(dict):  # type: ignore[type-arg]
        def get(self, *args: Any) -> Any:
            raise RuntimeError("boom")

    assert reason(Broken({b"symbol": b"A"})) == "decode_error"


# --- dead letters -----------------------------------------------------------------------------


def test_dead_letter_fields_keep_original_bytes() -> None:
    fields = {b"data": b"\xc1\xff", b"note": b"\x00\x01"}
    rejection = decode_bar(fields, "bars", "17-0")
    assert isinstance(rejection, Rejection)
    assert dead_letter_fields(rejection) == {
        b"data": b"\xc1\xff",
        b"note": b"\x00\x01",
        b"error": b"decode_error",
        b"src_stream": b"bars",
        b"src_id": b"17-0",
    }


def test_dead_letter_daemon_fields_win() -> None:
    fields = {**flat(close="-1"), b"error": b"mine", "src_id": "theirs"}
    rejection = decode_bar(fields, "bars:{2}", "9-3")
    assert isinstance(rejection, Rejection)
    out = dead_letter_fields(rejection)
    assert out[b"error"] == b"bad_value:close"
    assert out[b"src_stream"] == b"bars:{2}"
    assert out[b"src_id"] == b"9-3"
    assert out[b"close"] == b"-1"
    assert all(type(k) is bytes and type(v) is bytes for k, v in out.items())


def test_dead_letter_for_out_of_order() -> None:
    rejection = Rejection("out_of_order", flat(), "bars", "3-0")
    out = dead_letter_fields(rejection)
    assert out[b"error"] == b"out_of_order"
    assert out[b"symbol"] == b"AAPL"


# --- encode_bar -------------------------------------------------------------------------------


def test_encode_bar_round_trip() -> None:
    fields = encode_bar(GOOD)
    assert list(fields) == ["data"]
    assert decoded(fields).close == 101.0
    bar = decoded(fields)
    again = decode_bar(encode_bar(bar), "bars", "1700000000000-0")
    assert again == bar


def test_encode_bar_converts_numpy_and_packs_float64() -> None:
    fields = encode_bar(
        {
            "symbol": np.str_("MSFT"),
            "ts": np.int64(1_700_000_000_000),
            "open": np.float32(1.5),
            "high": np.float64(2.0),
            "low": 1,
            "close": np.int32(2),
            "volume": np.float64(0.0),
            "ignored": object(),
        }
    )
    m = msgpack.unpackb(fields["data"])
    assert m == {
        "symbol": "MSFT",
        "ts": 1_700_000_000_000,
        "open": 1.5,
        "high": 2.0,
        "low": 1.0,
        "close": 2.0,
        "volume": 0.0,
    }
    assert fields["data"].count(b"\xcb") == 5  # five float64 values, no float32 (0xca)
    assert b"\xca" not in fields["data"]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"close": -1.0}, "bad_value:close"),
        ({"ts": 1.5}, "bad_value:ts"),
        ({"ts": True}, "bad_value:ts"),
        ({"symbol": ""}, "bad_value:symbol"),
        ({"symbol": 5}, "bad_value:symbol"),
        ({"volume": "5"}, "bad_value:volume"),
        ({"open": ...}, "missing_field:open"),
    ],
)
def test_encode_bar_refuses_what_the_daemon_would_reject(
    changes: dict[str, Any], expected: str
) -> None:
    bar = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    with pytest.raises(ValueError, match=f"^{expected}$"):
        encode_bar(bar)


# --- fuzzing ----------------------------------------------------------------------------------

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=70)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=6,
)
bar_keys = st.sampled_from(["symbol", "ts", "open", "high", "low", "close", "volume", "data", "x"])


def check_decoded(result: Any) -> None:
    assert isinstance(result, Bar | Rejection)
    if isinstance(result, Bar):
        assert 0 < len(result.symbol) <= 64
        assert 0 < result.ts <= INT64_MAX
        for price in (result.open, result.high, result.low, result.close):
            assert math.isfinite(price) and price > 0
        assert math.isfinite(result.volume) and result.volume >= 0
    else:
        assert result.reason in ("decode_error", "entry_deleted") or result.reason.startswith(
            ("missing_field:", "bad_value:")
        )
        dead = dead_letter_fields(result)
        assert all(type(k) is bytes and type(v) is bytes for k, v in dead.items())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_data_bytes(data: bytes) -> None:
    check_decoded(decode_bar({b"data": data}, "bars", "1-0"))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.one_of(bar_keys, st.text(max_size=8)), msgpack_values, max_size=9))
def test_fuzz_random_msgpack_maps(m: dict[str, Any]) -> None:
    check_decoded(decode_bar({b"data": msgpack.packb(m, use_bin_type=True)}, "bars", "1-0"))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(bar_keys, msgpack_scalars, max_size=3))
def test_fuzz_good_bar_with_random_values(changes: dict[str, Any]) -> None:
    m = {**GOOD, **changes}
    check_decoded(decode_bar({b"data": msgpack.packb(m, use_bin_type=True)}, "bars", "1-0"))
    flat_fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in m.items()}
    check_decoded(decode_bar(flat_fields, "bars", "1-0"))


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.one_of(bar_keys.map(str.encode), st.binary(max_size=8)), st.binary(max_size=30)
    )
)
def test_fuzz_random_flat_fields(fields: dict[bytes, bytes]) -> None:
    check_decoded(decode_bar(fields, "bars", "1-0"))


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "symbol": st.text(min_size=1, max_size=64),
            "ts": st.integers(min_value=1, max_value=INT64_MAX),
            "open": st.floats(min_value=1e-9, max_value=1e12),
            "high": st.floats(min_value=1e-9, max_value=1e12),
            "low": st.floats(min_value=1e-9, max_value=1e12),
            "close": st.floats(min_value=1e-9, max_value=1e12),
            "volume": st.floats(min_value=0, max_value=1e15),
        }
    )
)
def test_fuzz_valid_bars_round_trip(m: dict[str, Any]) -> None:
    bar = decoded(encode_bar(m))
    assert (bar.symbol, bar.ts, bar.open, bar.close, bar.volume) == (
        m["symbol"],
        m["ts"],
        m["open"],
        m["close"],
        m["volume"],
    )
    flat_fields = {
        k.encode(): repr(v).encode() if isinstance(v, float) else str(v).encode()
        for k, v in m.items()
    }
    assert decoded(flat_fields) == bar


def test_an_entry_deleted_before_it_was_handled_is_told_as_such() -> None:
    # A pending entry trimmed away (the feeder's MAXLEN) or XDEL'd reads back with no fields:
    # not the feeder's missing field.
    from daemon.wire import ENTRY_DELETED, Rejection
    from daemon.wire_columns import decode_columns

    got = decode_bar({}, "bars", "5-0")
    assert isinstance(got, Rejection) and got.reason == ENTRY_DELETED
    cols = decode_columns([[], [b"symbol", b"A"]], ["bars", "bars"], ["5-0", "6-0"])
    assert [r.reason for _, r in cols.rejected] == [ENTRY_DELETED, "missing_field:ts"]
