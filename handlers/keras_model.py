"""A Keras 3 model (`model.keras` / `model.h5`, TensorFlow backend): load and batch predict."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from handlers.meta import ModelMeta
from handlers.registry import (
    check_batch,
    check_model_input,
    expected_input_shape,
    fixed_batch_for,
    to_prediction_vector,
)
from handlers.tf_savedmodel import configure_tensorflow, tf_device_name


class KerasModelHandler:
    """The model called through one traced `tf.function` (never `model.predict`, which costs
    milliseconds per call). A binary head of 1 unit is taken as a probability already
    (sigmoid); of 2 units (softmax), column 1."""

    format_name: ClassVar[str] = "keras"
    accepts_nan: ClassVar[bool] = False

    def __init__(self, model: Any, meta: ModelMeta, device_name: str) -> None:
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) > 1:
            raise ValueError(f"Keras model has {len(inputs)} inputs; livepred feeds exactly one")
        outputs = getattr(model, "outputs", None) or []
        if len(outputs) > 1:
            raise ValueError(f"Keras model has {len(outputs)} outputs; livepred reads exactly one")
        self._row_shape = expected_input_shape(meta)
        if inputs:
            check_model_input(tuple(inputs[0].shape[1:]), self._row_shape)
        self._model = model
        self._device_name = device_name
        self._binary = meta.binary
        # Called with this many rows every time (see registry.fixed_batch_for).
        self.fixed_batch = fixed_batch_for(model.count_params(), meta.sequence_length or 1)
        # One trace serves every batch size: the signature leaves the batch dimension open.
        signature = [tf.TensorSpec([None, *self._row_shape], tf.float32)]
        self._fn = tf.function(self._call, input_signature=signature, reduce_retracing=True)
        # Trace now, not on a bar; then call the traced graph directly, skipping the
        # polymorphic dispatch on every call (about half the per-call cost of a small model).
        self._graph = self._fn.get_concrete_function()
        self.predict(np.zeros((1, *self._row_shape), dtype=np.float32))

    def _call(self, x: tf.Tensor) -> tf.Tensor:
        return self._model(x, training=False)

    @property
    def device(self) -> str:
        """The TensorFlow device the model runs on ("/CPU:0", "/GPU:0")."""
        return self._device_name

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> KerasModelHandler:
        configure_tensorflow()  # before keras runs any TF op
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"Keras runs on the {keras.backend.backend()!r} backend; livepred needs"
                " 'tensorflow' (unset KERAS_BACKEND)"
            )
        if path.suffix == ".keras" and not zipfile.is_zipfile(path):
            # Keras says "File not found" for a file that is there but not a zip archive.
            raise ValueError(f"{path.name} is not a .keras zip archive (corrupt or cut short?)")
        device_name = tf_device_name(device)
        with tf.device(device_name):
            model = keras.saving.load_model(str(path), compile=False)
        return cls(model, meta, device_name)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, self._row_shape)
        with tf.device(self._device_name):
            out = self._graph(tf.constant(rows))
        if isinstance(out, list | tuple) and len(out) == 1:
            out = out[0]
        values = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        return to_prediction_vector(values, rows.shape[0], binary=self._binary)

    def close(self) -> None:
        self._fn = None
        self._graph = None
        self._model = None
