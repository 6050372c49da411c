"""`livepred replay` on the command line: its options (or the daemon's config), the output
file (written whole or not at all), and the summary that says what replay saw."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from daemon.cli_common import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    ModelChoice,
    UsageError,
    model_choice,
    settings_of,
)
from daemon.cli_common import fail as _fail
from daemon.cli_common import print_refusals as _print_refusals

if TYPE_CHECKING:  # pandas comes with it: loaded when a replay runs, not for `--help`
    from daemon.replay import ReplayCounts

DEFAULT_TTL_S = 900.0
EXIT_TERMINATED = 128 + signal.SIGTERM
_MAX_LINKS = 40  # as the kernel's ELOOP limit
_CREATE_TRIES = 16
# Epoch milliseconds of bars from 1973 to 5138: outside, the unit is probably not ms.
PLAUSIBLE_MS = (1e11, 1e14)


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    models: ModelChoice
    run: str
    ttl_s: float


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    replay = sub.add_parser(
        "replay", help="offline: bars file through the same engine, no Redis",
        description="Bars from a file through the daemon's state and engine, no Redis: one "
        "JSON line per accepted bar. Options default to the daemon's config (--config), "
        "else to the daemon's defaults; an option given here wins.",
    )
    replay.add_argument("--run", help="training run directory (default with --config: its "
                        "models.run_root)")
    replay.add_argument("--bars", required=True,
                        help="bars file: .csv (.csv.gz, ...) or .parquet, rows in arrival order")
    replay.add_argument("--out", required=True,
                        help="output JSON Lines file, written whole or not at all (a file in a "
                        "folder this user can write); - = stdout")
    replay.add_argument("--config", "-c", metavar="PATH",
                        help="the daemon's TOML config: models.* and state.symbol_ttl_s")
    replay.add_argument("--with-features", action="store_true",
                        help="add each bar's features (NaN as null)")
    replay.add_argument("--view", help="models.view (default CROSS_SECTIONAL)")
    replay.add_argument("--ttl-s", type=float,
                        help=f"state.symbol_ttl_s, seconds >= 1 (default {DEFAULT_TTL_S:g})")
    replay.add_argument("--no-pickle", action="store_true", help="refuse pickled models")
    replay.add_argument(
        "--interval-minutes", type=float,
        help="models.interval_minutes: refuse models trained on another bar interval",
    )
    replay.set_defaults(func=cmd_replay)


def options_from(args: argparse.Namespace) -> ReplayOptions:
    """The daemon's settings (its config and LIVEPRED_* environment) under the options."""
    settings = settings_of(args)
    models = model_choice(args, settings)
    if models.run is None:
        raise UsageError("replay needs --run RUN, or --config PATH (its models.run_root)")
    ttl_s = args.ttl_s if args.ttl_s is not None else (
        float(settings.state.symbol_ttl_s) if settings is not None else DEFAULT_TTL_S)
    if not (math.isfinite(ttl_s) and ttl_s >= 1):
        raise UsageError(f"--ttl-s must be a number of seconds >= 1 (got {ttl_s:g})")
    return ReplayOptions(models=models, run=models.run, ttl_s=ttl_s)


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon.bars_file import BarsFileError, open_bars
    from daemon.model_setup import run_id_of
    from daemon.replay import ReplayCounts, replay
    from handlers.errors import LivepredError

    try:
        options = options_from(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    bars_path = Path(args.bars)
    if args.out != "-" and _same_file(bars_path, Path(args.out)):
        return _fail(f"--out {args.out} is the bars file itself: choose another output file",
                     EXIT_CONFIG)
    try:
        bars = open_bars(bars_path)
        engine = _load_engine(options)
    except (BarsFileError, LivepredError, OSError) as exc:  # OSError: a run not readable
        return _fail(str(exc))
    if not any(True for _ in engine.families()):
        from daemon.model_setup import why_nothing_loaded

        return _fail(f"--run {options.run}: no model could be loaded"
                     f" ({why_nothing_loaded(engine)}): nothing to replay", EXIT_CONFIG)
    _print_refusals(engine)
    show = sys.stderr.isatty()
    total = f"/{bars.total_rows}" if bars.total_rows is not None else ""

    def progress(rows: int) -> None:
        if show:
            print(f"\r{rows}{total} rows", end="", file=sys.stderr, flush=True)

    seen = ReplayCounts()
    output = Output(args.out)
    try:
        with _sigterm_unwinds(), output.open() as out:
            seen = replay(engine, bars, out, source=bars_path.name, ttl_s=options.ttl_s,
                          with_features=args.with_features, run_id=run_id_of(engine),
                          progress=progress)
    except KeyboardInterrupt:
        if show:
            print(file=sys.stderr)
        return _fail(f"interrupted: --out {args.out} {output.unfinished()}", EXIT_INTERRUPTED)
    except _Terminated:
        if show:
            print(file=sys.stderr)
        return _fail(f"terminated: --out {args.out} {output.unfinished()}", EXIT_TERMINATED)
    except BarsFileError as exc:
        return _fail(f"{exc} (--out {args.out} {output.unfinished()})")
    except OSError as exc:
        return _fail(f"--out {args.out}: cannot write: {exc.strerror or exc}"
                     f" ({output.unfinished()})")
    if show:
        print(file=sys.stderr)
    _summarise(seen, bars_path.name, args.out, options.ttl_s)
    if seen.rows and not seen.predictions and not seen.duplicates:
        return _fail(f"no row of {bars_path} was accepted (reasons above)")
    return 0


def _load_engine(options: ReplayOptions):  # type: ignore[no-untyped-def]
    from handlers import tree_compiler
    from handlers.engine import InferenceEngine
    from handlers.run import ModelLoader

    m = options.models
    tree_compiler.enabled = m.compile_trees
    loader = ModelLoader(options.run, allow_pickle=m.allow_pickle,
                         interval_minutes=m.interval_minutes, device=m.device)
    engine = InferenceEngine(loader, device=m.device, view=m.view,
                             targets=list(m.targets), families=list(m.families))
    # Each refusal is said once, by print_refusals: not also as the engine's log line.
    engine_log = logging.getLogger("handlers.engine")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)
    try:
        return engine.load_all()
    finally:
        engine_log.setLevel(level)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _keep_owner_and_mode(original: Path, replacement: int) -> None:
    st = original.stat()
    os.fchmod(replacement, stat.S_IMODE(st.st_mode))
    if st.st_uid != os.geteuid() or st.st_gid != os.getegid():
        try:  # root replacing another user's file: theirs still
            os.fchown(replacement, st.st_uid, st.st_gid)
        except PermissionError:
            pass


