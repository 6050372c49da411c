"""A LightGBM native Booster (`model.txt`): load and batch predict."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import lightgbm as lgb
import numpy as np

from handlers.meta import ModelMeta
from handlers.registry import INFERENCE_THREADS, check_batch, to_prediction_vector


class LightGBMBoosterHandler:
    """Booster.predict on float32 rows; a binary objective already yields the probability."""

    format_name: ClassVar[str] = "lightgbm"
    accepts_nan: ClassVar[bool] = True

    def __init__(self, booster: lgb.Booster, meta: ModelMeta) -> None:
        expected = len(meta.feature_list)
        actual = booster.num_feature()
        if expected and actual != expected:
            raise ValueError(
                f"booster expects {actual} features, model_meta.json feature_list has {expected}"
            )
        self._booster = booster
        self._binary = meta.binary
        self._num_features = actual

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> LightGBMBoosterHandler:
        # Tree inference runs on the CPU whatever `device` says: batches are small.
        return cls(lgb.Booster(model_file=str(path)), meta)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, (self._num_features,))
        # num_threads per call: LightGBM otherwise takes every core for each tiny batch.
        raw = self._booster.predict(rows, num_threads=INFERENCE_THREADS)
        return to_prediction_vector(raw, rows.shape[0], binary=self._binary)

    def close(self) -> None:
        self._booster = None  # type: ignore[assignment]
