"""`livepred` command line: parse, call, print. Errors are one line with the fix."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from daemon.cli_common import EXIT_CONFIG, EXIT_FAILURE
from daemon.cli_common import fail as _fail
from daemon.cli_common import print_refusals as _print_refusals

EXIT_THREADS_GRACE_S = 2.0


def _version() -> str:
    try:
        return version("livepred")
    except PackageNotFoundError:
        return "0+unknown"


# ---- run ----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    # A SIGHUP while the process starts (its default action kills it) is kept for later: the
    # service reloads once its own handlers are in place. First, before the heavy imports.
    early_hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hups.append(signum))

    import structlog

    from daemon.model_setup import NoModelsError, build_engine
    from daemon.observe import configure_logging
    from daemon.service import MetricsPortError, RedisRefusedError, Service
    from daemon.settings import ConfigError, load_settings
    from handlers.errors import LivepredError

    try:
        settings = load_settings(args.config, os.environ)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    configure_logging(settings.log.level, settings.log.format)
    if args.offline and not args.check:
        return _fail("--offline only goes with --check (a running daemon needs Redis)",
                     EXIT_CONFIG)
    if args.check:
        try:
            engine = build_engine(settings)
        except NoModelsError as exc:
            return _fail(str(exc), EXIT_CONFIG)
        except (LivepredError, OSError) as exc:
            return _fail(str(exc))
        _print_models(engine)
        if settings.metrics.port:  # what `run` would meet first: a port taken
            from daemon.service import try_listen

            problem = asyncio.run(try_listen(settings.metrics.host, settings.metrics.port))
            if problem is not None:
                return _fail(problem, EXIT_CONFIG)
        if not args.offline:
            code = _check_redis(settings)
            if code:
                return code
        print("config ok", file=sys.stderr)
        return 0

    async def main() -> int:
        service = Service(
            settings,
            notify_socket=os.environ.get("NOTIFY_SOCKET"),
            hostname=socket.gethostname(),
            pid=os.getpid(),
        )
        service.install_signal_handlers()
        if early_hups:
            service.request_reload()
        # SIGTERM while the models load (a slow or hung one) stops the start, not after it.
        starting = asyncio.create_task(service.start())
        stopping = asyncio.create_task(service.stop_event.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            service.notifier.notify("STOPPING=1")
            starting.cancel()
            await asyncio.wait([starting])
            structlog.get_logger("livepred").warning("stopped while starting: models not loaded")
            await service.close()
            return 0
        try:
            starting.result()
        except (NoModelsError, MetricsPortError, RedisRefusedError) as exc:
            await service.close()
            return _fail(str(exc), EXIT_CONFIG)  # a restart cannot fix it
        except LivepredError as exc:
            await service.close()
            return _fail(str(exc))
        return await service.run()

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        code = 0
    _leave_without_stuck_threads(code)
    return code


def _leave_without_stuck_threads(code: int) -> None:
    """A thread that does not end (a model call that never returns, a thread a model
    started) would hold the interpreter's exit for ever: wait a little, then exit without it."""
    import threading
    import time

    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    deadline = time.monotonic() + EXIT_THREADS_GRACE_S
    for thread in others:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in others if t.is_alive()]
    if stuck:
        print(f"livepred: exiting with {len(stuck)} thread(s) still running"
              f" ({', '.join(stuck[:5])}): a model call or load that did not finish",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _check_redis(settings: Any) -> int:
    """--check: the Redis side (reachable, credentials, key types); 0 when all is well."""
    from daemon.preflight import check_redis
    from daemon.redis_client import make_redis

    async def look() -> Any:
        redis = make_redis(settings)
        try:
            return await check_redis(redis, settings)
        finally:
            await redis.aclose()

    report = asyncio.run(look())
    for line in report.lines:
        print(line, file=sys.stderr)
    if report.problems:
        for problem in report.problems[1:]:
            print(f"problem: {problem}", file=sys.stderr)
        return _fail(report.problems[0], EXIT_CONFIG)
    if report.unreachable:
        return _fail(f"{report.unreachable} (the daemon would wait for it; --offline skips"
                     " this check)")
    return 0


def _print_models(engine: Any) -> None:
    for fam in engine.families():
        compiled = " (compiled)" if fam.compiled else ""
        print(
            f"loaded  {fam.target}/{fam.family}: {fam.format_name}{compiled}, "
            f"{len(fam.meta.feature_list)} features, window {fam.meta.window}",
            file=sys.stderr,
        )
    _print_refusals(engine)


# ---- inspect ------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from daemon.cli_common import UsageError, model_choice, settings_of
    from daemon.inspect_run import inspect_run
    from handlers import tree_compiler

    try:
        # With --config: what the daemon with it would load (run_root, view, filters, checks).
        m = model_choice(args, settings_of(args))
    except UsageError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if m.run is None:
        return _fail("inspect needs a training run directory, or --config PATH", EXIT_CONFIG)
    tree_compiler.enabled = m.compile_trees
    run = m.run
    try:
        report = inspect_run(Path(run), view=m.view, allow_pickle=m.allow_pickle,
                             interval_minutes=m.interval_minutes, targets=m.targets,
                             families=m.families)
    except (OSError, ValueError) as exc:  # a run missing, or not readable by this user
        return _fail(str(exc))
    if args.config and report["nothing_loaded"]:  # what `run` would say: it would not start
        return _fail(f"no model could be loaded from {run!r} ({report['nothing_loaded']}):"
                     " the daemon would not start", EXIT_CONFIG)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from daemon.inspect_run import render

        render(report)
    if report["nothing_loaded"]:  # after the report, which shows what the run has
        return _fail(f"no model could be loaded from {run!r} ({report['nothing_loaded']})",
                     EXIT_CONFIG)
    return 0


# ---- tail ----------------------------------------------------------------------------------


def cmd_tail(args: argparse.Namespace) -> int:
    from daemon.redis_client import make_redis
    from daemon.redis_faults import UNAVAILABLE
    from daemon.settings import ConfigError, load_settings, redact_url
    from daemon.tail import tail

    try:
        settings = load_settings(args.config, os.environ)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if args.count < 0:
        return _fail(f"-n must be >= 0 (got {args.count})", EXIT_CONFIG)

    async def show() -> int:
        redis = make_redis(settings)
        try:
            await tail(redis, settings, sys.stdout, count=args.count, follow=args.follow,
                       dead=args.dead)
        except BrokenPipeError:
            raise  # an OSError too, but no Redis one: the reader left (below)
        except UNAVAILABLE as exc:
            from daemon.redis_faults import refuses_the_config

            return _fail(f"redis.url = {redact_url(settings.redis.url)!r}: {exc}",
                         EXIT_CONFIG if refuses_the_config(exc) else EXIT_FAILURE)
        finally:
            await redis.aclose()
        return 0

    try:
        return asyncio.run(show())
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # the reader left (`| head -1`): the way a follower ends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# ---- demo and bench -----------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scaleout:
        return _bench_scaleout(args)
    from daemon.bench import run_bench

    return run_bench(args)


def _bench_scaleout(args: argparse.Namespace) -> int:
    """1, 2 and 4 `livepred run` instances over shared partitions, then a kill -9 failover:
    scripts/scaleout.py of a source checkout (it starts real daemon processes)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "scaleout.py"
    if not script.is_file():
        return _fail("--scaleout needs a source checkout (scripts/scaleout.py not found)")
    command = [sys.executable, str(script)]
    if args.redis_url:
        command += ["--redis-url", args.redis_url]
    if args.json:
        command += ["--json", args.json]
    if args.quick:
        command += ["--instances", "1,2", "--bars", "20000"]
    return subprocess.call(command)


# ---- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livepred",
        description="Live model inference on OHLCV bars from Redis streams.",
    )
    parser.add_argument("--version", action="version", version=f"livepred {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", metavar="PATH", help="TOML config file (see config/)")
    run.add_argument(
        "--check", action="store_true",
        help="validate the config, load the models, look at Redis and its keys, and exit",
    )
    run.add_argument(
        "--offline", action="store_true", help="with --check: do not contact Redis"
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo", help="self-contained demo: embedded Redis, demo models, feeder, live view"
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds to run (default 20)")
    demo.add_argument("--symbols", type=int, default=40, help="number of symbols (default 40)")
    demo.add_argument("--redis-url", help="use this Redis instead of an embedded one")
    demo.add_argument("--keep-run", metavar="DIR", help="write the demo training run here")
    demo.add_argument("--no-live", action="store_true", help="no live view; summary only")
    demo.add_argument(
        "--tick-ms", type=int, default=200, help="wall time between bar bursts (default 200)"
    )
    demo.add_argument(
        "--partitions", type=int, default=1, help="streams.partitions for the demo (default 1)"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the run and the feeder")
    demo.set_defaults(func=cmd_demo)

    from daemon.replay_cmd import add_parser as add_replay_parser

    add_replay_parser(sub)

    inspect = sub.add_parser("inspect", help="describe a training run: targets, families, refusals")
    inspect.add_argument(
        "run", nargs="?", help="training run directory (default with --config: its run_root)"
    )
    inspect.add_argument(
        "--config", "-c", metavar="PATH",
        help="the daemon's TOML config: its run_root, view, targets, families and checks",
    )
    inspect.add_argument("--view", default=None, help="view (default CROSS_SECTIONAL)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--no-pickle", action="store_true", help="as models.allow_pickle=false")
    inspect.add_argument(
        "--interval-minutes", type=float, default=None,
        help="as models.interval_minutes: refuse models trained on another bar interval",
    )
    inspect.set_defaults(func=cmd_inspect)

    tail_cmd = sub.add_parser(
        "tail", help="a running daemon's newest predictions (or dead letters) as JSON lines"
    )
    tail_cmd.add_argument("--config", "-c", metavar="PATH",
                          help="the daemon's TOML config (its Redis, streams and partitions)")
    tail_cmd.add_argument("-n", dest="count", type=int, default=10,
                          help="entries shown first, newest of all partitions (default 10)")
    tail_cmd.add_argument("--follow", "-f", action="store_true",
                          help="then show new entries as they come (Ctrl-C ends)")
    tail_cmd.add_argument("--dead", action="store_true",
                          help="the dead-letter stream instead (rejected bars, with `error`)")
    tail_cmd.set_defaults(func=cmd_tail)

    bench = sub.add_parser("bench", help="benchmarks against baselines (see BENCHMARKS.md)")
    bench.add_argument("--quick", action="store_true", help="short run (CI smoke test)")
    bench.add_argument("--json", metavar="OUT", help="write results as JSON")
    bench.add_argument("--plot", metavar="OUT.png", help="write a latency plot")
    bench.add_argument("--redis-url", default=None, help="Redis to use (default: local)")
    bench.add_argument(
        "--embedded", action="store_true", help="with --quick: an embedded fakeredis (no timings)"
    )
    bench.add_argument("--markdown", metavar="OUT.md", help="write the tables as Markdown")
    bench.add_argument(
        "--scaleout",
        action="store_true",
        help="instead: throughput of 1, 2, 4 instances and failover time (source checkout)",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise on a terminal and in
    # the journal; set before any handler imports it. An explicit setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # One OpenMP thread unless told otherwise (torch also pins each thread that runs a model,
    # see handlers.torchscript); read when the OpenMP runtime loads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # MKL (torch's Linear) rounding a row the same wherever it lies in a batch: see
    # handlers.torchscript.configure_torch, which sets it too when the CLI is not used.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "config") and not args.config:
        # A container's way to name the file; `--config` wins.
        args.config = os.environ.get("LIVEPRED_CONFIG") or None
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `livepred inspect --json | head`: the reader left; no traceback for that. Python
        # flushes stdout again at exit: point it at /dev/null so that fails quietly too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