def _follow(path: Path) -> tuple[Path, bool]:
    """The file `path` names, its links followed one at a time, and whether one of them leads
    into /proc: a process's open file (/dev/stdout, /dev/fd/N), written through, never
    replaced. A loop of links is left at a link (the open then says so)."""
    current = Path(os.path.abspath(path))
    for _ in range(_MAX_LINKS):
        if current.name in ("", ".", ".."):
            current = Path(os.path.realpath(current))
        else:  # the folder's own links resolved, the file's not yet
            current = Path(os.path.realpath(current.parent)) / current.name
        if current.parts[1:2] == ("proc",):
            return current, True
        if not current.is_symlink():
            return current, False
        current = current.parent / os.readlink(current)
    return current, False


def _own_fd(path: Path) -> int | None:
    """N for /proc/<this process>/fd/N: one of this process's open files, as /dev/stdout is."""
    match = re.fullmatch(r"/proc/(\d+)/fd/(\d+)", str(path))
    return int(match[2]) if match and int(match[1]) == os.getpid() else None


def _create_beside(target: Path) -> tuple[int, Path]:
    """A new file of this process's own beside `target`: never a file or link someone else put
    there (O_EXCL), with the mode a new file gets (0o666 less the umask)."""
    # A short name (the output's may be near the 255-byte limit), unguessable.
    tag = hashlib.sha256(target.name.encode()).hexdigest()[:12]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_CREATE_TRIES):
        partial = target.with_name(
            f".livepred-{tag}-{os.getpid()}-{secrets.token_hex(4)}.partial")
        try:
            return os.open(partial, flags, 0o666), partial
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no new partial file could be made beside it")


