"""Prediction events packed from the engine's columns: the same map as the dict path, in
canonical msgpack (str never bin, floats as float64)."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire import WIRE_VERSION
from daemon.wire_pack import pack_predictions
from handlers.batch_io import BatchResult, TargetBatch

INT64_MAX = 2**63 - 1
CHARS = st.characters(blacklist_categories=("Cs",))  # any code point msgpack can pack


# --- the reference ----------------------------------------------------------------------------


def reference_rows(batch: TargetBatch, n: int) -> list[dict[str, Any]]:
    """The engine's own row maps. A target without families (all refused at load) has none to
    count rows by, so its map is the empty one on every row."""
    if not batch.preds:
        empty = {"preds": {}, "selected": batch.selected, "pred": None, "warming": {}, "failed": {}}
        return [empty] * n
    return batch.rows()


def reference_events(
    symbols: list[str], ts: list[int], srcs: list[str], run: str, lat_us: int,
    result: BatchResult | None,
) -> list[dict[str, Any]]:
    targets = result.targets if result is not None else {}
    per_target = {name: reference_rows(batch, len(symbols)) for name, batch in targets.items()}
    return [
        {
            "v": WIRE_VERSION, "symbol": s, "ts": t, "src": src, "run": run, "lat_us": lat_us,
            "targets": {name: rows[i] for name, rows in per_target.items()},
        }
        for i, (s, t, src) in enumerate(zip(symbols, ts, srcs, strict=True))
    ]


def typed(value: Any) -> Any:
    """`value` with every scalar tagged by its type and floats by their bits: 1 != 1.0 != True,
    -0.0 != 0.0, and NaN equals only the same NaN."""
    if isinstance(value, dict):
        return {typed(k): typed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [typed(v) for v in value]
    if isinstance(value, float):
        return ("float", struct.pack(">d", value))
    return (type(value).__name__, value)


def assert_canonical(data: bytes) -> Any:
    """Decode `data`; it must be what msgpack.packb(use_bin_type=True) writes for its own
    decoded map: float64 floats, str (never bin), the shortest int and header forms."""
    decoded = msgpack.unpackb(data, raw=False)
    assert msgpack.packb(decoded, use_bin_type=True) == data
    return decoded


def assert_rows_follow_the_contract(event: dict[str, Any], result: BatchResult, i: int) -> None:
    """CONTRACT section 4, checked against the engine's columns directly (not `rows()`)."""
    for name, batch in result.targets.items():
        doc = event["targets"][name]
        for family, value in doc["preds"].items():
            assert math.isfinite(value), (family, value)
            assert batch.failed[family][i] is None and batch.warming[family][i] <= 0
        value = batch.preds[batch.selected][i] if batch.selected in batch.preds else math.nan
        ready = (
            batch.selected in batch.preds
            and batch.failed[batch.selected][i] is None
            and batch.warming[batch.selected][i] <= 0
            and math.isfinite(value)
        )
        if ready:
            assert typed(doc["pred"]) == typed(float(value))
        else:
            assert doc["pred"] is None
        assert doc["selected"] == batch.selected


# --- engine results ---------------------------------------------------------------------------

# Names of 32+ characters (or bytes) need a str8 header, of 256+ bytes a str16 one.
names = st.one_of(
    st.text(CHARS, max_size=8), st.text(CHARS, min_size=28, max_size=40),
    st.text(CHARS, min_size=70, max_size=90),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
any_value = st.one_of(finite, st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0]))
reasons = st.sampled_from(["InferenceError: shape", "non_finite_input", "", "timeout ⏱"])


