"""Metrics, /healthz, the heartbeat key and systemd notification. No math, no business logic."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from handlers.native_stderr import quiet_native_stderr

__all__ = ["quiet_native_stderr"]  # re-exported: the demo and the benchmark use it

log = structlog.get_logger("livepred.observe")

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
FAMILY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


def _p(partition: int | None) -> str:
    return "-" if partition is None else str(partition)


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """`histogram.observe(value)` `count` times, in one step (prometheus_client's own bucket
    and sum values; observed one by one if their layout ever changes)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    for bucket, bound in zip(buckets, bounds, strict=True):
        if value <= bound:
            bucket.inc(count)
            return


class Metrics:
    """Every Prometheus series of the daemon, on its own registry (tests make many)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bars_in = Counter("livepred_bars_in", "Input entries read", ["partition"], registry=r)
        self.predictions_out = Counter(
            "livepred_predictions_out", "Prediction entries published", ["partition"], registry=r
        )
        self.dead_letters = Counter(
            "livepred_dead_letters", "Entries dead-lettered by reason", ["reason"], registry=r
        )
        self.duplicates = Counter("livepred_duplicates", "Duplicate bars skipped", registry=r)
        self.batch_size = Histogram(
            "livepred_batch_size", "Entries per batch", registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 512, 1000, 2000, 5000, 10000),
        )
        self.family_seconds = Histogram(
            "livepred_family_inference_seconds", "Inference time per family call",
            ["target", "family"], registry=r, buckets=FAMILY_BUCKETS_S,
        )
        self.stage_seconds = Histogram(
            "livepred_stage_seconds", "Time per batch stage", ["stage"], registry=r,
            buckets=FAMILY_BUCKETS_S,
        )
        # Against the compute stages' wall time (livepred_stage_seconds: decode, state+models,
        # encode), a starved host shows: the wall time grows, this does not.
        self.compute_cpu = Counter(
            "livepred_compute_cpu_seconds",
            "CPU time of the thread computing batches (decode, state, models, encode)",
            registry=r,
        )
        self.latency = Histogram(
            "livepred_read_to_publish_seconds",
            "Read-to-publish latency per bar (the lat_us of each output)", registry=r,
            buckets=LATENCY_BUCKETS_S,
        )
        self.active_symbols = Gauge(
            "livepred_active_symbols", "Symbols held in state", ["partition"], registry=r
        )
        self.evictions = Counter("livepred_evictions", "Symbols evicted by TTL", registry=r)
        self.resets = Counter("livepred_state_resets", "Symbol states restarted", registry=r)
        self.lag = Gauge(
            "livepred_consumer_lag", "Entries not yet delivered to the group", ["stream"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "livepred_model_load_failures",
            "Families refused or broken at load (once each; see livepred_model_refused)", registry=r
        )
        self.models_loaded = Gauge("livepred_models_loaded", "Families loaded", registry=r)
        self.models_refused = Gauge(
            "livepred_model_refused", "1 for each family of the run that is refused now",
            ["target", "family"], registry=r,
        )
        self.redis_errors = Counter(
            "livepred_redis_errors", "Redis errors (unreachable, timeouts, error replies)", registry=r
        )
        self.partitions_owned = Gauge(
            "livepred_partitions_owned", "Partitions this instance processes", registry=r
        )
        self.partition_role = Gauge(
            "livepred_partition_role", "1 for the partition's current role", ["partition", "role"],
            registry=r,
        )
        self.lease_renewals = Counter(
            "livepred_lease_renewals", "Lease renewals", ["partition"], registry=r
        )
        self.lease_losses = Counter("livepred_lease_losses", "Leases lost", ["partition"], registry=r)
        self.lease_handbacks = Counter(
            "livepred_lease_handbacks", "Partitions handed back to their preferred instance",
            ["partition"], registry=r,
        )
        self.failovers = Counter(
            "livepred_lease_acquisitions", "Leases taken (start or failover)", ["partition"],
            registry=r,
        )
        self.rebuild_bars = Counter("livepred_rebuild_bars", "Bars replayed into state", registry=r)
        self.rebuild_seconds = Counter(
            "livepred_rebuild_seconds", "Time spent rebuilding state", registry=r
        )
        self.reloads = Counter("livepred_reloads", "Model reloads by result", ["result"], registry=r)
        self.family_failures = Counter(
            "livepred_family_failures",
            "Bars a family gave no value for (not warming): its failed reason's kind, or"
            " non_finite_output", ["target", "family", "reason"], registry=r,
        )
        self.partition_failures = Counter(
            "livepred_partition_failures",
            "Partition restarts after an error (Redis error replies such as OOM or READONLY"
            " included)", ["partition"], registry=r,
        )
        self._roles: dict[str, str] = {}

    # ---- hooks the workers call ----------------------------------------------------------

    def batch(self, partition: int | None, report: Any, read_at_us: int, now_us: int) -> None:
        p = _p(partition)
        self.bars_in.labels(p).inc(report.bars)
        self.predictions_out.labels(p).inc(report.predictions)
        if report.duplicates:
            self.duplicates.inc(report.duplicates)
        for reason in report.dead_reasons:
            self.dead_letters.labels(reason.split(":", 1)[0] if ":" in reason else reason).inc()
        self.batch_size.observe(report.bars)
        for (target, family), seconds in report.family_seconds.items():
            self.family_seconds.labels(target, family).observe(seconds)
        for (target, family, reason), count in report.failures.items():
            self.family_failures.labels(target, family, reason).inc(count)
        for stage, seconds in report.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(seconds)
        self.compute_cpu.inc(max(0.0, report.cpu_seconds))
        # Every bar of the batch waited as long: counted once per bar, so the quantiles are
        # the bars' (a burst's slow bars are most of its bars, not one observation).
        if report.predictions:
            observe_many(self.latency, max(0, now_us - read_at_us) / 1e6, report.predictions)
        if report.evicted:
            self.evictions.inc(report.evicted)
        if report.resets:
            self.resets.inc(report.resets)

    def symbols(self, partition: int | None, count: int) -> None:
        self.active_symbols.labels(_p(partition)).set(count)

    def refused_models(self, families: list[tuple[str, str]]) -> None:
        self.models_refused.clear()
        for target, family in families:
            self.models_refused.labels(target, family).set(1)

    def partition_left(self, partition: int | None, streams: list[str]) -> None:
        """A partition this instance does not serve now (standing by, handed back, lost):
        its per-partition series go, so that a sum over instances counts the owner's only."""
        for gauge, label in [(self.active_symbols, _p(partition))] + [
            (self.lag, stream) for stream in streams
        ]:
            try:
                gauge.remove(label)
            except KeyError:
                pass

    def partition_failure(self, partition: int | None) -> None:
        self.partition_failures.labels(_p(partition)).inc()

    def redis_error(self) -> None:
        self.redis_errors.inc()

    def role(self, partition: int | None, role: str) -> None:
        p = _p(partition)
        old = self._roles.get(p)
        if old is not None:
            self.partition_role.labels(p, old).set(0)
        self.partition_role.labels(p, role).set(1)
        self._roles[p] = role
        self.partitions_owned.set(sum(1 for r in self._roles.values() if r == "active"))

    def lease_acquired(self, partition: int | None) -> None:
        self.failovers.labels(_p(partition)).inc()

    def lease_renewed(self, partition: int | None) -> None:
        self.lease_renewals.labels(_p(partition)).inc()

    def lease_handback(self, partition: int | None) -> None:
        self.lease_handbacks.labels(_p(partition)).inc()

    def lease_lost(self, partition: int | None) -> None:
        self.lease_losses.labels(_p(partition)).inc()

    def rebuild(self, bars: int, seconds: float) -> None:
        self.rebuild_bars.inc(bars)
        self.rebuild_seconds.inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """GET /metrics (Prometheus text), GET /healthz and GET /readyz (200 with what holds,
    503 with the reason). `health` and `ready` are coroutines: None when fine, else why;
    `roles` says what each partition does here (the body of a 200)."""

    def __init__(
        self, metrics: Metrics, health: Any, host: str = "0.0.0.0", port: int = 9464,
        ready: Any = None, roles: Any = None,
    ):
        self.metrics, self.health, self.host, self.port = metrics, health, host, port
        self.ready = ready or health
        self.roles = roles or (lambda: "")
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = (parts[1] if len(parts) > 1 else "/").split("?", 1)[0]
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.metrics.render()
            elif path in ("/healthz", "/readyz"):
                probe = self.health if path == "/healthz" else self.ready
                problem = await probe()
                status = "200 OK" if problem is None else "503 Service Unavailable"
                roles = self.roles()
                text = problem or ("ok: " + roles if roles else "ok")
                ctype, body = "text/plain; charset=utf-8", text.encode() + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


