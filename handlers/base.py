"""The one small protocol every model-format handler implements."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from handlers.meta import ModelMeta


class ModelHandler(Protocol):
    """A loaded model. `predict` takes float32 (B, F) or (B, T, F), returns float64 (B,).

    Binary classifiers return the positive-class probability. One result per input row,
    in order; `predict` never changes its input.
    """

    format_name: ClassVar[str]  # "lightgbm", "xgboost", "keras", "tf_savedmodel", ...
    accepts_nan: ClassVar[bool]  # trees and pickles predict on NaN inputs; NNs need finite ones

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> ModelHandler: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