@st.composite
def target_batches(draw: st.DrawFn, n: int) -> TargetBatch:
    families = draw(st.lists(names, max_size=4, unique=True))
    choices = [st.none(), names.filter(lambda f: f not in families)]
    if families:
        choices.append(st.sampled_from(families))
    selected = draw(st.one_of(*choices))
    preds: dict[str, np.ndarray] = {}
    warming: dict[str, np.ndarray] = {}
    failed: dict[str, list[str | None]] = {}
    for family in families:
        # A clean family (all ready and finite) is the common case; a noisy one mixes in NaN,
        # inf, warming and failed rows.
        noisy = draw(st.booleans())
        column = st.lists(any_value if noisy else finite, min_size=n, max_size=n)
        preds[family] = np.array(draw(column), dtype=np.float64)
        needed = st.one_of(st.just(0), st.integers(1, 10**6)) if noisy else st.just(0)
        warming[family] = np.array(draw(st.lists(needed, min_size=n, max_size=n)), np.int64)
        reason = st.one_of(st.none(), reasons) if noisy else st.none()
        failed[family] = draw(st.lists(reason, min_size=n, max_size=n))
    return TargetBatch(selected, preds, warming, failed)


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[str], list[int], list[str], str, int, BatchResult]:
    n = draw(st.integers(0, 50))
    symbols = draw(st.lists(st.text(CHARS, min_size=1, max_size=64), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(1, INT64_MAX), min_size=n, max_size=n))
    srcs = [f"bars/{t}-{i}" for i, t in enumerate(ts)]
    run = draw(st.text(CHARS, max_size=40))
    lat_us = draw(st.integers(0, 10**9))
    target_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    targets = {name: draw(target_batches(n)) for name in target_names}
    return symbols, ts, srcs, run, lat_us, BatchResult(targets, {})


# --- parity with the dict path ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(batches())
def test_each_row_is_the_dict_paths_event(
    batch: tuple[list[str], list[int], list[str], str, int, BatchResult],
) -> None:
    symbols, ts, srcs, run, lat_us, result = batch
    packed = pack_predictions(symbols, ts, srcs, run, lat_us, result)
    expected = reference_events(symbols, ts, srcs, run, lat_us, result)
    assert len(packed) == len(expected)
    for i, (data, event) in enumerate(zip(packed, expected, strict=True)):
        decoded = assert_canonical(data)
        assert typed(decoded) == typed(event), i
        assert_rows_follow_the_contract(decoded, result, i)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_without_targets_the_map_is_empty(
    batch: tuple[list[str], list[int], list[str], str, int, BatchResult],
) -> None:
    symbols, ts, srcs, run, lat_us, _ = batch
    for result in (None, BatchResult({}, {})):
        packed = pack_predictions(symbols, ts, srcs, run, lat_us, result)
        expected = reference_events(symbols, ts, srcs, run, lat_us, None)
        assert [typed(assert_canonical(d)) for d in packed] == [typed(e) for e in expected]


def test_a_small_batch_by_hand() -> None:
    """Two rows, one clean and one with every kind of outcome, checked against literal maps."""
    batch = TargetBatch(
        selected="lgbm",
        preds={"lgbm": np.array([0.25, np.nan]), "lstm": np.array([-0.0, 7.0]),
               "x" * 40: np.array([1.0, 2.0])},
        warming={"lgbm": np.array([0, 0]), "lstm": np.array([0, 12]), "x" * 40: np.array([0, 0])},
        failed={"lgbm": [None, None], "lstm": [None, None], "x" * 40: [None, "boom"]},
    )
    result = BatchResult({"ret_5m": batch}, {})
    first, second = pack_predictions(["ÄPL", "MSFT"], [INT64_MAX, 1], ["bars/1-0", "bars/2-0"],
                                     "run-1", 17, result)
    head = {"v": 1, "src": "bars/1-0", "run": "run-1", "lat_us": 17}
    assert typed(assert_canonical(first)) == typed({
        **head, "symbol": "ÄPL", "ts": INT64_MAX,
        "targets": {"ret_5m": {"preds": {"lgbm": 0.25, "lstm": -0.0, "x" * 40: 1.0},
                               "selected": "lgbm", "pred": 0.25, "warming": {}, "failed": {}}},
    })
    assert typed(assert_canonical(second)) == typed({
        **head, "symbol": "MSFT", "ts": 1, "src": "bars/2-0",
        "targets": {"ret_5m": {"preds": {}, "selected": "lgbm", "pred": None,
                               "warming": {"lstm": 12},
                               "failed": {"lgbm": "non_finite_output", "x" * 40: "boom"}}},
    })
