"""`livepred demo` end to end: the real CLI as a subprocess, embedded Redis or a real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from handlers.run import ModelLoader

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FAMILIES = {"LightGBM", "MLP", "LSTM"}


def livepred_command() -> list[str]:
    script = Path(sys.executable).parent / "livepred"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]


def run_demo(
    *args: str, timeout_s: float = 240
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*livepred_command(), "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("DEMO SUMMARY ")]
    assert lines, f"no DEMO SUMMARY line\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    return done, json.loads(lines[-1].removeprefix("DEMO SUMMARY "))


def check_summary(summary: dict[str, Any]) -> None:
    by_family = summary["predictions_by_family"]
    assert set(by_family) == FAMILIES
    assert all(n > 0 for n in by_family.values()), by_family
    # The selected tree family predicts on every accepted bar: one output per live bar.
    assert by_family["LightGBM"] == summary["predictions_received"] == summary["bars_published"]
    assert sum(summary["dead_letters"].values()) >= 1
    assert set(summary["dead_letters"]) <= {
        "decode_error",
        "missing_field:close",
        "bad_value:close",
        "out_of_order",
    }
    assert summary["dead_letters"] == summary["malformed_published"]
    assert summary["lat_us_p50"] > 0 and summary["lat_us_p99"] >= summary["lat_us_p50"]


def test_demo_with_embedded_redis() -> None:
    done, summary = run_demo("--duration", "8", "--symbols", "12", "--no-live")
    assert done.returncode == 0, done.stderr[-3000:]
    check_summary(summary)
    assert summary["redis"] == "embedded"
    assert summary["symbols"] == 12


@pytest.mark.redis
def test_demo_with_a_real_redis_leaves_no_keys(real_redis_url: str, tmp_path: Path) -> None:
    kept = tmp_path / "run"
    done, summary = run_demo(
        "--duration",
        "6",
        "--symbols",
        "10",
        "--no-live",
        "--partitions",
        "2",
        "--redis-url",
        real_redis_url,
        "--keep-run",
        str(kept),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_summary(summary)
    prefix = summary["key_prefix"]
    assert prefix.startswith("demo:")
    client = redis.Redis.from_url(real_redis_url)
    try:
        assert list(client.scan_iter(match=f"{prefix}*")) == []
    finally:
        client.close()
    # The kept run is a complete training run.
    loader = ModelLoader(kept)
    assert set(loader.list_available_families("fwd_ret_5")) == FAMILIES
    assert loader.get_routing_decision("fwd_ret_5") == "LightGBM"


def test_demo_refuses_a_non_empty_keep_run_dir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    done = subprocess.run(
        [*livepred_command(), "demo", "--no-live", "--keep-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "not an empty directory" in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
