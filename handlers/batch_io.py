"""The engine's batch inputs and results: what the state hands the engine for B bars, and the
columnar predictions it returns, with their wire maps (CONTRACT §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.sequences import SequenceSpec

NON_FINITE_OUTPUT = "non_finite_output"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What the state must compute for the loaded models: feature columns and ring buffers."""

    feature_names: tuple[str, ...]
    sequences: tuple[SequenceSpec, ...]


@dataclass(slots=True)
class BatchInputs:
    """Model inputs for B accepted bars, in bar order."""

    features: np.ndarray  # (B, len(InputSpec.feature_names)) float64
    bars_seen: np.ndarray  # (B,) int64: bars in the symbol's state including this one
    sequences: dict[SequenceSpec, np.ndarray] = field(default_factory=dict)  # (B, T, F) f32

    def __len__(self) -> int:
        return int(self.bars_seen.shape[0])


@dataclass(slots=True)
class TargetBatch:
    """Columnar results of one target for a batch. NaN pred = not published."""

    selected: str | None
    preds: dict[str, np.ndarray]  # family -> (B,) float64
    warming: dict[str, np.ndarray]  # family -> (B,) int64, 0 = ready
    failed: dict[str, list[str | None]]  # family -> reason per row or None
    size: int = 0  # rows in the batch (also when every family of the target was refused)

    def row(self, i: int) -> dict[str, Any]:
        """The wire map of one row (CONTRACT §4); `rows()` builds them all at once."""
        return self.rows()[i]

    def rows(self) -> list[dict[str, Any]]:
        """`row(i)` for every row, built from plain lists (replay, and the rows that
        `daemon.wire_pack` cannot write in the all-ready shape)."""
        n = len(next(iter(self.preds.values()))) if self.preds else self.size
        out: list[dict[str, Any]] = [
            {"preds": {}, "selected": self.selected, "pred": None, "warming": {}, "failed": {}}
            for _ in range(n)
        ]
        selected = self.selected
        for family, values in self.preds.items():
            vals = values.tolist()
            warm = self.warming[family]
            warm_list = warm.tolist() if warm.any() else None
            failed = self.failed[family]
            for i, doc in enumerate(out):
                reason = failed[i]
                if reason is not None:
                    doc["failed"][family] = reason
                elif warm_list is not None and warm_list[i] > 0:
                    doc["warming"][family] = warm_list[i]
                else:
                    value = vals[i]
                    if value - value == 0.0:  # finite
                        doc["preds"][family] = value
                        if family == selected:
                            doc["pred"] = value
                    else:
                        doc["failed"][family] = NON_FINITE_OUTPUT
        return out


@dataclass(slots=True)
class BatchResult:
    targets: dict[str, TargetBatch]
    family_seconds: dict[tuple[str, str], float]  # (target, family) -> wall time of its call
    # (target, family, reason) -> rows not published for it: the failed reason's kind
    # ("error", "unknown_feature", ...) or NON_FINITE_OUTPUT. Warming rows are not failures.
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def row(self, i: int) -> dict[str, dict[str, Any]]:
        return {target: batch.row(i) for target, batch in self.targets.items()}

    def rows(self) -> list[dict[str, dict[str, Any]]]:
        """Every row's target map, in batch order."""
        per_target = {target: batch.rows() for target, batch in self.targets.items()}
        n = len(next(iter(per_target.values()))) if per_target else 0
        return [{t: docs[i] for t, docs in per_target.items()} for i in range(n)]
