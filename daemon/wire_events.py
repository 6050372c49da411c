"""Prediction events on the output stream (CONTRACT section 4): one accepted bar's results
for every target, as the wire map, encoded and decoded. Pure: no Redis, no asyncio."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daemon.wire import WIRE_VERSION

_ABSENT: Any = object()


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number - number == 0.0 else None  # NaN and inf give NaN


@dataclass(frozen=True, slots=True)
class TargetResult:
    """One target's outcome for one bar: values by family, the routed pick, readiness, failures."""

    preds: dict[str, float] = field(default_factory=dict)  # finite values only
    selected: str | None = None  # routing_decision.json's family, None without one
    pred: float | None = None  # the selected family's value, if it has one
    warming: dict[str, int] = field(default_factory=dict)  # family -> bars still needed
    failed: dict[str, str] = field(default_factory=dict)  # family -> short reason

    def to_dict(self) -> dict[str, Any]:
        """The wire map with plain Python types; a non-finite value moves to `failed`.

        Family names must be str (subclasses such as numpy.str_ pack as str too).
        """
        preds: dict[str, float] = {}
        failed = dict(self.failed)
        for family, value in self.preds.items():
            number: float | None = value
            if type(value) is not float:  # numpy scalars, ints
                number = _finite_or_none(value)
            elif value - value != 0.0:  # NaN or inf: inf - inf is NaN
                number = None
            if number is None:
                failed.setdefault(family, "non_finite_output")
            else:
                preds[family] = number
        pred = self.pred
        if pred is not None:
            pred = _finite_or_none(pred)
        return {
            "preds": preds,
            "selected": self.selected,
            "pred": pred,
            "warming": {family: int(n) for family, n in self.warming.items()},
            "failed": failed,
        }

    @classmethod
    def from_dict(cls, m: Any) -> TargetResult:
        """The inverse of `to_dict`. ValueError unless every value has its wire type: family
        names and reasons str, `preds` finite numbers (an int is taken as a float), `pred` one
        or null, `selected` str or null, `warming` counts ints >= 0. An absent key is empty."""
        if not isinstance(m, Mapping):
            raise ValueError(f"a target's result must be a map, got {type(m).__name__}")
        preds = _str_map(m, "preds")
        for family, value in preds.items():
            if type(value) is not float or value - value != 0.0:  # NaN and inf give NaN
                preds[family] = _finite(value, f"preds[{_shown(family)}]")
        selected = m.get("selected")
        if selected is not None and not isinstance(selected, str):
            raise ValueError(f"selected must be a str or null, got {_shown(selected)}")
        pred = m.get("pred")
        if pred is not None:
            pred = _finite(pred, "pred")
        warming = _str_map(m, "warming")
        for family, bars in warming.items():
            if type(bars) is not int or bars < 0:
                raise ValueError(
                    f"warming[{_shown(family)}] must be an int >= 0, got {_shown(bars)}"
                )
        failed = _str_map(m, "failed")
        for family, reason in failed.items():
            if not isinstance(reason, str):
                raise ValueError(
                    f"failed[{_shown(family)}] must be a str, got {_shown(reason)}"
                )
        return cls(preds=preds, selected=selected, pred=pred, warming=warming, failed=failed)


