"""A pickled model (`model.pkl` / `model.joblib`): unpickle, pick the fastest way to predict.

Loading a pickle runs code: the run loader checks `models.allow_pickle` and the file's
permissions before this module ever opens one.
"""

from __future__ import annotations

import logging
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from handlers.feature_names import embedded_names, feature_names_refusal
from handlers.meta import ModelMeta
from handlers.registry import (
    check_batch,
    expected_input_shape,
    missing_dependency,
    to_prediction_vector,
)

Predictor = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger(__name__)


class PickledHandler:
    """Any unpickled object with `predict` (`predict_proba` column 1 for a binary task).

    LightGBM and XGBoost sklearn wrappers are unwrapped to their boosters: the wrapper's
    validation costs ~20x the prediction itself on a single row.
    """

    format_name: ClassVar[str] = "pickle"
    accepts_nan: ClassVar[bool] = True

    def __init__(
        self, predict_rows: Predictor, meta: ModelMeta, kind: str, *, probe: bool = False
    ) -> None:
        self._predict_rows = predict_rows
        self._row_shape = expected_input_shape(meta)
        self.kind = kind  # what was unpickled, for `inspect`: "lightgbm.LGBMClassifier", ...
        # Called one row at a time (the engine reads this) when a row's value depends on its
        # place in a batch: code that multiplies through BLAS (an sklearn MLP on float32)
        # rounds rows by their position, which would make restarts and replay differ.
        self.batching = _batching(self.predict, self._row_shape) if probe else INDEPENDENT
        self.row_by_row = self.batching == PLACE_DEPENDENT

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> Any:
        obj = _unpickle(path, device)
        kind = f"{type(obj).__module__.partition('.')[0]}.{type(obj).__name__}"
        torch_module = _torch_module_handler(obj, meta, device)
        if torch_module is not None:
            return torch_module
        booster_handler = _booster_handler(obj, meta)
        if booster_handler is not None:
            return cls(booster_handler.predict, meta, kind)
        refusal = feature_names_refusal(embedded_names(obj), meta.feature_list)
        if refusal is not None:
            raise ValueError(refusal)
        handler = cls(_estimator_predictor(obj, meta), meta, kind, probe=True)
        if handler.row_by_row:
            log.warning("%s: a row's value depends on its place in a batch (BLAS rounding):"
                        " predicted one row per call, so that restarts and replay give the"
                        " same values (slower; an ONNX export computes rows alike)", path)
        elif handler.batching == NOT_DETERMINISTIC:
            log.warning("%s: the model gives other values for the same rows from one call to"
                        " the next: its outputs cannot be reproduced by a restart or replay",
                        path)
        return handler

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, self._row_shape)
        return self._predict_rows(rows)

    def close(self) -> None:
        self._predict_rows = _closed


PROBE_ROWS = 96


INDEPENDENT, PLACE_DEPENDENT, NOT_DETERMINISTIC = "independent", "place", "random"


def _batching(predict: Predictor, row_shape: tuple[int, ...]) -> str:
    """PLACE_DEPENDENT when rows get other values with the batch shifted by 1 and by 6 rows
    (seeded normal rows); NOT_DETERMINISTIC when the same call gives other values (one row
    per call would not help: batched as any other); INDEPENDENT otherwise, or when the model
    refuses the probe rows (nothing to compare)."""
    rows = np.random.default_rng(0).normal(size=(PROBE_ROWS, *row_shape)).astype(np.float32)
    try:
        with np.errstate(all="ignore"):
            base = np.asarray(predict(rows), dtype=np.float64)
            again = np.asarray(predict(rows), dtype=np.float64)
            if not np.array_equal(again, base, equal_nan=True):
                return NOT_DETERMINISTIC
            for shift in (1, 6):
                moved = np.asarray(predict(np.roll(rows, shift, axis=0)), dtype=np.float64)
                if not np.array_equal(np.roll(moved, -shift), base, equal_nan=True):
                    return PLACE_DEPENDENT
    except Exception:
        return INDEPENDENT
    return INDEPENDENT


