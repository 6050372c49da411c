"""The engine's batch results (handlers/batch_io.py): the wire map of each row (CONTRACT §4)
built from the columnar predictions."""

from __future__ import annotations

import numpy as np

from handlers.batch_io import NON_FINITE_OUTPUT, BatchInputs, BatchResult, TargetBatch


def test_each_row_says_ready_warming_failed_or_non_finite_per_family() -> None:
    nan, inf = float("nan"), float("inf")
    batch = TargetBatch(
        "B",
        preds={"A": np.array([0.5, nan, 1.5, 2.5]), "B": np.array([-1.0, 3.0, inf, nan])},
        warming={"A": np.array([0, 7, 0, 0]), "B": np.array([0, 0, 0, 2])},
        failed={"A": [None, None, None, "error:ValueError"], "B": [None, None, None, None]},
        size=4,
    )
    rows = batch.rows()
    assert rows[0] == {"preds": {"A": 0.5, "B": -1.0}, "selected": "B", "pred": -1.0,
                       "warming": {}, "failed": {}}
    assert rows[1] == {"preds": {"B": 3.0}, "selected": "B", "pred": 3.0,
                       "warming": {"A": 7}, "failed": {}}
    # A non-finite output is a failure, never a value; the selected family's pred stays null.
    assert rows[2] == {"preds": {"A": 1.5}, "selected": "B", "pred": None,
                       "warming": {}, "failed": {"B": NON_FINITE_OUTPUT}}
    assert rows[3] == {"preds": {}, "selected": "B", "pred": None,
                       "warming": {"B": 2}, "failed": {"A": "error:ValueError"}}
    assert [batch.row(i) for i in range(4)] == rows
    assert all(type(v) is float for r in rows for v in r["preds"].values())


def test_a_target_whose_families_were_all_refused_still_has_a_map_per_row() -> None:
    ok = TargetBatch("a", {"a": np.array([1.0, 2.0])}, {"a": np.array([0, 0])}, {"a": [None, None]}, 2)
    refused = TargetBatch(None, {}, {}, {}, 2)
    for targets in ({"t0": refused, "t1": ok}, {"t1": ok, "t2": refused}):
        rows = BatchResult(targets, {}).rows()
        assert [r["t1"]["pred"] for r in rows] == [1.0, 2.0]
        empty = {"preds": {}, "selected": None, "pred": None, "warming": {}, "failed": {}}
        assert all(r[name] == empty for r in rows for name in targets if name != "t1")


def test_batch_inputs_length_is_the_number_of_bars() -> None:
    inputs = BatchInputs(features=np.zeros((3, 2)), bars_seen=np.array([1, 5, 9]))
    assert len(inputs) == 3 and inputs.sequences == {}
