"""Prediction events on the output stream (CONTRACT section 4): one accepted bar's results
for every target, as the wire map, encoded and decoded. Pure: no Redis, no asyncio."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daemon.wire import WIRE_VERSION


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
    def from_dict(cls, m: Mapping[str, Any]) -> TargetResult:
        return cls(
            preds=dict(m.get("preds") or {}),
            selected=m.get("selected"),
            pred=m.get("pred"),
            warming=dict(m.get("warming") or {}),
            failed=dict(m.get("failed") or {}),
        )


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
    def from_dict(cls, m: Mapping[str, Any]) -> PredictionEvent:
        """The inverse of `to_dict` (also reads replay's JSON lines). ValueError if malformed."""
        if not isinstance(m, Mapping):
            raise ValueError(f"prediction must be a map, got {type(m).__name__}")
        version = m.get("v")
        if version != WIRE_VERSION:
            raise ValueError(f"unsupported prediction version {version!r}")
        try:
            targets = {str(name): TargetResult.from_dict(r) for name, r in m["targets"].items()}
            return cls(
                symbol=m["symbol"],
                ts=m["ts"],
                src=m["src"],
                run=m["run"],
                lat_us=m["lat_us"],
                targets=targets,
            )
        except (KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"malformed prediction: {exc!r}") from None


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
        raise ValueError(f"prediction data is not msgpack: {exc}") from None
    return PredictionEvent.from_dict(payload)
