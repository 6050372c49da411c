"""The Redis wire format of bars (CONTRACT section 4): decoding and validation, encoding, and
dead letters; prediction events are `daemon.wire_events`. Pure: no Redis, no asyncio, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack

WIRE_VERSION = 1
MAX_SYMBOL_CHARS = 64
INT64_MAX = 2**63 - 1
_TS_FLOAT_LIMIT = 9.223372036854775808e18  # 2**63 as a float: an integral float below it fits

# Rejection reasons (parameterised ones are built with the field name: "bad_value:ts").
DECODE_ERROR = "decode_error"
OUT_OF_ORDER = "out_of_order"
MISSING_FIELD = "missing_field:"
# An entry with no fields: only a pending entry deleted from the stream (trimmed by the
# feeder's MAXLEN, or XDEL) before livepred handled it reads that way (XADD needs a field).
ENTRY_DELETED = "entry_deleted"
MAX_DEAD_LETTER_FIELDS = 1000  # original fields kept in a dead letter (Lua's unpack: ~8,000)
BAD_VALUE = "bad_value:"

PRICE_FIELDS = ("open", "high", "low", "close")
BAR_FIELDS = ("symbol", "ts", *PRICE_FIELDS, "volume")
_BAD = {key: BAD_VALUE + key for key in BAR_FIELDS}
_ABSENT = {key: MISSING_FIELD + key for key in BAR_FIELDS}

_INF = math.inf
_MISSING: Any = object()
_unpackb = msgpack.unpackb
_packb = msgpack.packb


@dataclass(frozen=True, slots=True)
class Bar:
    """One validated OHLCV bar, with the stream entry it came from (`src`)."""

    symbol: str
    ts: int  # bar close time, epoch milliseconds UTC
    open: float
    high: float
    low: float
    close: float
    volume: float
    stream: str = ""
    entry_id: str = ""

    @property
    def src(self) -> str:
        return f"{self.stream}/{self.entry_id}"


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input entry that is not a valid bar: `reason` as written to the dead letter's `error`.

    `fields` are the entry's original fields, untouched, for the dead letter.
    """

    reason: str
    fields: dict[Any, Any]
    stream: str
    entry_id: str


# The generated __init__ of a frozen slots dataclass sets each field through
# object.__setattr__; setting the slots through their descriptors is 2-3x faster (about
# 0.7 us instead of 1.5-2.4 us per Bar). decode_bar makes one Bar per input entry, so it
# uses this; the result is an ordinary, still frozen Bar.
(
    _set_symbol,
    _set_ts,
    _set_open,
    _set_high,
    _set_low,
    _set_close,
    _set_volume,
    _set_stream,
    _set_entry_id,
) = (Bar.__dict__[name].__set__ for name in Bar.__slots__)  # type: ignore[attr-defined]
_object_new = object.__new__


def _new_bar(
    symbol: str,
    ts: int,
    open_: float,
    high: float,
    low: float,
    close: float,
    volume: float,
    stream: str,
    entry_id: str,
) -> Bar:
    bar = _object_new(Bar)
    _set_symbol(bar, symbol)
    _set_ts(bar, ts)
    _set_open(bar, open_)
    _set_high(bar, high)
    _set_low(bar, low)
    _set_close(bar, close)
    _set_volume(bar, volume)
    _set_stream(bar, stream)
    _set_entry_id(bar, entry_id)
    return bar


# --- bars -------------------------------------------------------------------------------------


def decode_bar(
    fields: Mapping[Any, Any], stream: str, entry_id: str
) -> Bar | Rejection:
    """Decode and validate one input entry. Never raises: bad input becomes a `Rejection`.

    The entry is either a `data` field holding a msgpack map, or flat fields. Fields are
    checked in the order symbol, ts, open, high, low, close, volume; the first bad one is
    the reason. A key present with a nil value is `bad_value`, an absent one `missing_field`.
    In flat fields numbers are decimal strings; `ts` may be written with a zero fraction
    ("1700000000000.0") or an exponent, as long as its value is an integer.
    """
    try:
        if not fields:
            return _rejection(ENTRY_DELETED, fields, stream, entry_id)
        data = fields.get(b"data", _MISSING)  # type: ignore[call-overload]
        if data is _MISSING:
            data = fields.get("data", _MISSING)  # type: ignore[call-overload]
        if data is _MISSING:
            result = _from_flat(fields)
        else:
            if type(data) is str:
                data = data.encode("utf-8", "surrogateescape")
            try:
                payload = _unpackb(data, raw=False, strict_map_key=False)
            except Exception:
                return _rejection(DECODE_ERROR, fields, stream, entry_id)
            if type(payload) is not dict:
                return _rejection(DECODE_ERROR, fields, stream, entry_id)
            result = _from_map(payload)
        if isinstance(result, str):
            return _rejection(result, fields, stream, entry_id)
        symbol, ts, open_, high, low, close, volume = result
        return _new_bar(symbol, ts, open_, high, low, close, volume, stream, entry_id)
    except Exception:  # a mapping that misbehaves; decoding must never stop the daemon
        return _rejection(DECODE_ERROR, fields, stream, entry_id)