class SystemdNotifier:
    """sd_notify over the $NOTIFY_SOCKET datagram socket; a no-op outside systemd. Each
    message is sent to the address (as sd_notify does), so a socket made anew at the same
    path still gets them."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._target = ("\0" + address[1:] if address.startswith("@") else address) if address else None
        self._sock: socket.socket | None = None
        self._warned = False
        if self._target is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never blocks the event loop: a reader that does not drain the socket
                # (its queue full) loses a message, the loop goes on.
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("systemd notify socket unusable", error=str(exc))
                self._sock = None

    def notify(self, message: str) -> None:
        if self._sock is None or self._target is None:
            return
        # READY=1 lost would fail the start (TimeoutStartSec), STOPPING=1 or RELOADING=1 the
        # state systemd shows: those wait up to a second for room in a full queue (PID 1
        # busy); WATCHDOG=1 and STATUS= come again in a second anyway.
        tries = 100 if message.startswith(("READY=", "STOPPING=", "RELOADING=")) else 1
        try:
            for attempt in range(tries):
                try:
                    self._sock.sendto(message.encode(), self._target)
                    break
                except BlockingIOError:
                    if attempt == tries - 1:
                        raise
                    time.sleep(0.01)
            self._warned = False
        except OSError as exc:
            if not self._warned:  # once per run of failures, not once a second
                self._warned = True
                log.warning("systemd notify socket unusable", address=self.address,
                            error=str(exc))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


class _Stderr:
    """sys.stderr as it is at each write: whoever swaps it later (a test's capture, an
    embedding tool) gets the lines, and a closed one is never written to. A write that fails
    (the reader of a pipe gone: a log shipper or `| tee` that ended, a full disk) loses the
    line, never the caller: logging must not stop a worker or the reload loop."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):  # BrokenPipeError, EIO, ENOSPC; ValueError: closed
            return 0

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """structlog: JSON lines when not on a TTY (journald, files), console lines on a TTY."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    # Libraries' stdlib log records (the model side's refusals, LightGBM, Keras, ...) are
    # rendered by the same processors: one JSON object per line there too, with `logger`.
    handler = logging.StreamHandler(_Stderr())  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.ExtraAdder(),  # fields passed as `extra=`
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, "livepred", False)]:
        root.removeHandler(previous)  # configured again (tests, the demo): one handler only
    handler.livepred = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    # Python warnings (a framework's deprecation or load notice) as log records too: printed
    # raw they would put lines that are not JSON into a JSON log.
    # (Off first: on again, captureWarnings does nothing once it holds a previous hook.)
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def process_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
