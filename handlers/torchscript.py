"""Compiled torch programs: TorchScript (`model.pt` / `model.ts`) and torch.export (`model.pt2`).

Also the torch runtime set-up and the module runner the pickled-module handler reuses.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from handlers.meta import ModelMeta
from handlers.registry import (
    INFERENCE_THREADS,
    check_batch,
    expected_input_shape,
    padded_chunks,
    to_prediction_vector,
)
from handlers.torch_rnn import flatten_rnn_weights

log = logging.getLogger(__name__)

_torch_configured = False
MKL_CBWR = "AUTO,STRICT"


def configure_torch() -> None:
    """Pin torch's thread pools, once. The inter-op pool can only be sized before first use."""
    global _torch_configured
    if _torch_configured:
        return
    _torch_configured = True
    # MKL's GEMM (torch's Linear on CPU) rounds a row differently by where it lies in memory
    # (measured on AVX2: every other row of a batch), so a row's value would depend on its
    # place in the batch. Strict conditional numerical reproducibility removes that; it is
    # read when MKL first computes, so this is in time unless the process used MKL already.
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    # On a GPU, full float32, whatever the environment set: with TF32 matmuls (10-bit
    # mantissa) a small MLP's outputs moved up to 3.7e-4 from the CPU's on an H100, without
    # 1.8e-7. Models of this size gain no speed from TF32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(INFERENCE_THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        log.debug("torch inter-op pool already started; keeping its size")


_this_thread = threading.local()


def _pin_this_thread() -> None:
    """Once per thread that runs a torch model: OpenMP keeps its thread count per thread, and
    `configure_torch` sets it only on the thread that loads torch first. A thread started
    elsewhere (an executor's, or the models loaded on another thread) would otherwise run
    torch's CPU kernels (oneDNN's LSTM among them) as a two-thread team whose idle worker
    spins at a barrier between calls: measured on 2 cores at light load, a worker at 40-50%
    of a core and the LSTM call 4x slower."""
    if not getattr(_this_thread, "pinned", False):
        torch.set_num_threads(INFERENCE_THREADS)
        _this_thread.pinned = True


def torch_device(device: str) -> torch.device:
    """The torch device for a livepred device string; "cuda" without CUDA falls back to CPU."""
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(device)
        log.warning("device %s requested but torch sees no CUDA device; using the CPU", device)
    return torch.device("cpu")


class TorchModuleHandler:
    """Runs a torch callable under `inference_mode`: numpy in, input moved to the device,
    output moved back to the CPU. `static_batch` is for programs traced at one batch size:
    the rows are fed in chunks of that size, the last one padded."""

    format_name: ClassVar[str] = "torch_module"
    accepts_nan: ClassVar[bool] = False

    def __init__(
        self,
        module: Any,
        meta: ModelMeta,
        device: torch.device,
        *,
        static_batch: int | None = None,
    ) -> None:
        self._module = module
        self._device = device
        # cuDNN's one weight buffer per RNN, made once here rather than at every call.
        self.rnns_laid_out = flatten_rnn_weights(module) if device.type == "cuda" else 0
        self._row_shape = expected_input_shape(meta)
        self._binary = meta.binary
        self.static_batch = static_batch  # the engine does not pad such a model's batches
        self.predict(np.zeros((1, *self._row_shape), dtype=np.float32))  # fail at load, not later

    @property
    def device(self) -> str:
        """Where the module runs ("cpu", "cuda:0"), said in the daemon's "model loaded" line."""
        return str(self._device)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = check_batch(batch, self._row_shape)
        count = rows.shape[0]
        if self.static_batch is None or count == self.static_batch:
            raw = self._run(rows)
        else:
            raw = np.concatenate(
                [self._run(chunk) for chunk in padded_chunks(rows, self.static_batch)]
            )[:count]
        return to_prediction_vector(raw, count, binary=self._binary)

    def _run(self, rows: np.ndarray) -> np.ndarray:
        _pin_this_thread()
        if not rows.flags.writeable:
            rows = rows.copy()  # torch.from_numpy warns on read-only memory
        x = torch.from_numpy(rows)
        if self._device.type != "cpu":
            x = x.to(self._device)
        with torch.inference_mode():
            out = self._module(x)
        if isinstance(out, list | tuple):
            if len(out) != 1:
                raise ValueError(f"model returned {len(out)} outputs; livepred reads exactly one")
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model returned {type(out).__name__}, not a tensor")
        return out.detach().to(device="cpu", dtype=torch.float64).numpy()

    def close(self) -> None:
        self._module = None


class TorchScriptHandler(TorchModuleHandler):
    """A TorchScript archive (`torch.jit.save`), loaded with `torch.jit.load`."""

    format_name: ClassVar[str] = "torchscript"

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> TorchScriptHandler:
        configure_torch()
        _refuse_plain_torch_save(path)
        target = torch_device(device)
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates torch.jit; loading existing archives still works.
            warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit", category=FutureWarning)
            module = torch.jit.load(str(path), map_location=target)
        module.eval()
        return cls(module, meta, target)


class TorchExportHandler(TorchModuleHandler):
    """A `torch.export` program (`torch.export.save`), run as `torch.export.load(...).module()`."""

    format_name: ClassVar[str] = "torch_export"

    @classmethod
    def load(cls, path: Path, meta: ModelMeta, *, device: str = "cpu") -> TorchExportHandler:
        configure_torch()
        target = torch_device(device)
        program = torch.export.load(str(path))
        if target.type != "cpu":
            # Rewrites the devices baked into the graph too (an LSTM's zero initial state):
            # module.to() would move only the parameters.
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, target)
        # The exported graph is already in eval mode (exported modules refuse .eval()).
        module = program.module()
        return cls(module, meta, target, static_batch=_static_batch(program))


def _static_batch(program: Any) -> int | None:
    """The batch size a program was exported with, if its batch dimension is not dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape is not None and len(shape) > 0 and isinstance(shape[0], int):
                return shape[0]
            return None
    return None


def _refuse_plain_torch_save(path: Path) -> None:
    """A `torch.save` pickle named model.pt is a common mix-up: say so instead of a zip error."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if names and not any("/code/" in name or name.startswith("code/") for name in names):
        raise ValueError(
            f"{path.name} is a torch.save pickle, not a TorchScript archive (torch.jit.save);"
            " export it with torch.jit.save or torch.export, or ship it as model.pkl"
        )