def _rejection(reason: str, fields: Any, stream: str, entry_id: str) -> Rejection:
    try:
        original = dict(fields)
    except Exception:
        original = {}
    return Rejection(reason, original, stream, entry_id)


def _from_map(m: dict[Any, Any]) -> tuple[str, int, float, float, float, float, float] | str:
    """Validate a msgpack map; returns the bar's values or the rejection reason."""
    symbol = m.get("symbol", _MISSING)
    if symbol is _MISSING:
        return "missing_field:symbol"
    if type(symbol) is not str or not symbol or len(symbol) > MAX_SYMBOL_CHARS:
        return "bad_value:symbol"

    ts = m.get("ts", _MISSING)
    t = type(ts)
    if t is int:
        if not 0 < ts <= INT64_MAX:
            return "bad_value:ts"
    elif t is float:
        # is_integer() is False for NaN and inf.
        if not (ts.is_integer() and 0 < ts < _TS_FLOAT_LIMIT):
            return "bad_value:ts"
        ts = int(ts)
    elif ts is _MISSING:
        return "missing_field:ts"
    else:
        return "bad_value:ts"

    # `0 < v < inf` is False for NaN too. Exact type checks: a bool is not a number.
    prices: list[float] = []
    for key in PRICE_FIELDS:
        v = m.get(key, _MISSING)
        t = type(v)
        if t is float:
            if not 0.0 < v < _INF:
                return _BAD[key]
        elif t is int:
            if v <= 0:
                return _BAD[key]
            v = float(v)
        else:
            return _BAD[key] if v is not _MISSING else _ABSENT[key]
        prices.append(v)

    v = m.get("volume", _MISSING)
    t = type(v)
    if t is float:
        if not 0.0 <= v < _INF:
            return "bad_value:volume"
        volume = v
    elif t is int:
        if v < 0:
            return "bad_value:volume"
        volume = float(v)
    else:
        return "missing_field:volume" if v is _MISSING else "bad_value:volume"

    open_, high, low, close = prices
    return symbol, ts, open_, high, low, close, volume


def _flat_get(fields: Mapping[Any, Any], key: str, key_bytes: bytes) -> Any:
    value = fields.get(key_bytes, _MISSING)
    if value is _MISSING:
        value = fields.get(key, _MISSING)
    return value


def _flat_number(value: Any) -> Any:
    """A flat field's number as a msgpack-style value (float), or None when it is not one."""
    t = type(value)
    if t is bytes or t is str:
        try:
            return float(value)
        except ValueError:
            return None
    if t is float or t is int:  # callers handing in Python values, not Redis replies
        return value
    return None


def _flat_ts(value: Any) -> Any:
    t = type(value)
    if t is bytes or t is str:
        try:
            return int(value)
        except ValueError:
            pass
        try:
            text = value.decode() if t is bytes else value
            number = Decimal(text.strip())
        except (UnicodeDecodeError, InvalidOperation, ValueError):
            return None
        # Range first: int() of "1e999999999" would build a billion-digit integer.
        if not number.is_finite() or not 0 < number <= INT64_MAX:
            return None
        if number != number.to_integral_value():
            return None
        return int(number)
    if t is float or t is int:
        return value
    return None