def _str_map(m: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`m[name]`, a map with str keys, as a dict (an absent key: empty); ValueError for
    anything else (null too)."""
    value = m.get(name, _ABSENT)
    if value is _ABSENT:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a map, got {_shown(value)}")
    for key in value:
        if type(key) is not str and not isinstance(key, str):
            raise ValueError(f"{name} keys must be str, got {_shown(key)}")
    return dict(value)


def _shown(value: Any) -> str:
    """A value in an error message: its repr, cut short (a message is one log line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: Any, name: str) -> float:
    """A finite float from a wire number (float, or int as msgpack sends 1.0 from some
    writers); ValueError for a bool, a str, NaN or an infinity."""
    if type(value) is float:
        if value - value == 0.0:  # NaN and inf give NaN
            return value
    elif type(value) is int:
        try:
            return float(value)
        except OverflowError:
            pass
    raise ValueError(f"{name} must be a finite number, got {_shown(value)}")


def _int(m: Mapping[str, Any], name: str) -> int:
    value = m[name]
    if type(value) is not int:  # not a bool, a float or a str, however integral
        raise ValueError(f"{name} must be an int, got {_shown(value)}")
    return value


def _str(m: Mapping[str, Any], name: str) -> str:
    value = m[name]
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {_shown(value)}")
    return value


@dataclass(frozen=True, slots=True)
class PredictionEvent:
    """One output entry: every target's result for one accepted bar."""

    symbol: str
    ts: int
    src: str  # "<input stream>/<entry id>"
    run: str  # the training run's run_id
    lat_us: int  # read -> publish, microseconds
    targets: Mapping[str, TargetResult]

    def to_dict(self) -> dict[str, Any]:
        """The map of CONTRACT section 4 (`v` first), plain Python types, finite floats only."""
        return {
            "v": WIRE_VERSION,
            "symbol": str(self.symbol),
            "ts": int(self.ts),
            "src": str(self.src),
            "run": str(self.run),
            "lat_us": int(self.lat_us),
            "targets": {str(name): result.to_dict() for name, result in self.targets.items()},
        }

    @classmethod
    def from_dict(cls, m: Any) -> PredictionEvent:
        """The inverse of `to_dict` (also reads replay's JSON lines). ValueError if malformed:
        `v` other than the int 1, a missing key, or a value not of its wire type (`ts` and
        `lat_us` ints, `symbol`, `src` and `run` str, see `TargetResult.from_dict`). Nothing
        is converted but a whole-number pred (int) to float: an event read is as written."""
        if not isinstance(m, Mapping):
            raise ValueError(f"prediction must be a map, got {type(m).__name__}")
        version = m.get("v")
        if type(version) is not int or version != WIRE_VERSION:  # True == 1: not a version
            raise ValueError(f"unsupported prediction version {_shown(version)}")
        try:
            targets = m["targets"]
            if not isinstance(targets, Mapping):
                raise ValueError(f"targets must be a map, got {type(targets).__name__}")
            results: dict[str, TargetResult] = {}
            for name, result in targets.items():
                if not isinstance(name, str):
                    raise ValueError(f"target names must be str, got {_shown(name)}")
                try:
                    results[name] = TargetResult.from_dict(result)
                except ValueError as exc:
                    raise ValueError(f"target {_shown(name)}: {exc}") from None
            return cls(
                symbol=_str(m, "symbol"),
                ts=_int(m, "ts"),
                src=_str(m, "src"),
                run=_str(m, "run"),
                lat_us=_int(m, "lat_us"),
                targets=results,
            )
        except KeyError as exc:
            raise ValueError(f"malformed prediction: no {exc.args[0]!r}") from None


def encode_prediction(event: PredictionEvent) -> dict[str, bytes]:
    """XADD fields for the output stream: `symbol` (plain) and `data` (msgpack map).

    Strings pack as msgpack str (never bin); floats as float64.
    """
    return {
        "symbol": str(event.symbol).encode(),
        "data": msgpack.packb(event.to_dict(), use_bin_type=True),
    }


def decode_prediction(fields: Mapping[bytes | str, bytes | str]) -> PredictionEvent:
    """Read one output entry (as redis returns it, bytes or str keys). ValueError if malformed."""
    data = fields.get(b"data")  # type: ignore[call-overload]
    if data is None:
        data = fields.get("data")  # type: ignore[call-overload]
    if data is None:
        raise ValueError("prediction entry has no data field")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    try:
        payload = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ValueError(f"prediction data is not msgpack: {exc or type(exc).__name__}") from None
    return PredictionEvent.from_dict(payload)
