"""Prediction events (`daemon.wire_events`): the wire map is exactly the CONTRACT's, round
trips, non-finite values moved to `failed`, numpy types converted, malformed entries refused."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest

from daemon.wire_events import PredictionEvent, TargetResult, decode_prediction, encode_prediction


def make_event(**target_kwargs: Any) -> PredictionEvent:
    result = TargetResult(
        preds={"LightGBM": 0.25, "XGBoost": -1.5},
        selected="LightGBM",
        pred=0.25,
        warming={"LSTM": 12},
        failed={"Keras": "non_finite_output"},
    )
    targets: dict[str, TargetResult] = {"fwd_ret_5": result}
    if target_kwargs:
        targets["other"] = TargetResult(**target_kwargs)
    return PredictionEvent(
        symbol="AAPL",
        ts=1_700_000_000_000,
        src="bars/1700000000000-0",
        run="run-42",
        lat_us=850,
        targets=targets,
    )


def test_prediction_wire_map_is_exactly_the_contract() -> None:
    fields = encode_prediction(make_event())
    assert set(fields) == {"symbol", "data"}
    assert fields["symbol"] == b"AAPL"
    assert msgpack.unpackb(fields["data"]) == {
        "v": 1,
        "symbol": "AAPL",
        "ts": 1_700_000_000_000,
        "src": "bars/1700000000000-0",
        "run": "run-42",
        "lat_us": 850,
        "targets": {
            "fwd_ret_5": {
                "preds": {"LightGBM": 0.25, "XGBoost": -1.5},
                "selected": "LightGBM",
                "pred": 0.25,
                "warming": {"LSTM": 12},
                "failed": {"Keras": "non_finite_output"},
            }
        },
    }


def test_prediction_round_trip() -> None:
    event = make_event()
    fields = encode_prediction(event)
    assert decode_prediction(fields) == event
    # As a redis client returns it: bytes keys.
    assert decode_prediction({k.encode(): v for k, v in fields.items()}) == event


def test_prediction_drops_non_finite_and_keeps_none_selected() -> None:
    event = make_event(
        preds={"A": math.nan, "B": math.inf, "C": np.float32(0.5), "D": np.float64(-math.inf)},
        selected=None,
        pred=None,
        warming={"LSTM": np.int64(3)},
        failed={"B": "predict raised ValueError"},
    )
    decoded_event = decode_prediction(encode_prediction(event))
    other = decoded_event.targets["other"]
    assert other.preds == {"C": 0.5}
    assert other.selected is None
    assert other.pred is None
    assert other.warming == {"LSTM": 3}
    # A non-finite value is reported as failed; an existing reason is kept.
    assert other.failed == {
        "A": "non_finite_output",
        "B": "predict raised ValueError",
        "D": "non_finite_output",
    }


def test_prediction_non_finite_selected_pred_is_null() -> None:
    event = make_event(preds={"A": math.nan}, selected="A", pred=math.nan)
    other = decode_prediction(encode_prediction(event)).targets["other"]
    assert other.selected == "A"
    assert other.pred is None


def test_prediction_floats_are_float64_and_numpy_converted() -> None:
    event = PredictionEvent(
        symbol=np.str_("AAPL"),  # type: ignore[arg-type]
        ts=np.int64(1_700_000_000_000),  # type: ignore[arg-type]
        src="bars/1-0",
        run="r",
        lat_us=np.int64(7),  # type: ignore[arg-type]
        targets={
            "t": TargetResult(preds={"F": np.float32(0.1)}, selected="F", pred=np.float32(0.1))
        },
    )
    data = encode_prediction(event)["data"]
    assert b"\xca" not in data  # no float32
    m = msgpack.unpackb(data)
    assert type(m["ts"]) is int and type(m["lat_us"]) is int
    assert m["targets"]["t"]["preds"]["F"] == float(np.float32(0.1))


def _contains_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(_contains_bytes(k) or _contains_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_bytes(v) for v in value)
    return False


def test_prediction_strings_are_msgpack_str_never_bin() -> None:
    event = make_event(preds={"Ünïcode": 1.0}, selected="Ünïcode", pred=1.0)
    data = encode_prediction(event)["data"]
    # raw=False turns msgpack str into str and bin into bytes: no bytes anywhere means no bin.
    assert not _contains_bytes(msgpack.unpackb(data, raw=False))
    for marker in (b"\xc4", b"\xc5", b"\xc6"):  # bin 8/16/32 headers
        assert marker not in data


def test_to_dict_is_json_serialisable_for_replay() -> None:
    event = make_event(preds={"A": math.nan}, selected=None, pred=None)
    text = json.dumps(event.to_dict(), allow_nan=False)
    assert PredictionEvent.from_dict(json.loads(text)) == decode_prediction(
        encode_prediction(event)
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"data": b"\xc1"},
        {b"data": msgpack.packb([1])},
        {b"data": msgpack.packb({"v": 2})},
        {b"data": msgpack.packb({"v": 1, "symbol": "A"})},
    ],
)
def test_decode_prediction_malformed_raises_value_error(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        decode_prediction(fields)
