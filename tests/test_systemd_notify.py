"""What systemd sees (fakeredis): the watchdog beats whatever Redis does (hung, or a cluster
client's own exception), STATUS says what the instance does, a passing Redis state at start
is retried rather than taken for the config, and notifications survive a new socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.exceptions import (
    AuthenticationError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from daemon.observe import SystemdNotifier
from daemon.redis_faults import refuses_the_config
from daemon.service import RedisRefusedError, Service
from daemon.settings import load_settings
from daemon.streams import StreamIO
from daemon.worker import Role
from tests import daemon_harness as h

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


@pytest.fixture(scope="module")
def lgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.write_lightgbm_run(tmp_path_factory.mktemp("notify_run"), "fwd", "notify")


class Listener:
    """systemd's side of $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="lpn")  # a socket path must stay short
        self.address = os.path.join(self.directory, "notify")
        self.received: list[str] = []
        self.sock = self._bind()

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.address)
        sock.setblocking(False)
        return sock

    def rebind(self) -> None:
        """The socket made anew at the same path (as after a restart of its owner)."""
        self.sock.close()
        os.unlink(self.address)
        self.sock = self._bind()

    def collect(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.received.extend(self.sock.recv(4096).decode().splitlines())
        return self.received

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def listener() -> Iterator[Listener]:
    box = Listener()
    yield box
    box.close()


def _service(run: Path, redis: Any, address: str | None) -> Service:
    environ = {"LIVEPRED_MODELS__RUN_ROOT": str(run), "LIVEPRED_METRICS__PORT": "0",
               "LIVEPRED_STREAMS__BLOCK_MS": "10", "LIVEPRED_STREAMS__CONSUMER": "sd"}
    return Service(load_settings(None, environ), redis=redis, notify_socket=address)


@contextlib.asynccontextmanager
async def serving(run: Path, address: str,
                  prepare: Any = None) -> AsyncIterator[tuple[Service, Any, asyncio.Task]]:
    """A started, running service on fakeredis (`prepare(service, redis)` before it runs);
    stopped, exit 0, afterwards."""
    redis = fakeredis.FakeAsyncRedis()
    service = _service(run, redis, address)
    await service.start()
    if prepare is not None:
        prepare(service, redis)
    task = asyncio.create_task(service.run())
    try:
        yield service, redis, task
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
        await redis.aclose()


async def _until(predicate: Any, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["hangs", "cluster"])
async def test_the_watchdog_beats_while_redis_hangs_or_the_cluster_client_raises(
    lgb_run: Path, listener: Listener, fault: str
) -> None:
    # The watchdog waited for the heartbeat's SET: a Redis that does not answer held it for
    # the socket time-out (block_ms + 5 s, longer than WatchdogSec with a long block_ms). And
    # the cluster client's RedisClusterException, which is no RedisError, ended the loop:
    # no WATCHDOG=1 ever again, systemd's SIGABRT 30 s after any cluster blip.
    async with serving(lgb_run, listener.address) as (service, redis, task):
        await _until(lambda: "WATCHDOG=1" in listener.collect(), 10, "WATCHDOG=1")
        real_set, real_ping = redis.set, redis.ping

        async def hung(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(3600)

        async def no_node(*args: Any, **kwargs: Any) -> Any:
            raise RedisClusterException("Redis Cluster cannot be connected")

        broken = hung if fault == "hangs" else no_node
        redis.set = broken  # type: ignore[method-assign]
        redis.ping = broken  # type: ignore[method-assign]
        await asyncio.sleep(1.2)
        listener.received.clear()
        await asyncio.sleep(3.2)
        assert listener.collect().count("WATCHDOG=1") >= 2, listener.received
        health = await asyncio.wait_for(service.health(), 5)
        assert health is not None and health.startswith("redis unreachable"), health
        if fault == "cluster":
            await _until(lambda: any("redis unreachable" in m for m in listener.collect()),
                         5, "STATUS= with redis unreachable")
        redis.set, redis.ping = real_set, real_ping  # type: ignore[method-assign]
        await _until(lambda: service.redis_ok, 10, "the heartbeat to come back")
        assert task.done() is False


@pytest.mark.parametrize("where", ["rebuild", "pending"])
async def test_the_watchdog_beats_through_an_outage_that_starts_in_a_rebuild_or_the_pending(
    lgb_run: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # The worker retried the outage with its role left at REBUILDING (or ACTIVE, the pending
    # entries not drained) and its stall clock stopped: after the stall time no WATCHDOG=1,
    # and systemd killed a daemon that was only waiting for Redis (CONTRACT section 5).
    monkeypatch.setattr("daemon.service.STALL_MIN_S", 3.0)  # above the 2 s retry cap
    down = {"on": False}
    method = "history_boundary" if where == "rebuild" else "most_deliveries_pending"
    real_step = getattr(StreamIO, method)

    async def outage_begins(self: StreamIO, *args: Any, **kwargs: Any) -> Any:
        if not down["at"]:
            down["on"] = down["at"] = True
        if down["on"]:
            raise RedisConnectionError("Connection refused")
        return await real_step(self, *args, **kwargs)

    down["at"] = False
    monkeypatch.setattr(StreamIO, method, outage_begins)

    def prepare(service: Service, redis: Any) -> None:
        real = redis.execute_command

        async def call(*args: Any, **kwargs: Any) -> Any:
            if down["on"]:
                raise RedisConnectionError("Connection refused")
            return await real(*args, **kwargs)

        redis.execute_command = call

    async with serving(lgb_run, listener.address, prepare) as (service, _, _):
        await _until(lambda: down["on"], 10, "the outage to begin")
        state = service.workers[0].pipeline
        await asyncio.sleep(4)  # more than the stall time
        listener.collect()
        listener.received.clear()
        for _ in range(6):
            assert service.stalled() is None, service.stalled()
            await asyncio.sleep(0.25)
        assert "WATCHDOG=1" in listener.collect(), listener.received
        down["on"] = False
        await _until(lambda: service.workers[0].role == Role.ACTIVE
                     and service.workers[0].failing is None, 15, "serving again")
        if where == "pending":  # a blip with the lease held: the state kept, not rebuilt
            assert state is not None and service.workers[0].pipeline is state


async def test_status_says_the_role_and_a_failed_reload(
    lgb_run: Path, listener: Listener, tmp_path: Path
) -> None:
    async with serving(lgb_run, listener.address) as (service, _, _):
        await _until(lambda: "STATUS=active" in listener.collect(), 10, "STATUS=active")
        good = service.settings
        service.settings = _with_run_root(good, tmp_path / "gone")  # a deploy gone wrong
        assert await service.reload() is False
        statuses = [m for m in listener.collect() if m.startswith("STATUS=")]
        assert "last reload failed" in statuses[-1] and "gone" in statuses[-1], statuses
        reloading = listener.received.index(next(m for m in listener.received
                                                 if m.startswith("RELOADING=1")))
        assert listener.received[reloading + 1].startswith("MONOTONIC_USEC=")
        assert "READY=1" in listener.received[reloading:]
        service.settings = good
        assert await service.reload() is True
        assert listener.collect()[-1] == "STATUS=active"
    assert "STOPPING=1" in listener.collect()


def _with_run_root(settings: Any, run_root: Path) -> Any:
    models = settings.models.model_copy(update={"run_root": run_root})
    return settings.model_copy(update={"models": models})


def test_notifications_reach_a_socket_made_anew_at_the_same_path(listener: Listener) -> None:
    notifier = SystemdNotifier(listener.address)
    notifier.notify("READY=1")
    listener.collect()
    listener.rebind()
    notifier.notify("WATCHDOG=1")
    assert listener.collect() == ["READY=1", "WATCHDOG=1"]
    notifier.close()


def _reply(text: str) -> Exception:
    """The exception redis-py makes of an error reply (it strips the code of some)."""
    from redis._parsers.base import BaseParser

    return BaseParser.parse_error(text)


def _wrapped(reply: Exception) -> Exception:
    """As redis-py's cluster client raises a seed node's error reply (checked on 8.1)."""
    try:
        try:
            raise reply
        except Exception as exc:
            raise RedisClusterException(str(exc)) from exc
    except RedisClusterException as inner:
        try:
            raise RedisClusterException(
                "Redis Cluster cannot be connected. Please provide at least one reachable"
                " node: Cluster mode is not enabled on this node") from inner
        except RedisClusterException as outer:
            return outer


def _tls(cause: Exception) -> Exception:
    """As redis-py raises a failed TLS handshake: its ConnectionError from the ssl error."""
    try:
        try:
            raise cause
        except Exception as exc:
            raise RedisConnectionError(f"Error connecting: {exc}") from exc
    except RedisConnectionError as raised:
        return raised


@pytest.mark.parametrize(
    ("error", "config"),
    [
        (_reply("BUSY Redis is busy running a script. You can only call SCRIPT KILL"), False),
        (_reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to"
                " 'no'."), False),
        (_reply("LOADING Redis is loading the dataset in memory"), False),
        (_reply("READONLY You can't write against a read only replica."), False),
        (_reply("OOM command not allowed when used memory > 'maxmemory'."), False),
        (SlotNotCoveredError("slot 0 is not covered by the cluster"), False),
        (RedisClusterException("Redis Cluster cannot be connected. Please provide at least"
                               " one reachable node: Timeout connecting to server"), False),
        (_reply("WRONGPASS invalid username-password pair or user is disabled."), True),
        (_reply("NOAUTH Authentication required."), True),
        (_reply("NOPERM this user has no permissions to run the 'ping' command"), True),
        (_reply("ERR DB index is out of range"), True),
        (_reply("ERR unknown command 'ping', with args beginning with: "), True),
        (_reply("ERR SELECT is not allowed in cluster mode"), True),
        # The cluster client wraps whatever the seed node replied in "Cluster mode is not
        # enabled": a BUSY seed is waited for, a plain server or a bad password is not.
        (_wrapped(_reply("BUSY Redis is busy running a script.")), False),
        (_wrapped(_reply("ERR This instance has cluster support disabled")), True),
        (_wrapped(_reply("WRONGPASS invalid username-password pair or user is disabled.")),
         True),
        (AuthenticationError("invalid username-password pair"), True),
        # rediss:// (checked on redis-py 8.1 against a self-signed server): the certificate
        # is the config; a handshake cut short is not.
        (_tls(ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate"
                                           " verify failed: self-signed certificate")), True),
        (_tls(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")), False),
    ],
)
async def test_a_passing_redis_state_at_start_is_retried_not_taken_for_the_config(
    lgb_run: Path, error: Exception, config: bool
) -> None:
    # BUSY or MASTERDOWN at start exited 2, which the unit does not restart
    # (RestartPreventExitStatus=2): a Redis blip left the service failed for good.
    assert refuses_the_config(error) is config
    redis = fakeredis.FakeAsyncRedis()

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise error

    redis.ping = refused  # type: ignore[method-assign]
    service = _service(lgb_run, redis, None)
    try:
        if config:
            with pytest.raises(RedisRefusedError, match="Redis refused it"):
                await service._check_redis()
        else:
            await service._check_redis()  # warned, then retried while serving
    finally:
        await service.close()
        await redis.aclose()


async def test_the_heartbeat_outlives_an_error_that_is_not_an_outage(
    lgb_run: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error reply or a bug in the lag gauge ended the heartbeat loop silently (its key
    # and `redis_ok` frozen); a reply error was also taken for "redis unreachable".
    monkeypatch.setattr("daemon.service.HEARTBEAT_EVERY_S", 0.05)
    beats = 0

    async def broken() -> None:
        raise KeyError("lag")

    def prepare(service: Service, redis: Any) -> None:
        real_set = redis.set

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal beats
            beats += 1
            if beats % 2 == 0:
                raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
            return await real_set(*args, **kwargs)

        service._update_lag = broken  # type: ignore[method-assign]
        redis.set = counted

    async with serving(lgb_run, listener.address, prepare) as (service, _, _):
        await _until(lambda: beats >= 8, 10, "the heartbeat to go on")
        assert service.redis_ok
        assert "redis unreachable" not in service.status()


async def test_status_and_healthz_say_the_same_of_a_redis_that_refuses(
    lgb_run: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BUSY (another client's script) or MASTERDOWN: /healthz said "redis unreachable", STATUS=
    # said nothing (the heartbeat only logged the reply). Both now say Redis refuses, and
    # STATUS= drops it once Redis answers again.
    monkeypatch.setattr("daemon.service.HEARTBEAT_EVERY_S", 0.05)
    busy = {"on": False}
    text = "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."

    def prepare(service: Service, redis: Any) -> None:
        real_set, real_ping = redis.set, redis.ping

        def refusing(real: Any) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                if busy["on"]:
                    raise ResponseError(text)
                return await real(*args, **kwargs)
            return call

        redis.set, redis.ping = refusing(real_set), refusing(real_ping)

    async with serving(lgb_run, listener.address, prepare) as (service, _, _):
        await _until(lambda: "STATUS=active" in listener.collect(), 10, "STATUS=active")
        busy["on"] = True
        await _until(lambda: any("redis refuses" in m and "BUSY" in m
                                 for m in listener.collect()), 5, "STATUS= saying BUSY")
        health = await service.health()
        assert health is not None and health.startswith("redis refuses") and "BUSY" in health
        assert "unreachable" not in health
        busy["on"] = False
        listener.received.clear()
        await _until(lambda: "STATUS=active" in listener.collect(), 5, "STATUS= back to active")
        assert await service.health() is None


def test_a_notify_socket_nobody_drains_never_blocks(listener: Listener) -> None:
    # The socket's queue full (its reader stalled): sendto on a blocking socket waited for
    # ever, inside the event loop. The message is lost instead.
    import time

    notifier = SystemdNotifier(listener.address)
    started = time.monotonic()
    for _ in range(5000):
        notifier.notify("WATCHDOG=1")
    assert time.monotonic() - started < 5
    assert 0 < len(listener.collect()) < 5000
    notifier.close()


def test_ready_waits_for_room_in_a_full_queue(listener: Listener) -> None:
    # PID 1 busy (boot, daemon-reload): its queue full, READY=1 dropped would fail the start
    # after TimeoutStartSec. It waits a little for room; a watchdog beat does not.
    import threading
    import time

    notifier = SystemdNotifier(listener.address)
    for _ in range(5000):
        notifier.notify("WATCHDOG=1")  # fills the queue, dropping the rest
    threading.Timer(0.3, listener.collect).start()  # systemd reads again
    notifier.notify("READY=1")
    time.sleep(0.1)
    assert "READY=1" in listener.collect()
    notifier.close()
