"""`models.device = "cuda"`: TorchScript models run on the GPU through the whole batch path.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
`python -m pytest --noconftest -o addopts="" tests/test_gpu.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

FEATS = ["ret_1d", "ret_5d", "vol_10d", "rsi_14", "ma_ratio_20", "bb_position"]
T = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import model_factory as mf

    root = tmp_path_factory.mktemp("gpu-run")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, len(FEATS))).astype(np.float32)
    mf.write_torchscript(root, "fwd", "MLP", X, X[:, 0], FEATS, epochs=5)
    Xs = rng.normal(size=(256, T, len(FEATS))).astype(np.float32)
    mf.write_torchscript(root, "fwd", "LSTM", Xs, Xs[:, -1, 0], FEATS, epochs=5)
    return root


def test_cuda_engine_matches_cpu_and_runs_on_the_gpu(run: Path) -> None:
    from daemon.state import SymbolTable
    from daemon.wire import Bar
    from handlers.engine import InferenceEngine
    from handlers.run import ModelLoader

    cpu = InferenceEngine(ModelLoader(run, device="cpu"), device="cpu").load_all()
    gpu = InferenceEngine(ModelLoader(run, device="cuda"), device="cuda").load_all()
    assert not gpu.load_errors and sorted(gpu.models["fwd"]) == ["LSTM", "MLP"]
    for fam in gpu.families():
        assert fam.model._device.type == "cuda", fam.family
    tables = [SymbolTable(e.input_spec, ttl_s=10**6) for e in (cpu, gpu)]
    rng = np.random.default_rng(1)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (40, 300)), axis=0))
    compared = 0
    for t in range(40):
        bars = [Bar(f"S{i}", (t + 1) * 60_000, c, c, c, c, 1.0, "bars", f"{t}-{i}")
                for i, c in enumerate(closes[t].tolist())]
        rows = []
        for table, engine in zip(tables, (cpu, gpu), strict=True):
            applied = table.apply(bars)
            assert applied.inputs is not None
            rows.append(engine.predict_batch(applied.inputs).rows())
        for a, b in zip(*rows, strict=True):
            assert a["fwd"]["warming"] == b["fwd"]["warming"]
            assert set(a["fwd"]["preds"]) == set(b["fwd"]["preds"])
            for fam, value in a["fwd"]["preds"].items():
                # cuDNN LSTMs use TF32 by default: agree to ~1e-3, not to the last bit.
                assert b["fwd"]["preds"][fam] == pytest.approx(value, rel=2e-3, abs=2e-4)
                compared += 1
    assert compared > 300 * 20
    assert torch.cuda.max_memory_allocated() > 0
