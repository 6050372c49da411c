"""Wiring: settings -> models -> one worker per partition; signals, reload, health, shutdown."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from redis.exceptions import RedisError

from daemon.model_setup import (
    build_engine,
    lost_in_swap,
    missing_artifacts,
    run_id_of,
    unserved_selections,
)
from daemon.observe import HealthServer, Metrics, SystemdNotifier
from daemon.partitions import partition_keys
from daemon.preflight import (
    EVICTION_WARNING,
    UNREAD_WARNING,
    evicting_policy,
    unread_inputs,
)
from daemon.reads import TRANSIENT
from daemon.redis_client import make_redis
from daemon.redis_faults import UNAVAILABLE, refuses_the_config
from daemon.runtime import settle_heap
from daemon.settings import Settings, redact_url
from daemon.streams import StreamIO, group_lag
from daemon.waits import sleep_unless
from daemon.worker import PartitionWorker, Role
from handlers.engine import InferenceEngine
from handlers.errors import short_error

log = structlog.get_logger("livepred.service")

STOP_GRACE_S = 10.0
EXECUTOR_GRACE_S = 3.0  # at exit, for a model call in progress to return
HEARTBEAT_EVERY_S = 1.0
STALL_MIN_S = 10.0  # no progress for this long (or 50 reads' block_ms) is a stall


class MetricsPortError(RuntimeError):
    """The metrics/health port cannot be listened on (taken, or not allowed)."""


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """The one line for a metrics port that cannot be listened on, with the likely cause."""
    if isinstance(exc, socket.gaierror):
        hint = "metrics.host is not a name this host resolves"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = "metrics.host is not an address of this host"
    elif exc.errno == errno.EADDRINUSE:
        hint = "another process has it? pick another port, or 0 for none"
    else:
        hint = "pick another port, or 0 for none"
    return (f"metrics.port = {port} (metrics.host = {host!r}): cannot listen:"
            f" {exc.strerror or exc} ({hint})")


async def try_listen(host: str, port: int) -> str | None:
    """Why the metrics port could not be listened on now, or None (`run --check`)."""
    try:
        server = await asyncio.start_server(lambda r, w: None, host, port)
    except OSError as exc:
        return cannot_listen(host, port, exc)
    server.close()
    await server.wait_closed()
    return None


class RedisRefusedError(RuntimeError):
    """Redis answers but refuses the configured connection (password, ACL, database index):
    waiting will not change that."""




class Service:
    """The daemon. Takes its Redis client and clock from outside so tests can inject them."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis: Any = None,
        engine: InferenceEngine | None = None,
        metrics: Metrics | None = None,
        notify_socket: str | None = None,
        hostname: str | None = None,
        pid: int = 0,
        clock_us: Any = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self._owns_redis = redis is None
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.notifier = SystemdNotifier(notify_socket)
        self.consumer = settings.consumer_name(hostname or socket.gethostname(), pid)
        self.token = f"{self.consumer}:{uuid.uuid4().hex[:12]}"
        self.clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self.stop_event = asyncio.Event()
        self.reload_event = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livepred-infer")
        # Reloads load and retire models here, off the computing thread (and off asyncio's
        # default executor, which asyncio.run waits for without end at exit).
        self.loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livepred-load")
        self.workers: list[PartitionWorker] = []
        self.health_server: HealthServer | None = None
        self.redis_ok = True
        self.redis_refusal: str | None = None  # the heartbeat's error reply (OOM, BUSY, ...)
        self.reload_problem: str | None = None  # why the last reload kept the models
        self._started = False

    # ---- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_event.set()

    def request_reload(self) -> None:
        self.reload_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # ---- run -----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The port first: taken or not allowed, the start fails at once, before the models load.
        if self.settings.metrics.port:
            host, port = self.settings.metrics.host, self.settings.metrics.port
            self.health_server = HealthServer(
                self.metrics, self.health, host=host, port=port, ready=self.ready,
                roles=self.roles,
            )
            try:
                await self.health_server.start()
            except OSError as exc:
                self.health_server = None
                raise MetricsPortError(cannot_listen(host, port, exc)) from None
        if self.redis is None:
            self.redis = make_redis(self.settings)
            await self._check_redis()
        if self.engine is None:
            self.engine = await loop.run_in_executor(self.executor, build_engine, self.settings)
        settle_heap()
        self._report_models(self.engine)
        if len(self.settings.streams.input) > 1:
            log.warning("several input streams: a restart replays their histories one after the"
                        " other, so TTL resets and evictions after it can differ from an"
                        " uninterrupted run's (one input stream per partition is exact)",
                        inputs=list(self.settings.streams.input))
        missing = missing_artifacts(self.engine)  # a reload to such a run is refused instead
        if missing:
            log.error("manifest.json lists files the run does not have (a partial copy?): their"
                      " models are not served", missing=missing[:20], count=len(missing))
        s = self.settings.streams
        for keys in partition_keys(self.settings):
            io = StreamIO.for_partition(
                self.redis, keys, group=s.group, consumer=self.consumer,
                output_maxlen=s.output_maxlen,
            )
            self.workers.append(
                PartitionWorker(
                    io,
                    partition=keys.partition,
                    engine=lambda: self.engine,  # type: ignore[arg-type,return-value]
                    ttl_s=float(self.settings.state.symbol_ttl_s),
                    run_id=lambda: run_id_of(self.engine),  # type: ignore[arg-type]
                    executor=self.executor,
                    token=self.token,
                    batch=s.batch,
                    block_ms=s.block_ms,
                    lease_ms=s.lease_ms,
                    warmup_bars=self.settings.state.warmup_bars,
                    preferred=keys.preferred,
                    metrics=self.metrics,
                    clock_us=self.clock_us,
                )
            )
        self._started = True

    async def _check_redis(self) -> None:
        """One PING at start: unreachable is an outage (retried while serving); refused (a
        wrong password, an ACL, a database index the server does not have) is the config."""
        try:
            await asyncio.wait_for(self.redis.ping(), timeout=5.0)
        except UNAVAILABLE as exc:
            if refuses_the_config(exc):
                raise RedisRefusedError(
                    f"redis.url = {redact_url(self.settings.redis.url)!r}: Redis refused it:"
                    f" {exc}"
                ) from None
            # Down, or a passing state (BUSY, LOADING, MASTERDOWN, a cluster still forming).
            log.warning("redis unavailable at start, retrying while serving",
                        url=redact_url(self.settings.redis.url),
                        error=str(exc) or type(exc).__name__)
            return
        policy = await evicting_policy(self.redis)
        if policy is not None:
            log.warning(EVICTION_WARNING.format(policy=policy), policy=policy)
        odd = await unread_inputs(self.redis, self.settings)
        if odd:
            log.warning(UNREAD_WARNING.format(keys=", ".join(odd),
                                              n=self.settings.streams.partitions), keys=odd)

    async def run(self) -> int:
        if not self._started:
            await self.start()
        tasks = [asyncio.create_task(w.run(self.stop_event)) for w in self.workers]
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._watchdog_loop()),
            asyncio.create_task(self._reload_loop()),
        ]
        self.notifier.notify(f"READY=1\nSTATUS={self.status()}")
        s = self.settings
        log.info(
            "livepred running",
            redis=redact_url(s.redis.url),
            inputs=[k for w in self.workers for k in w.io.inputs],
            output=s.streams.output,
            group=s.streams.group,
            consumer=self.consumer,
            partitions=[w.partition for w in self.workers if w.partition is not None] or "all",
            run_root=str(s.models.run_root),
            families=sum(1 for _ in self.engine.families()) if self.engine else 0,
        )
        code = 0
        try:
            stopping = asyncio.create_task(self.stop_event.wait())
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            ended = [t for t in tasks if t.done()]
            if ended and not self.stop_event.is_set():
                # A worker ends only when told to: one that died (an error its own handlers
                # do not contain) would leave its partitions unserved behind a healthy
                # process. Exit non-zero: the unit restarts the process.
                code = 1
                failure = None if ended[0].cancelled() else ended[0].exception()
                log.error("a partition worker ended by itself: stopping so that the service"
                          " restarts", error=repr(failure))
                self.stop_event.set()
        finally:
            self.notifier.notify("STOPPING=1")
            log.info("stopping: finishing the batch in hand")
            done, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for t in pending:
                log.error("worker did not stop in time; cancelling it", where=_stack_of(t))
                t.cancel()
            for t in background:
                t.cancel()
            # Bounded: a cancel lost inside a Redis call must not hold the exit (the loops
            # also end on the stop event).
            await asyncio.wait([*pending, *background], timeout=STOP_GRACE_S)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.error("worker failed", error=repr(t.exception()))
            try:  # no instance claims to be alive for the key's last seconds
                await asyncio.wait_for(self.redis.delete(self._heartbeat_key()), timeout=1.0)
            except UNAVAILABLE:
                pass  # it expires by itself
            await self.close()
        return code

    async def close(self) -> None:
        if self.health_server is not None:
            await self.health_server.close()
        if self._owns_redis and self.redis is not None:
            try:
                await self.redis.aclose()
            except UNAVAILABLE:
                pass
        executors = {"compute": self.executor, "reload": self.loads}
        settled = await asyncio.gather(*(_settled(ex) for ex in executors.values()))
        stuck = [name for name, done in zip(executors, settled, strict=True) if not done]
        if stuck:
            # A model call (or load) that has not returned: the process leaves without it
            # (cli), and without closing the models it may be inside.
            log.error(f"a model call did not finish within {EXECUTOR_GRACE_S:.0f} s of the"
                      " stop: leaving without it", threads=stuck)
        elif self.engine is not None:
            self.engine.close()
        self.notifier.close()

    # ---- background loops ----------------------------------------------------------------

    def _heartbeat_key(self) -> str:
        return f"{self.settings.streams.group}:heartbeat:{self.consumer}"

    async def _heartbeat_loop(self) -> None:
        """The heartbeat key and the lag gauge: Redis calls, which may wait out a socket
        time-out, so the watchdog has its own loop."""
        key = self._heartbeat_key()
        last_lag = 0.0
        said = ""
        while not self.stop_event.is_set():
            try:
                await self.redis.set(key, str(int(time.time() * 1000)), ex=10)
                self.redis_ok, self.redis_refusal = True, None
                if time.monotonic() - last_lag > 5:
                    last_lag = time.monotonic()
                    await self._update_lag()
            except TRANSIENT:  # no answer: what /healthz and STATUS= say
                self.redis_ok = False
            except Exception as exc:  # an error reply (OOM, BUSY, MASTERDOWN, an ACL), or a
                # bug: this loop must not end silently; said once, not once a second
                if isinstance(exc, RedisError):
                    self.redis_ok, self.redis_refusal = True, short_error(exc)
                if short_error(exc) != said:
                    said = short_error(exc)
                    log.warning("heartbeat failed", error=said)
            else:
                said = ""
            await sleep_unless(self.stop_event, HEARTBEAT_EVERY_S)

    async def _watchdog_loop(self) -> None:
        """Every second, no Redis call: WATCHDOG=1 unless a worker is stalled, STATUS= when
        what the instance does changes, the symbols gauge."""
        status = ""
        while not self.stop_event.is_set():
            for w in self.workers:
                if w.role in (Role.ACTIVE, Role.REBUILDING) and w.pipeline is not None:
                    # (rebuilding after a reload: the state served until then)
                    self.metrics.symbols(w.partition, len(w.pipeline.table))
                else:
                    self.metrics.partition_left(w.partition, list(w.io.inputs))
            # The watchdog is for a hung process. A Redis outage is no reason to be killed
            # (the workers ride it out, CONTRACT section 5), so only a stalled worker
            # withholds it; /healthz still reports Redis.
            if self.stalled() is None:
                self.notifier.notify("WATCHDOG=1")
            now = self.status()
            if now != status:
                status = now
                self.notifier.notify(f"STATUS={now}")
            await sleep_unless(self.stop_event, HEARTBEAT_EVERY_S)

    def status(self) -> str:
        """One line for `systemctl status`: each partition's role, then what /healthz would
        say is wrong (Redis unreachable or refusing, a partition stalled or failing), the last
        reload's failure."""
        parts = [self.roles() or "no partition"]
        if not self.redis_ok:
            parts.append("redis unreachable")
        elif self.redis_refusal is not None:
            parts.append(f"redis refuses: {self.redis_refusal}")
        for problem in (self.stalled(), self.failing()):
            if problem is not None:
                parts.append(problem)
        if self.reload_problem is not None:
            parts.append(f"last reload failed: {self.reload_problem}")
        return "; ".join(parts)[:400]

    async def _update_lag(self) -> None:
        for w in self.workers:
            if w.role != Role.ACTIVE:
                continue
            for stream in w.io.inputs:
                found = await group_lag(self.redis, stream, self.settings.streams.group)
                if found is not None and found[1] is not None:
                    self.metrics.lag.labels(stream).set(found[1])

    async def health(self) -> str | None:
        """None when healthy, else the reason (for /healthz and the watchdog)."""
        if not self._started:
            return "starting: loading models"
        try:
            await asyncio.wait_for(self.redis.ping(), timeout=1.0)
        except TRANSIENT as exc:
            return f"redis unreachable: {exc}"
        except UNAVAILABLE as exc:  # an error reply: BUSY, MASTERDOWN, an ACL
            return f"redis refuses: {short_error(exc)}"
        return self.stalled() or self.failing()

    async def ready(self) -> str | None:
        """None when every partition this instance holds is served, else why (/readyz):
        unhealthy, a lease not yet tried, or state still being rebuilt. A partition standing
        by is ready: it waits for another instance's lease by design (and rebuilds once it
        takes it over)."""
        problem = await self.health()
        if problem is not None:
            return problem
        for role, what in ((Role.STARTING, "starting"), (Role.REBUILDING, "rebuilding state")):
            names = [_name(w.partition) for w in self.workers if w.role == role]
            if names:
                return f"{what}: {', '.join(names)}"
        return None

    def roles(self) -> str:
        """What each partition does here, e.g. 'active 0,2; standby 1' ('active' alone for an
        unpartitioned stream)."""
        by_role: dict[str, list[str]] = {}
        for w in self.workers:
            name = "" if w.partition is None else str(w.partition)
            by_role.setdefault(str(w.role), []).append(name)
        return "; ".join(
            f"{role} {','.join(names)}".rstrip() for role, names in sorted(by_role.items())
        )

    def stalled(self) -> str | None:
        """The first partition serving or rebuilding state whose worker made no progress
        for too long, or None. A rebuild progresses chunk by chunk (each read or applied), so
        a long one is not a stall; one hung inside a chunk is."""
        stall_s = max(STALL_MIN_S, 50 * self.settings.streams.block_ms / 1000)
        now = time.monotonic()
        for w in self.workers:
            if (w.role in (Role.ACTIVE, Role.REBUILDING)
                    and now - w.last_progress_s > stall_s):
                return f"{_name(w.partition)} stalled for {now - w.last_progress_s:.0f}s"
        return None

    def failing(self) -> str | None:
        """The first partition that failed and has not made progress since, or None."""
        for w in self.workers:
            if w.failing is not None:
                return f"{_name(w.partition)} failing: {w.failing}"
        return None

    async def _reload_loop(self) -> None:
        while True:
            await self.reload_event.wait()
            self.reload_event.clear()
            try:
                await self.reload()
            except Exception:  # a dead loop would ignore every later SIGHUP
                self.metrics.reloads.labels("failed").inc()
                log.exception("reload failed: keeping the current models")
                self._reloaded("an internal error (see the log)")

    def _reloaded(self, problem: str | None) -> None:
        """The reload is over (`problem`: why it kept the current models)."""
        self.reload_problem = None if problem is None else " ".join(problem.split())[:200]
        if not self.stop_event.is_set():  # not READY=1 after STOPPING=1
            self.notifier.notify(f"READY=1\nSTATUS={self.status()}")

    async def reload(self) -> bool:
        """Load the models again from run_root; swap them in between batches, or keep the old."""
        # MONOTONIC_USEC: what systemd >= 253 expects with Type=notify-reload.
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        log.info("reloading models", run_root=self.settings.models.run_root)
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(self.loads, build_engine, self.settings)
        except Exception as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed: keeping the current models", error=str(exc))
            self._reloaded(str(exc))
            return False
        old = self.engine
        missing = missing_artifacts(engine)
        if missing:
            # A run still being copied (or broken): its manifest names files it lacks.
            self.metrics.reloads.labels("failed").inc()
            log.error("reload refused: manifest.json lists files the new run does not have"
                      " (a partial copy?); keeping the current models",
                      missing=missing[:20], count=len(missing))
            await loop.run_in_executor(self.loads, _retire, engine)
            self._reloaded(f"{len(missing)} file(s) of manifest.json missing")
            return False
        # Targets whose `pred` has a value now and would be null after the swap: the new
        # run selects a family that does not load (the same one, or another).
        lost = {
            target: family
            for target, family in unserved_selections(engine).items()
            if old is not None and old.selected.get(target) in old.models.get(target, {})
        }
        if lost:
            # A half-copied or broken deploy: the routed family serves now and would not after
            # the swap (`pred` null on every output). Keep the models that serve it.
            self.metrics.reloads.labels("failed").inc()
            reasons = {f"{t}/{f}": engine.load_errors.get((t, f), "not found") for t, f in lost.items()}
            log.error("reload refused: the new run's selected families do not load;"
                      " keeping the current models", families=reasons)
            await loop.run_in_executor(self.loads, _retire, engine)
            self._reloaded("its selected families do not load: " + ", ".join(sorted(reasons)))
            return False
        if old is not None:
            for what in lost_in_swap(old, engine):
                log.warning("no longer served after this reload: " + what)
        self._report_models(engine)
        self.engine = engine
        self.metrics.reloads.labels("ok").inc()
        log.info("models reloaded", run=run_id_of(engine))
        self._reloaded(None)
        # Close the old models after the batch that may still use them has finished (same
        # executor), then settle the heap around the new ones.
        asyncio.get_running_loop().run_in_executor(self.executor, _retire, old)
        return True

    def _report_models(self, engine: InferenceEngine) -> None:
        loaded = list(engine.families())
        self.metrics.models_loaded.set(len(loaded))
        # Counted once per family refused, not again on each reload of an unchanged run; the
        # gauge says what is refused now (each logged by the engine as it was refused).
        before = self.engine.load_errors if self.engine not in (None, engine) else {}
        for key in engine.load_errors:
            if key not in before:
                self.metrics.model_load_failures.inc()
        self.metrics.refused_models(list(engine.load_errors))
        for target, family in unserved_selections(engine).items():
            log.warning("selected family not loaded: pred will be null", target=target,
                        family=family)
        for fam in loaded:
            log.info(
                "model loaded",
                target=fam.target,
                family=fam.family,
                format=fam.format_name,
                features=len(fam.meta.feature_list),
                window=fam.meta.window,
                **({} if fam.compiled is None else {"compiled": fam.compiled}),
                **({} if fam.device is None else {"device": fam.device}),
            )


async def _settled(executor: ThreadPoolExecutor) -> bool:
    """Shut the executor down; whether its thread finished what it was doing in time."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(executor, _nothing), EXECUTOR_GRACE_S)
    except TimeoutError:
        executor.shutdown(wait=False, cancel_futures=True)
        return False
    except RuntimeError:  # shut down already (a second close): never wait on it again
        return not any(t.is_alive() for t in getattr(executor, "_threads", ()))
    executor.shutdown(wait=True)
    return True


def _nothing() -> None:
    pass


def _name(partition: int | None) -> str:
    return "the partition" if partition is None else f"partition {partition}"


def _retire(engine: InferenceEngine | None) -> None:
    if engine is not None:
        engine.close()
    settle_heap(thaw=True)


def _stack_of(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended, innermost last (for a log line)."""
    frames = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " > ".join(frames)
