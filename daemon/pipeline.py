"""One batch: decoded entries -> state -> engine -> per-bar results. Pure and synchronous."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.state import SymbolTable
from daemon.wire import Bar, Rejection
from handlers.engine import BatchInputs, BatchResult, InferenceEngine


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

    def process(self, items: Sequence[Bar | Rejection], *, predict: bool = True) -> BatchOutcome:
        """Apply the bars to state and (unless warming up from history) predict them."""
        outcome = BatchOutcome()
        bars: list[Bar] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, Bar):
                bars.append(item)
                positions.append(i)
            else:
                outcome.dead.append((i, item.reason))
        applied = self.table.apply(bars, gather=predict)
        outcome.resets, outcome.evicted = applied.resets, applied.evicted
        outcome.duplicates = [positions[j] for j in applied.duplicates]
        outcome.dead.extend((positions[j], reason) for j, reason in applied.rejected)
        outcome.dead.sort()
        if not predict or applied.inputs is None:
            return outcome
        result = self.engine.predict_batch(applied.inputs)
        outcome.inputs, outcome.result = applied.inputs, result
        rows = result.rows() if result.targets else [{} for _ in applied.accepted]
        for doc, j in zip(rows, applied.accepted, strict=True):
            outcome.predictions.append((positions[j], bars[j], doc))
        return outcome

    def rebind(self, engine: InferenceEngine) -> bool:
        """Swap in a reloaded engine; True when its inputs differ (state must be rebuilt)."""
        changed = engine.input_spec != self.engine.input_spec
        self.engine = engine
        return changed
