"""`livepred bench --quick` end to end: the real CLI as a subprocess. A smoke test: it asserts
that the run completes and that its outputs are right (one output per bar), never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FAMILIES = {"LightGBM", "MLP", "LSTM"}


def livepred_command() -> list[str]:
    script = Path(sys.executable).parent / "livepred"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*livepred_command(), "bench", "--quick", "--json", str(out),
         "--plot", str(tmp_path / "latency.png"), "--markdown", str(tmp_path / "tables.md"),
         *args],
        capture_output=True, text=True, timeout=280, env=env,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done, json.loads(out.read_text())


def check_results(results: dict[str, Any]) -> None:
    assert results["mode"] == "quick"
    for key in ("machine", "redis_limit", "naive", "livepred", "burst", "memory", "rebuild",
                "families", "features", "targets"):
        assert key in results, key
    assert results["machine"]["cpus"] >= 1
    assert results["redis_limit"]["bars_per_s"] > 0
    assert results["naive"]["bars_per_s"] > 0
    assert results["livepred"], "no livepred scale ran"
    for scale, r in results["livepred"].items():
        for key in ("bars_per_s", "p50_ms", "p99_ms", "p999_ms", "rss_mb"):
            assert isinstance(r[key], int | float), (scale, key, r[key])
        assert r["bars_per_s"] > 0
        assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
        # The split by Redis's clock: per bar, input XADD -> output XADD is part of feeder
        # send -> seen (up to the ids' whole-millisecond rounding), so are its percentiles.
        assert 0 <= r["inside_p50_ms"] <= r["p50_ms"] + 1, scale
        assert 0 <= r["inside_p99_ms"] <= r["p99_ms"] + 1, scale
        assert r["reader_p50_ms"] >= -1, scale
        # Every bar of every drain and of the latency run: exactly one output naming it.
        assert r["outputs_match"] is True, scale
        assert r["latency_missing"] == 0, scale
        # The computing thread's CPU time per batch: some, and never more than the wall
        # time of the stages it spans (a process-wide clock would exceed it).
        assert r["drain_per_batch"]["mean_batch"] >= 1, scale
        for per_batch in (r["drain_per_batch"], r["latency_per_batch"],
                          r["light_load"]["per_batch"]):
            assert 0 < per_batch["compute CPU"] <= per_batch["compute wall"] * 1.1 + 0.05, scale
        stages = set(r["breakdown_us_per_bar"])
        assert {"decode", "state", "encode", "redis_commit"} <= stages
        assert {f"model:{f}" for f in FAMILIES} <= stages
    # The throughput target: each drain of the target scale against the passthrough drained
    # just before it (the embedded plan has no 1,000 scale: its largest stands in).
    scale = "1000" if "1000" in results["livepred"] else max(results["livepred"], key=int)
    drains = results["livepred"][scale]["bars_per_s_runs"]
    pair = results["livepred"][scale]["paired_limit"]
    assert len(pair["limit_bars_per_s_runs"]) == len(drains) >= 1
    assert all(v > 0 for v in pair["limit_bars_per_s_runs"])
    expected = [d / lim for d, lim in zip(drains, pair["limit_bars_per_s_runs"], strict=True)]
    assert pair["ratio_runs"] == pytest.approx(expected)
    assert pair["ratio"] == pytest.approx(float(np.median(expected)))
    target = next(t for t in results["targets"] if t["name"] == "throughput vs Redis limit")
    assert target["value"] == pytest.approx(pair["ratio"])
    burst = results["burst"]
    assert burst["symbols"] > 0
    # Measured from the feeder's reply to its pipeline: on a loaded box the last prediction
    # can become visible before that reply arrives, so only the type is checked.
    assert isinstance(burst["last_pred_ms"], int | float)
    assert burst["outputs_match"] is True
    assert results["naive"]["outputs_match"] is True
    assert results["memory"]["symbols"] > 0 and results["memory"]["bytes_per_symbol"] > 0
    assert results["memory"]["nbytes_per_slot"] > 0
    assert results["rebuild"]["bars_per_s"] > 0
    assert {f["family"] for f in results["families"]} == FAMILIES
    assert all(f["refusal"] is None for f in results["families"])
    assert all(f["single_after_pause_us"] > 0 for f in results["families"])
    assert {t["name"] for t in results["targets"]} >= {
        "throughput vs Redis limit", "throughput vs naive", "burst: last prediction",
        "state rebuild",
    }
    assert results["outputs_match"] is True


def test_quick_bench_against_real_redis(tmp_path: Path, real_redis_url: str) -> None:
    done, results = run_bench(tmp_path, "--redis-url", real_redis_url)
    check_results(results)
    assert results["embedded_redis"] is False
    assert "Targets" in done.stdout
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    tables = (tmp_path / "tables.md").read_text()
    assert "| symbols |" in tables
    assert "drained just before each drain" in tables
    # Everything the benchmark wrote under its key prefix is gone.
    import redis

    client = redis.Redis.from_url(real_redis_url)
    try:
        assert results["key_prefix"].startswith("livepred-bench:")
        assert not list(client.scan_iter(match=results["key_prefix"] + "*", count=1000))
    finally:
        client.close()


def test_quick_bench_on_the_embedded_redis(tmp_path: Path) -> None:
    done, results = run_bench(tmp_path, "--embedded")
    check_results(results)
    assert results["embedded_redis"] is True
    assert "NOT representative" in done.stdout
