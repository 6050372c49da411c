"""One batch: decoded entries -> state -> engine -> per-bar results. Pure and synchronous."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.state import SymbolTable
from daemon.wire import Bar, Rejection
from daemon.wire_columns import BarColumns
from handlers.batch_io import BatchInputs, BatchResult
from handlers.engine import InferenceEngine


@dataclass(slots=True)
class ColumnsOutcome:
    """What became of the bars of one `BarColumns`; indices refer to its rows."""

    accepted: list[int] = field(default_factory=list)  # rows predicted, in order
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    duplicates: list[int] = field(default_factory=list)
    inputs: BatchInputs | None = None
    result: BatchResult | None = None  # rows aligned with `accepted`
    resets: int = 0
    evicted: int = 0


@dataclass(slots=True)
class BatchOutcome:
    """Every input entry ends in exactly one of: predictions, dead, duplicates."""

    predictions: list[tuple[int, Bar, dict[str, dict[str, Any]]]] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    duplicates: list[int] = field(default_factory=list)
    inputs: BatchInputs | None = None
    result: BatchResult | None = None
    resets: int = 0
    evicted: int = 0


class Pipeline:
    """Owns the symbol table and runs the engine over each batch of entries."""

    def __init__(self, engine: InferenceEngine, ttl_s: float, capacity: int = 1024) -> None:
        self.engine = engine
        self.table = SymbolTable(engine.input_spec, ttl_s=ttl_s, capacity=capacity)

    def run(
        self, cols: BarColumns, *, predict: bool = True, clock: np.ndarray | None = None
    ) -> ColumnsOutcome:
        """Apply the bars to state and (unless warming up from history) predict them.
        `clock`: see `SymbolTable.apply_columns` (a rebuild's replay)."""
        applied = self.table.apply_columns(
            cols.symbols, cols.ts, cols.ohlcv, gather=predict, clock=clock
        )
        outcome = ColumnsOutcome(
            applied.accepted, applied.rejected, applied.duplicates,
            resets=applied.resets, evicted=applied.evicted,
        )
        if predict and applied.inputs is not None:
            outcome.inputs = applied.inputs
            outcome.result = self.engine.predict_batch(applied.inputs)
        return outcome

    def process(self, items: Sequence[Bar | Rejection], *, predict: bool = True) -> BatchOutcome:
        """`run` for decoded items (bars and rejections, in entry order), with each
        prediction as a plain wire map (replay and tests; the daemon packs columns)."""
        outcome = BatchOutcome()
        bars: list[Bar] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, Bar):
                bars.append(item)
                positions.append(i)
            else:
                outcome.dead.append((i, item.reason))
        ran = self.run(BarColumns.from_bars(bars), predict=predict)
        outcome.resets, outcome.evicted = ran.resets, ran.evicted
        outcome.duplicates = [positions[j] for j in ran.duplicates]
        outcome.dead.extend((positions[j], reason) for j, reason in ran.rejected)
        outcome.dead.sort()
        if ran.result is None:
            return outcome
        outcome.inputs, outcome.result = ran.inputs, ran.result
        rows = ran.result.rows() if ran.result.targets else [{} for _ in ran.accepted]
        for doc, j in zip(rows, ran.accepted, strict=True):
            outcome.predictions.append((positions[j], bars[j], doc))
        return outcome

    def rebind(self, engine: InferenceEngine) -> bool:
        """Swap in a reloaded engine; True when its inputs differ (state must be rebuilt)."""
        changed = engine.input_spec != self.engine.input_spec
        self.engine = engine
        return changed