class Output:
    """Where replay writes. A file is written beside itself and renamed into place once
    complete, so an interrupted or failed replay leaves the previous one as it was; stdout
    (`-`, /dev/stdout, /dev/fd/N), a device or pipe, or a file in a folder this user may not
    create files in is written as it goes (`in_place`)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.in_place = False  # being written as it goes

    @contextlib.contextmanager
    def open(self) -> Iterator[TextIO]:
        if self.out == "-":
            self.in_place = True
            yield sys.stdout
            sys.stdout.flush()
            return
        path = Path(self.out)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        target, open_file = _follow(path)
        if (fd := _own_fd(target)) is not None:
            # this process's stdout (or another open file): written where it stands, an
            # appended log (`>> app.log`) appended to
            sys.stdout.flush()
            with os.fdopen(os.dup(fd), "w") as fh:
                self.in_place = True
                yield fh
            return
        if open_file or target.is_symlink() or target.exists() and not target.is_file():
            # another process's open file, a loop of links (the open says so), a device, a
            # pipe: written through, never truncated nor replaced
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC), "w") as fh:
                self.in_place = True
                yield fh
            return
        try:
            fd, partial = _create_beside(target)
        except PermissionError:  # a folder this user cannot create files in: in place
            with path.open("w") as fh:
                self.in_place = True
                yield fh
            return
        try:
            with os.fdopen(fd, "w") as fh:
                if target.exists():
                    _keep_owner_and_mode(target, fd)
                yield fh
                fh.flush()
                _check_still_ours(partial, fd)
                os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def unfinished(self) -> str:
        return "holds part of the output" if self.in_place else "not written"


def _check_still_ours(partial: Path, fd: int) -> None:
    """The partial file's name still names the file written: in a folder others can write,
    it could have been swapped for a link to some other file."""
    named, written = os.lstat(partial), os.fstat(fd)
    if (named.st_dev, named.st_ino) != (written.st_dev, written.st_ino):
        raise OSError(errno.EEXIST, f"{partial.name} was replaced by someone else")


class _Terminated(BaseException):
    """SIGTERM while replay writes: unwinds as Ctrl-C does, so the partial file is removed."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _summarise(seen: ReplayCounts, source: str, out: str, ttl_s: float) -> None:
    def say(line: str) -> None:
        print(line, file=sys.stderr)

    rejected = sum(seen.rejected.values())
    say(f"{seen.predictions} predictions from {seen.rows} rows ({rejected} rejected, "
        f"{seen.duplicates} duplicates) -> {out}")
    for reason, n in seen.rejected.most_common():
        say(f"  rejected {reason}: {n} row(s), the first {source}/{seen.first_rejected[reason]}")
    if seen.resets or seen.evicted:
        say(f"  state: {seen.resets} reset(s) of a symbol after a gap over the TTL "
            f"({ttl_s:g} s), {seen.evicted} symbol(s) evicted as stale")
    if seen.behind:
        say(f"warning: {seen.behind} row(s) came more than the TTL ({ttl_s:g} s) behind the "
            f"newest bar before them, the first {source}/{seen.first_behind}: replay takes rows "
            "in arrival order, as the daemon does, and drops the state of symbols that far "
            "behind; is the file sorted by symbol rather than by time, or is one symbol's "
            "clock ahead of the others?")
    newest = seen.newest_ts
    if newest is not None and not PLAUSIBLE_MS[0] <= newest <= PLAUSIBLE_MS[1]:
        unit = "seconds" if newest < PLAUSIBLE_MS[0] else "microseconds or nanoseconds"
        say(f"warning: the newest ts is {newest}: epoch {unit}? ts must be epoch milliseconds "
            "(the TTL and the features' bar gaps are counted in them)")
