"""Model file name -> handler class (CONTRACT section 2), with lazy framework imports.

Also the small pieces every handler shares: the thread count and the output shaping.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.errors import MissingDependencyError
from handlers.meta import ModelMeta
from handlers.native_stderr import quiet_native_stderr

# Threads each framework may use for one predict call. One: several frameworks share the
# process, and their OpenMP pools spin-wait against each other (measured on 2 cores with
# LightGBM + torch + TF loaded: 8 ms per single-row LightGBM call at 2 threads, ~50 us at 1).
INFERENCE_THREADS = 1


@dataclass(frozen=True, slots=True)
class ModelFormat:
    """One row of the CONTRACT section 2 table."""

    name: str
    file_names: tuple[str, ...]
    module: str  # handler module, imported only when this format is used
    class_name: str
    is_directory: bool = False


# Detection order is the table's order: the first format whose file is present wins.
MODEL_FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat("lightgbm", ("model.txt",), "handlers.lightgbm_booster", "LightGBMBoosterHandler"),
    ModelFormat(
        "xgboost", ("model.json", "model.ubj"), "handlers.xgboost_booster", "XGBoostBoosterHandler"
    ),
    ModelFormat("keras", ("model.keras", "model.h5"), "handlers.keras_model", "KerasModelHandler"),
    ModelFormat(
        "tf_savedmodel",
        ("model",),
        "handlers.tf_savedmodel",
        "SavedModelHandler",
        is_directory=True,
    ),
    ModelFormat(
        "torchscript", ("model.pt", "model.ts"), "handlers.torchscript", "TorchScriptHandler"
    ),
    ModelFormat("torch_export", ("model.pt2",), "handlers.torchscript", "TorchExportHandler"),
    ModelFormat("onnx", ("model.onnx",), "handlers.onnx_model", "OnnxModelHandler"),
    ModelFormat("pickle", ("model.pkl", "model.joblib"), "handlers.pickled", "PickledHandler"),
)
TENSORFLOW_MODULES = ("handlers.keras_model", "handlers.tf_savedmodel")
FORMATS_BY_NAME = {fmt.name: fmt for fmt in MODEL_FORMATS}
MODEL_FILE_NAMES: tuple[str, ...] = tuple(
    f"{name}/" if fmt.is_directory else name for fmt in MODEL_FORMATS for name in fmt.file_names
)

# Top-level module of a framework -> (pip package, livepred extra that installs it).
# lightgbm is a core dependency: reinstalling livepred brings it back.
FRAMEWORK_PACKAGES: dict[str, tuple[str, str]] = {
    "lightgbm": ("lightgbm", "all"),
    "xgboost": ("xgboost", "xgboost"),
    "tensorflow": ("tensorflow-cpu", "keras"),
    "keras": ("keras", "keras"),
    "tf_keras": ("keras", "keras"),
    "torch": ("torch", "torch"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnx": ("onnx", "onnx"),
    "sklearn": ("scikit-learn", "sklearn"),
    "joblib": ("joblib", "sklearn"),
    "scipy": ("scipy", "sklearn"),
}


def detect_model_file(family_dir: Path) -> tuple[str, Path] | None:
    """The format name and path of the model file in `family_dir`, in table order; None if none."""
    for fmt in MODEL_FORMATS:
        for file_name in fmt.file_names:
            candidate = family_dir / file_name
            if fmt.is_directory:
                if (candidate / "saved_model.pb").is_file():
                    return fmt.name, candidate
            elif candidate.is_file():
                return fmt.name, candidate
    return None


def handler_class(format_name: str) -> type:
    """Import the handler module for `format_name` (and so its framework) and return the class.

    A missing framework raises MissingDependencyError naming the pip extra.
    """
    try:
        fmt = FORMATS_BY_NAME[format_name]
    except KeyError:
        raise ValueError(
            f"unknown model format {format_name!r}; known: {', '.join(FORMATS_BY_NAME)}"
        ) from None
    try:
        if fmt.module in TENSORFLOW_MODULES and "tensorflow" not in sys.modules:
            with quiet_native_stderr():  # TensorFlow's banner, printed at its first import
                module = importlib.import_module(fmt.module)
        else:
            module = importlib.import_module(fmt.module)
    except ModuleNotFoundError as exc:
        raise missing_dependency(exc) from exc
    cls: type = getattr(module, fmt.class_name)
    return cls


def missing_dependency(exc: ModuleNotFoundError) -> Exception:
    """MissingDependencyError for a framework module that failed to import; else `exc` itself."""
    top = (exc.name or "").partition(".")[0]
    if top in FRAMEWORK_PACKAGES:
        package, extra = FRAMEWORK_PACKAGES[top]
        return MissingDependencyError(package, extra)
    return exc


def to_prediction_vector(raw: Any, rows: int, *, binary: bool) -> np.ndarray:
    """A model's raw output as the float64 (rows,) vector the handler protocol returns.

    (B,) and (B, 1) give one value per row (a scalar too, when B is 1). A binary model with a 2-column output (softmax / predict_proba) gives column 1, the
    positive class. Anything else, or a wrong row count, raises ValueError.
    """
    given = np.asarray(raw)
    if given.dtype.kind in "USO" and _holds_text(given):
        # "0.0123" would parse: a model answering in text is not answering in numbers.
        raise ValueError(f"model output holds text ({given.dtype}), not numbers")
    out = given.astype(np.float64, copy=False)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    elif out.ndim == 2 and out.shape[1] == 2 and binary:
        out = out[:, 1]
    elif out.ndim == 0 and rows == 1:
        out = out.reshape(1)
    if out.ndim != 1 or out.shape[0] != rows:
        raise ValueError(
            f"model output has shape {tuple(np.shape(raw))}; expected ({rows},) or ({rows}, 1)"
            + (" or (rows, 2) probabilities" if binary else "")
        )
    return out


def _holds_text(values: np.ndarray) -> bool:
    if values.dtype.kind in "US":
        return True
    return any(isinstance(v, str | bytes) for v in values.ravel())


def expected_input_shape(meta: ModelMeta) -> tuple[int, ...]:
    """One input row's shape: (F,), or (T, F) for a sequential model (F = channels if raw)."""
    width = len(meta.sequence_channels) if meta.raw_sequence else len(meta.feature_list)
    if meta.sequential:
        return (meta.window, width)
    return (width,)


