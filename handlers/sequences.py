"""Per-symbol ring buffers of the last T input rows, and batched (B, T, F) gathers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from handlers.meta import ModelMeta

FEATURES = "features"
RAW = "raw"


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    """What one ring buffer holds: T rows of `columns` (feature names, or OHLCV channels)."""

    kind: str  # FEATURES or RAW
    columns: tuple[str, ...]
    length: int
    normalization: str = "none"  # raw sequences only: "none" or "zscore"

    def __post_init__(self) -> None:
        if self.kind not in (FEATURES, RAW):
            raise ValueError(f"unknown sequence kind {self.kind!r}")
        if self.length < 1:
            raise ValueError("sequence length must be >= 1")
        if not self.columns:
            raise ValueError("a sequence needs at least one column")

    @classmethod
    def for_meta(cls, meta: ModelMeta) -> SequenceSpec | None:
        """The buffer a model reads from, or None for a tabular (B, F) model."""
        if not meta.sequential:
            return None
        length = int(meta.sequence_length or 1)
        if meta.raw_sequence:
            return cls(RAW, tuple(meta.sequence_channels), length, meta.sequence_normalization)
        return cls(FEATURES, tuple(meta.feature_list), length)


class SequenceBuffers:
    """One (T, F) ring buffer per symbol slot, stored as one (capacity, T, F) array.

    Rows not yet written are NaN, so a gather before T bars shows exactly what is missing.
    Raw OHLCV rows are kept in float64 so z-scoring happens before the float32 cast.
    """

    def __init__(self, spec: SequenceSpec, capacity: int = 1024) -> None:
        self.spec = spec
        self._dtype = np.float64 if spec.kind == RAW else np.float32
        width = len(spec.columns)
        self._data = np.full((capacity, spec.length, width), np.nan, dtype=self._dtype)
        self._head = np.zeros(capacity, dtype=np.int64)  # next write position
        self._steps = np.arange(spec.length, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return int(self._data.shape[0])

    def nbytes_per_slot(self) -> int:
        return int(self._data[0].nbytes + self._head.itemsize)

    def ensure_capacity(self, n_slots: int) -> None:
        if n_slots <= self.capacity:
            return
        new_cap = max(n_slots, 2 * self.capacity)
        data = np.full((new_cap, *self._data.shape[1:]), np.nan, dtype=self._dtype)
        data[: self.capacity] = self._data
        head = np.zeros(new_cap, dtype=np.int64)
        head[: self.capacity] = self._head
        self._data, self._head = data, head

    def reset(self, slots: np.ndarray) -> None:
        self._data[slots] = np.nan
        self._head[slots] = 0

    def push(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Append one row per slot. `slots` must be unique within a call."""
        heads = self._head[slots]
        with np.errstate(over="ignore"):  # into float32 buffers: beyond its range is +-inf
            self._data[slots, heads] = rows
        self._head[slots] = (heads + 1) % self.spec.length

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """(B, T, F) float32, oldest row first."""
        length, width = self.spec.length, self._data.shape[2]
        order = (self._head[slots][:, None] + self._steps[None, :]) % length
        # Rows of the flat (capacity * T, F) view, taken along one axis: the same values as
        # `self._data[slots[:, None], order]`, 2.5x faster than indexing two axes at once.
        rows = (slots[:, None] * length + order).ravel()
        flat = self._data.reshape(-1, width)
        window = flat.take(rows, axis=0).reshape(len(slots), length, width)
        if self.spec.kind == RAW and self.spec.normalization == "zscore":
            window = zscore(window)
        return to_float32(window)


def zscore(window: np.ndarray) -> np.ndarray:
    """Per channel over the window (axis 1), population std; a zero std gives 0."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = window.mean(axis=1, keepdims=True)
        centred = window - mean
        std = np.sqrt((centred * centred).mean(axis=1, keepdims=True))
    # A constant channel must give exactly 0, not rounding noise over a tiny std.
    flat = (window.max(axis=1, keepdims=True) == window.min(axis=1, keepdims=True)) | (std == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(flat, 0.0, centred / np.where(flat, 1.0, std))
    # A window that still has missing rows stays NaN (not ready), never a fake 0; so does one
    # whose spread overflows float64 (a price near 1e300): not a window of zeros.
    unusable = np.isnan(window).any(axis=1, keepdims=True) | ~np.isfinite(std)
    return np.where(unusable, np.nan, out)


def to_float32(values: np.ndarray) -> np.ndarray:
    """The models' float32 input. A value beyond float32's range (an extreme bar's return)
    becomes +-inf, a non-finite input like any other: no RuntimeWarning for each batch."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32, copy=False)
