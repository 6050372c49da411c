"""An XGBoost native Booster (`model.json` / `model.ubj`): load and batch predict."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import xgboost as xgb

from handlers.feature_names import embedded_names, feature_names_refusal
from handlers.meta import ModelMeta
from handlers.registry import INFERENCE_THREADS, check_batch, to_prediction_vector


class XGBoostBoosterHandler:
    """Booster.inplace_predict on float32 rows (NaN = missing); binary:logistic gives probability."""

    format_name: ClassVar[str] = "xgboost"
    accepts_nan: ClassVar[bool] = True

    def __init__(
        self, booster: xgb.Booster, meta: ModelMeta, iteration_range: tuple[int, int] = (0, 0)
    ) -> None:
        expected = len(meta.feature_list)
        actual = booster.num_features()
        if expected and actual != expected:
            raise ValueError(
                f"booster expects {actual} features, model_meta.json feature_list has {expected}"
            )
        refusal = feature_names_refusal(embedded_names(booster), meta.feature_list)
        if refusal is not None:
            raise ValueError(refusal)
        # CPU prediction whatever the training device: inplace_predict on numpy input
        # would otherwise copy every batch to the GPU and warn about mismatched devices.
        booster.set_param({"nthread": INFERENCE_THREADS, "device": "cpu"})
        self._booster = booster
        self._binary = meta.binary
        self._num_features = actual
        self._iteration_range = iteration_range  # (0, 0): every tree, as Booster.predict
        # One value per row, or refused now (a multiclass model), not on every bar.
        self.predict(np.zeros((1, actual), dtype=np.float32))

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> XGBoostBoosterHandler:
        booster = xgb.Booster()
        booster.load_model(str(path))
        return cls(booster, meta)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, (self._num_features,))
        raw = self._booster.inplace_predict(
            rows, missing=np.nan, iteration_range=self._iteration_range
        )
        return to_prediction_vector(raw, rows.shape[0], binary=self._binary)

    def close(self) -> None:
        self._booster = None  # type: ignore[assignment]