def _from_flat(
    fields: Mapping[Any, Any],
) -> tuple[str, int, float, float, float, float, float] | str:
    """Flat fields (`XADD bars * symbol AAPL ts 1700000000000 open 1 ...`) -> the msgpack path."""
    m: dict[str, Any] = {}
    symbol = _flat_get(fields, "symbol", b"symbol")
    if symbol is not _MISSING:
        if type(symbol) is bytes:
            try:
                symbol = symbol.decode("utf-8")
            except UnicodeDecodeError:
                return "bad_value:symbol"
        m["symbol"] = symbol
    ts = _flat_get(fields, "ts", b"ts")
    if ts is not _MISSING:
        m["ts"] = _flat_ts(ts)
    for key in ("open", "high", "low", "close", "volume"):
        value = _flat_get(fields, key, key.encode())
        if value is not _MISSING:
            m[key] = _flat_number(value)
    return _from_map(m)


def bar_values(bar: Bar | Mapping[str, Any]) -> dict[str, Any]:
    """A bar's seven wire values as plain Python types (numpy scalars converted).

    Raises ValueError(reason) for a missing field or a value of the wrong kind; ranges are
    checked by `encode_bar`.
    """
    if isinstance(bar, Bar):
        bar = {key: getattr(bar, key) for key in BAR_FIELDS}
    missing = [key for key in BAR_FIELDS if key not in bar]
    if missing:
        raise ValueError(f"{MISSING_FIELD}{missing[0]}")
    symbol = bar["symbol"]
    if not isinstance(symbol, str):
        raise ValueError(f"{BAD_VALUE}symbol")
    values: dict[str, Any] = {"symbol": str(symbol), "ts": _plain_number(bar["ts"], "ts")}
    for key in (*PRICE_FIELDS, "volume"):
        number = _plain_number(bar[key], key)
        try:
            values[key] = float(number)
        except OverflowError:  # an int beyond a float: refused as an infinity, in field order
            values[key] = math.inf if number > 0 else -math.inf
    return values


def _plain_number(value: Any, key: str) -> int | float:
    """int for Python/numpy integers, float for anything else float-like; bools are refused."""
    if isinstance(value, bool | str | bytes) or type(value).__name__ in ("bool", "bool_"):
        raise ValueError(f"{BAD_VALUE}{key}")
    if hasattr(value, "__index__"):
        return int(value.__index__())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{BAD_VALUE}{key}") from None


def encode_bar(bar: Bar | Mapping[str, Any]) -> dict[str, bytes]:
    """The XADD fields for one bar: `data` = msgpack map. Raises ValueError(reason) for a bar
    the daemon would reject, so a feeder learns at publish time.
    """
    checked = _quick_check(bar) if type(bar) is dict else None
    if checked is None:
        full = _from_map(bar_values(bar))
        if isinstance(full, str):
            raise ValueError(full)
        checked = full
    symbol, ts, open_, high, low, close, volume = checked
    try:
        data = _packb(
            {"symbol": symbol, "ts": ts, "open": open_, "high": high, "low": low,
             "close": close, "volume": volume},
            use_bin_type=True,
        )
    except UnicodeEncodeError:  # a lone surrogate: no text msgpack (or Redis) can carry
        raise ValueError(f"{BAD_VALUE}symbol") from None
    return {"data": data}


def _quick_check(bar: dict[Any, Any]) -> tuple[str, int, float, float, float, float, float] | None:
    """A feeder's dict of plain values is a decoded map already: checked as the daemon checks
    one (a third of `bar_values`'s time). None for anything it refuses (a numpy scalar, an int
    beyond a float, a bad value): the full path converts it or says which value."""
    try:
        checked = _from_map(bar)
    except OverflowError:
        return None
    return None if isinstance(checked, str) else checked


# --- dead letters -----------------------------------------------------------------------------


def _as_bytes(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")


def dead_letter_fields(rejection: Rejection) -> dict[bytes, bytes]:
    """XADD fields for the dead-letter stream: the original fields, bytes kept as they were,
    plus `error`, `src_stream` and `src_id` (these win over original fields of the same name).
    An entry with more than MAX_DEAD_LETTER_FIELDS fields keeps its first ones and says how
    many it had (`fields_total`): the commit script's XADD cannot take thousands of them.

    Keys are bytes because a Redis field name need not be UTF-8.
    """
    items = list(rejection.fields.items())
    out = {_as_bytes(key): _as_bytes(value) for key, value in items[:MAX_DEAD_LETTER_FIELDS]}
    if len(items) > MAX_DEAD_LETTER_FIELDS:
        out[b"fields_total"] = str(len(items)).encode()
    out[b"error"] = rejection.reason.encode()
    out[b"src_stream"] = rejection.stream.encode()
    out[b"src_id"] = rejection.entry_id.encode()
    return out