def _closed(rows: np.ndarray) -> np.ndarray:
    raise RuntimeError("handler is closed")


def _unpickle(path: Path, device: str) -> Any:
    try:
        if zipfile.is_zipfile(path):  # torch.save writes a zip archive
            import torch

            from handlers.torchscript import configure_torch, torch_device

            configure_torch()
            # weights_only=False on purpose: a whole module is a pickle of code, and the
            # loader has already decided this file may run code.
            return torch.load(path, map_location=torch_device(device), weights_only=False)
        if path.suffix == ".joblib":
            import joblib

            return joblib.load(path)
        with path.open("rb") as handle:
            return pickle.load(handle)
    except ModuleNotFoundError as exc:
        raise missing_dependency(exc) from exc


def _torch_module_handler(obj: Any, meta: ModelMeta, device: str) -> Any:
    torch = sys.modules.get("torch")  # a torch object can only exist if torch is imported
    if torch is None:
        return None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            "the pickle holds a state_dict, not a model; save the whole module"
            " (torch.save(module)) or export it (torch.export / torch.jit.save)"
        )
    if not isinstance(obj, torch.nn.Module):
        return None
    from handlers.torchscript import TorchModuleHandler, configure_torch, torch_device

    configure_torch()  # before the handler's first computation (MKL's reproducible mode)

    class PickledTorchModuleHandler(TorchModuleHandler):
        format_name: ClassVar[str] = "pickle"
        accepts_nan: ClassVar[bool] = False

    target = torch_device(device)
    module = obj.to(target).eval()
    return PickledTorchModuleHandler(module, meta, target)


def _booster_handler(obj: Any, meta: ModelMeta) -> Any:
    lgb = sys.modules.get("lightgbm")
    if lgb is not None and isinstance(obj, lgb.LGBMModel | lgb.Booster):
        from handlers.lightgbm_booster import LightGBMBoosterHandler

        # booster_ of an LGBMClassifier (binary objective) predicts the probability.
        booster = obj if isinstance(obj, lgb.Booster) else obj.booster_
        return LightGBMBoosterHandler(booster, meta)
    xgb = sys.modules.get("xgboost")
    if xgb is not None and isinstance(obj, xgb.XGBModel | xgb.Booster):
        from handlers.xgboost_booster import XGBoostBoosterHandler

        if isinstance(obj, xgb.Booster):
            return XGBoostBoosterHandler(obj, meta)
        # The wrapper's predict stops at the early-stopping round (its best_iteration), the
        # booster's own predict does not: the object's predict is the reference.
        return XGBoostBoosterHandler(
            obj.get_booster(), meta, iteration_range=_sklearn_iteration_range(obj)
        )
    return None


def _sklearn_iteration_range(obj: Any) -> tuple[int, int]:
    """The trees an XGBoost sklearn model's predict uses: up to best_iteration if it was
    trained with early stopping, else all ((0, 0))."""
    get = getattr(obj, "_get_iteration_range", None)
    if callable(get):
        first, last = get(None)
        return int(first), int(last)
    try:
        return 0, int(obj.best_iteration) + 1
    except AttributeError:
        return 0, 0


def _estimator_predictor(obj: Any, meta: ModelMeta) -> Predictor:
    binary = meta.binary
    if binary and callable(getattr(obj, "predict_proba", None)):
        method = obj.predict_proba
    elif callable(getattr(obj, "predict", None)):
        method = obj.predict
    else:
        raise ValueError(f"the pickled {type(obj).__name__} has no predict method")
    # An sklearn estimator fitted on a DataFrame warns on every numpy call; the columns are
    # in feature_list order (its names were checked at load), so that warning says nothing.
    quiet = getattr(obj, "feature_names_in_", None) is not None

    def predict_rows(rows: np.ndarray) -> np.ndarray:
        if quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="X does not have valid feature names")
                raw = method(rows)
        else:
            raw = method(rows)
        return to_prediction_vector(raw, rows.shape[0], binary=binary)

    return predict_rows
