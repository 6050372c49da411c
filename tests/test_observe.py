"""Logging and metrics plumbing: a log line that cannot be written never reaches the caller."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import structlog

from daemon.observe import configure_logging


class _BrokenPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_logging_to_a_closed_pipe_loses_the_line_not_the_caller(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # The reader of the daemon's stderr went away (a shipper, `| tee`): the worker that logs
    # "redis unavailable, retrying" must go on retrying, not die of the log call.
    configure_logging("info", fmt)
    monkeypatch.setattr(sys, "stderr", _BrokenPipe())
    structlog.get_logger("livepred.test").warning("redis unavailable, retrying", delay_s=0.1)
    structlog.get_logger("livepred.test").error("partition failed", exc_info=ValueError("x"))
    logging.getLogger("livepred.models").warning("a stdlib record from the model side")


def test_a_python_warning_is_one_json_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # A framework's UserWarning at model load was printed raw (two lines, not JSON) into the
    # daemon's JSON log.
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging("info", "json")
        warnings.warn("the given buffer is not writable", UserWarning, stacklevel=1)
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["logger"] == "py.warnings" and record["level"] == "warning"
    assert "UserWarning: the given buffer is not writable" in record["event"]


# ---- the metrics of a serving daemon (fakeredis) ------------------------------------------


class NanAboveZero:
    """A pickled model that gives NaN when its first input is above 0 (a broken model)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.where(x[:, 0] > 0, np.nan, 0.5)


async def test_failures_latency_and_refusals_are_counted_per_bar(tmp_path: Path) -> None:
    import fakeredis

    from daemon.service import Service
    from daemon.settings import load_settings
    from daemon.wire import encode_bar
    from daemon.wire_events import decode_prediction
    from tests import daemon_harness as h
    from tests import model_factory as mf

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(h.FEATURES)))
    mf.write_lightgbm(tmp_path, "fwd", "LightGBM", X, X[:, 0], h.FEATURES)
    mf.write_generic_pickle(tmp_path, "fwd", "Flaky", X, X[:, 0], ["ret_1d"],
                            predictor=NanAboveZero())
    broken = mf.family_dir(tmp_path, "fwd", "Broken")
    (broken / "model.txt").write_text("not a model")
    mf.write_meta(broken, h.FEATURES)
    redis = fakeredis.FakeAsyncRedis()
    settings = load_settings(None, {
        "LIVEPRED_MODELS__RUN_ROOT": str(tmp_path), "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__BLOCK_MS": "10", "LIVEPRED_STREAMS__CONSUMER": "m",
    })
    service = Service(settings, redis=redis)
    await service.start()
    await redis.xgroup_create("bars", "livepred", id="$", mkstream=True)
    bars = h.walk_bars(["AAA", "BBB", "CCC"], 30, seed=5)
    for bar in bars:
        await redis.xadd("bars", encode_bar(bar))
    task = asyncio.create_task(service.run())
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while await redis.xlen("predictions") < len(bars):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        assert await service.reload()  # the same run again: no refusal counted twice
        assert await redis.exists("livepred:heartbeat:m") == 1
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
    assert await redis.exists("livepred:heartbeat:m") == 0  # gone with the instance
    outputs = [decode_prediction(f) for _, f in await redis.xrange("predictions")]
    nan_rows = sum(1 for o in outputs if o.targets["fwd"].failed.get("Flaky"))
    assert 0 < nan_rows < len(outputs)
    value = service.metrics.registry.get_sample_value
    assert value("livepred_family_failures_total",
                 {"target": "fwd", "family": "Flaky", "reason": "non_finite_output"}) == nan_rows
    assert value("livepred_family_failures_total",
                 {"target": "fwd", "family": "LightGBM", "reason": "non_finite_output"}) is None
    # one latency observation per published bar, not per batch
    assert value("livepred_read_to_publish_seconds_count") == len(outputs)
    assert value("livepred_model_load_failures_total") == 1
    assert value("livepred_model_refused", {"target": "fwd", "family": "Broken"}) == 1
    await redis.aclose()


def test_a_partition_left_drops_its_series() -> None:
    from daemon.observe import Metrics

    metrics = Metrics()
    metrics.symbols(0, 20)
    metrics.lag.labels("bars:{0}").set(3)
    metrics.symbols(1, 5)
    metrics.partition_left(0, ["bars:{0}"])
    value = metrics.registry.get_sample_value
    assert value("livepred_active_symbols", {"partition": "0"}) is None
    assert value("livepred_consumer_lag", {"stream": "bars:{0}"}) is None
    assert value("livepred_active_symbols", {"partition": "1"}) == 5


async def test_healthz_and_readyz_answer_over_http() -> None:
    from daemon.observe import HealthServer, Metrics

    state = {"health": None, "ready": "rebuilding state: partition 1"}

    async def health():
        return state["health"]

    async def ready():
        return state["ready"]

    server = HealthServer(Metrics(), health, host="127.0.0.1", port=0, ready=ready,
                          roles=lambda: "active 0; rebuilding 1")
    await server.start()

    async def get(path: str) -> tuple[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        reply = (await reader.read()).decode()
        writer.close()
        head, body = reply.split("\r\n\r\n", 1)
        return head.splitlines()[0], body

    try:
        assert await get("/healthz") == ("HTTP/1.1 200 OK", "ok: active 0; rebuilding 1\n")
        assert await get("/readyz") == (
            "HTTP/1.1 503 Service Unavailable", "rebuilding state: partition 1\n"
        )
        state["health"] = state["ready"] = "partition 0 failing: OOM"
        assert await get("/healthz") == ("HTTP/1.1 503 Service Unavailable",
                                         "partition 0 failing: OOM\n")
        state["health"] = state["ready"] = None
        assert (await get("/readyz"))[0] == "HTTP/1.1 200 OK"
        assert (await get("/nope"))[0] == "HTTP/1.1 404 Not Found"
        assert (await get("/readyzz"))[0] == "HTTP/1.1 404 Not Found"
        assert (await get("/healthz?verbose=1"))[0] == "HTTP/1.1 200 OK"
    finally:
        await server.close()
