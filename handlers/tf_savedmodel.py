"""A TensorFlow SavedModel directory (`model/`): its `serving_default` signature, batch predict.

Also owns the one-time TensorFlow runtime set-up shared with the Keras handler.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from handlers.meta import ModelMeta
from handlers.registry import (
    INFERENCE_THREADS,
    check_batch,
    check_model_input,
    expected_input_shape,
    fixed_batch_for,
    to_prediction_vector,
)

log = logging.getLogger(__name__)

_tf_configured = False


def configure_tensorflow() -> None:
    """Pin TensorFlow's thread pools, once, before this process runs its first TF op.

    TensorFlow fixes its pools when its runtime starts; if something else started it
    already, the pools stay as they are (the call cannot change them then).
    """
    global _tf_configured
    if _tf_configured:
        return
    _tf_configured = True
    try:
        tf.config.threading.set_intra_op_parallelism_threads(INFERENCE_THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.debug("TensorFlow already initialised; keeping its thread pools")


def tf_device_name(device: str) -> str:
    """The TF device for a livepred device string; "cuda" without a visible GPU falls back to CPU."""
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        if tf.config.list_physical_devices("GPU"):
            return f"/GPU:{index}"
        log.warning("device %s requested but TensorFlow sees no GPU; using the CPU", device)
    return "/CPU:0"


class SavedModelHandler:
    """Calls `serving_default` with its single input, fed by name; takes its single output."""

    format_name: ClassVar[str] = "tf_savedmodel"
    accepts_nan: ClassVar[bool] = False

    def __init__(self, loaded: Any, meta: ModelMeta, device_name: str) -> None:
        signatures = loaded.signatures
        if "serving_default" not in signatures:
            raise ValueError(
                "SavedModel has no serving_default signature"
                f" (has: {', '.join(signatures) or 'none'})"
            )
        fn = signatures["serving_default"]
        args, kwargs = fn.structured_input_signature
        if args or len(kwargs) != 1:
            raise ValueError(
                f"serving_default must take exactly one named input; takes {len(args) + len(kwargs)}"
            )
        ((input_name, spec),) = kwargs.items()
        outputs = fn.structured_outputs
        if isinstance(outputs, dict):
            if len(outputs) != 1:
                raise ValueError(
                    f"serving_default must have exactly one output; has {', '.join(outputs)}"
                )
            (self._output_name,) = outputs
        else:
            self._output_name = None
        self._row_shape = expected_input_shape(meta)
        if spec.shape.rank is not None:
            check_model_input(tuple(spec.shape.as_list()[1:]), self._row_shape)
        self._loaded = loaded  # the signature only holds weak references to its variables
        self._fn = fn
        self._input_name: str = input_name
        self._input_dtype = spec.dtype.as_numpy_dtype
        self._device_name = device_name
        self._binary = meta.binary
        # The signature's own variables: a plain tf.Module's SavedModel lists none on the
        # loaded object, its concrete function captures them all.
        captured = getattr(fn, "variables", None) or getattr(loaded, "variables", None) or ()
        params = sum(int(np.prod(v.shape)) for v in captured)
        self.fixed_batch = fixed_batch_for(params, meta.sequence_length or 1)
        self.predict(np.zeros((1, *self._row_shape), dtype=np.float32))  # fail at load, not later

    @property
    def device(self) -> str:
        """The TensorFlow device the model runs on ("/CPU:0", "/GPU:0")."""
        return self._device_name

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> SavedModelHandler:
        configure_tensorflow()
        device_name = tf_device_name(device)
        with tf.device(device_name):
            loaded = tf.saved_model.load(str(path))
        return cls(loaded, meta, device_name)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, self._row_shape)
        feed = tf.constant(rows.astype(self._input_dtype, copy=False))
        with tf.device(self._device_name):
            out = self._fn(**{self._input_name: feed})
        if self._output_name is not None:
            out = out[self._output_name]
        return to_prediction_vector(out.numpy(), rows.shape[0], binary=self._binary)

    def close(self) -> None:
        self._fn = None
        self._loaded = None