def check_batch(batch: np.ndarray, row_shape: tuple[int, ...]) -> np.ndarray:
    """`batch` as a C-contiguous float32 (B, *row_shape) array (no copy when it already is one)."""
    rows = np.ascontiguousarray(batch, dtype=np.float32)
    if rows.shape[1:] != row_shape or rows.ndim != len(row_shape) + 1:
        expected = ", ".join(["B", *map(str, row_shape)])
        raise ValueError(f"expected a ({expected}) batch, got shape {rows.shape}")
    return rows


def check_model_input(model_shape: tuple[int | None, ...], row_shape: tuple[int, ...]) -> None:
    """Refuse a model whose declared input (batch dim excluded) contradicts model_meta.json."""
    if len(model_shape) != len(row_shape) or any(
        dim is not None and dim != want for dim, want in zip(model_shape, row_shape, strict=True)
    ):
        shown = ", ".join("None" if d is None else str(d) for d in model_shape)
        want = ", ".join(map(str, row_shape))
        raise ValueError(
            f"model input is (B, {shown}) but model_meta.json implies (B, {want})"
            " (feature_list / sequence_length)"
        )


def padded_chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """`rows` cut into chunks of exactly `size` rows (a model with a static batch size), the
    last one padded with copies of its last row (zeros could be out of the model's domain)."""
    chunks = [rows[i : i + size] for i in range(0, rows.shape[0], size)]
    short = size - chunks[-1].shape[0]
    if short:
        chunks[-1] = np.concatenate([chunks[-1], np.repeat(chunks[-1][-1:], short, axis=0)])
    return chunks


# A TensorFlow model's value for a row depends on how many rows share its call (measured on
# AVX2: 1 row in 1,000 differs in its last bits between calls of 96 and 128 rows), and, in a
# call whose size is not a multiple of the kernel's row panel (3 vectors of floats: 24 rows
# on AVX2, 48 on AVX-512), on whether the row falls in the last, partial panel. Such a model is
# always called with the same number of rows, a multiple of 96, padded: as many as a light
# batch can afford to compute for nothing.
FIXED_BATCH_SIZES = (4608, 2304, 1152, 576, 288, 192, 96)  # 4608: a 4,096-row drain batch
FIXED_BATCH_MAX = FIXED_BATCH_SIZES[0]
FIXED_BATCH_MIN = FIXED_BATCH_SIZES[-1]
PADDING_WORK = 2e6  # flops a call may spend on padding (about 0.4 ms on one AVX2 core)


def fixed_batch_for(params: int, steps: int = 1) -> int:
    """The rows per call of a model with `params` weights applied `steps` times per row (the
    sequence length of a recurrent model): the largest of FIXED_BATCH_SIZES whose work stays
    within PADDING_WORK, at least FIXED_BATCH_MIN."""
    work = 2 * max(1, params) * max(1, steps)
    for size in FIXED_BATCH_SIZES:
        if size * work <= PADDING_WORK:
            return size
    return FIXED_BATCH_MIN
