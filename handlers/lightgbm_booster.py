"""A LightGBM native Booster (`model.txt`): load and batch predict."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import lightgbm as lgb
import numpy as np

from handlers.feature_names import embedded_names, feature_names_refusal
from handlers.meta import ModelMeta
from handlers.registry import INFERENCE_THREADS, check_batch, to_prediction_vector
from handlers.tree_compiler import Predict, compiled_predictor


class LightGBMBoosterHandler:
    """Booster.predict on float32 rows; a binary objective already yields the probability.
    Where the `trees` extra and a C compiler are available, the same trees compiled to native
    code predict instead (checked equal to Booster.predict at load: `tree_compiler`)."""

    format_name: ClassVar[str] = "lightgbm"
    accepts_nan: ClassVar[bool] = True

    def __init__(self, booster: lgb.Booster, meta: ModelMeta) -> None:
        expected = len(meta.feature_list)
        actual = booster.num_feature()
        if expected and actual != expected:
            raise ValueError(
                f"booster expects {actual} features, model_meta.json feature_list has {expected}"
            )
        refusal = feature_names_refusal(embedded_names(booster), meta.feature_list)
        if refusal is not None:
            raise ValueError(refusal)
        self._booster = booster
        self._binary = meta.binary
        self._num_features = actual
        self._compiled: Predict | None = None
        # One value per row, or refused now: a multiclass model (one column per class) would
        # load and then fail on every bar.
        self._native_vector(np.zeros((1, actual), dtype=np.float32))

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> LightGBMBoosterHandler:
        # Tree inference runs on the CPU whatever `device` says: batches are small.
        check_complete(path)
        handler = cls(lgb.Booster(model_file=str(path)), meta)
        # Categorical splits stay with LightGBM: the compiled code reads a category in
        # (-1, 0) as category 0, where LightGBM takes any negative category as missing.
        if not has_categorical_splits(path):
            handler._compiled = compiled_predictor(
                path, "lightgbm", handler._native, handler._num_features
            )
        return handler

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _native(self, rows: np.ndarray) -> np.ndarray:
        # num_threads per call: LightGBM otherwise takes every core for each tiny batch.
        return np.asarray(self._booster.predict(rows, num_threads=INFERENCE_THREADS))

    def _native_vector(self, rows: np.ndarray) -> np.ndarray:
        return to_prediction_vector(self._native(rows), rows.shape[0], binary=self._binary)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, (self._num_features,))
        raw = self._compiled(rows) if self._compiled is not None else self._native(rows)
        return to_prediction_vector(raw, rows.shape[0], binary=self._binary)

    def close(self) -> None:
        self._compiled = None
        self._booster = None  # type: ignore[assignment]


def has_categorical_splits(path: Path) -> bool:
    """Whether any tree of a LightGBM text model splits on a category (`num_cat=` above 0)."""
    with path.open("rb") as handle:
        for line in handle:
            if line.startswith(b"num_cat=") and line.strip() != b"num_cat=0":
                return True
    return False


def check_complete(path: Path) -> None:
    """Refuse a LightGBM text model that is cut short (a half-copied deploy, a full disk):
    LightGBM 4.x reads such a file past its end and kills the process (a segfault, or an
    abort) instead of raising, so the file's own structure is checked first. Every tree the
    header's `tree_sizes` announces must be there, followed by `end of trees`, and the
    parameters block, where present, must end with `end of parameters`."""
    text = path.read_bytes()
    sizes: list[int] | None = None
    for line in text.split(b"\n", 64)[:64]:
        if line.startswith(b"tree_sizes="):
            try:
                sizes = [int(x) for x in line[len(b"tree_sizes=") :].split()]
            except ValueError:
                sizes = None
            break
    problem = None
    if not text.startswith(b"tree\n"):
        problem = "not a LightGBM text model (no 'tree' header)"
    elif b"\nend of trees" not in text:
        problem = "no 'end of trees': the file is cut short"
    elif sizes is not None and text.count(b"\nTree=") != len(sizes):
        problem = f"{text.count(b'Tree=')} trees where tree_sizes lists {len(sizes)}"
    elif b"\nparameters:" in text and b"\nend of parameters" not in text:
        problem = "no 'end of parameters': the file is cut short"
    if problem:
        raise ValueError(f"{path.name}: {problem}")
