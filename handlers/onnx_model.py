"""An ONNX model (`model.onnx`) run by ONNX Runtime: load and batch predict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from handlers.meta import ModelMeta
from handlers.registry import (
    INFERENCE_THREADS,
    check_batch,
    check_model_input,
    expected_input_shape,
    padded_chunks,
    to_prediction_vector,
)

log = logging.getLogger(__name__)

_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}


def providers_for(device: str) -> list[Any]:
    """CPU, or CUDA first when asked for and this onnxruntime build has it."""
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        log.warning(
            "device %s requested but onnxruntime has no CUDA provider; using the CPU", device
        )
    return ["CPUExecutionProvider"]


class OnnxModelHandler:
    """One InferenceSession; feeds its single input, reads one output.

    With several outputs (a converted classifier: label + probabilities) it reads the one
    whose name holds "prob" when there is one, else the first; a ZipMap output (a list of
    {class: probability} dicts) gives the positive class, or the last class key.
    """

    format_name: ClassVar[str] = "onnx"
    accepts_nan: ClassVar[bool] = False

    def __init__(self, session: ort.InferenceSession, meta: ModelMeta) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"ONNX model has {len(inputs)} inputs; livepred feeds exactly one")
        (model_input,) = inputs
        if model_input.type not in _ONNX_DTYPES:
            raise ValueError(
                f"ONNX input {model_input.name!r} is {model_input.type}; expected float"
            )
        self._row_shape = expected_input_shape(meta)
        check_model_input(
            tuple(d if isinstance(d, int) else None for d in model_input.shape[1:]), self._row_shape
        )
        outputs = [out.name for out in session.get_outputs()]
        probability = [name for name in outputs if "prob" in name.lower()]
        self._output_name = (probability or outputs)[0]
        self._session = session
        self._input_name = model_input.name
        self._input_dtype = _ONNX_DTYPES[model_input.type]
        self._binary = meta.binary
        # A model exported with a fixed batch size is fed chunks of exactly that many rows
        # (the engine does not pad its batches then).
        first = model_input.shape[0] if model_input.shape else None
        self.static_batch: int | None = first if isinstance(first, int) and first > 0 else None
        self.predict(np.zeros((1, *self._row_shape), dtype=np.float32))  # fail at load, not later

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> OnnxModelHandler:
        options = ort.SessionOptions()
        options.intra_op_num_threads = INFERENCE_THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no per-session provider chatter
        session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        return cls(session, meta)

    @property
    def device(self) -> str:
        """The execution provider that runs the model first ("CPUExecutionProvider", ...)."""
        return str(self._session.get_providers()[0]) if self._session is not None else "closed"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, self._row_shape).astype(self._input_dtype, copy=False)
        count = rows.shape[0]
        if self.static_batch is None or count == self.static_batch:
            return self._run(rows)
        parts = [self._run(chunk) for chunk in padded_chunks(rows, self.static_batch)]
        return np.concatenate(parts)[:count]

    def _run(self, rows: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output_name], {self._input_name: rows})
        if isinstance(out, list) and out and isinstance(out[0], dict):
            out = [_positive_class(probabilities) for probabilities in out]
        return to_prediction_vector(out, rows.shape[0], binary=self._binary)

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _positive_class(probabilities: dict[Any, float]) -> float:
    for key in (1, "1", True):
        if key in probabilities:
            return float(probabilities[key])
    return float(probabilities[max(probabilities)])
