"""What the command-line commands share: exit codes, their one-line messages, and which
models a command loads (its options over the daemon's config)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

EXIT_CONFIG = 2  # a configuration error: systemd does not restart (RestartPreventExitStatus)
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"livepred: error: {message}", file=sys.stderr)
    return code


def print_refusals(engine: Any) -> None:
    """Each model refused at load, and each target whose selected family is not loaded."""
    from daemon.model_setup import unserved_selections

    for (target, family), reason in sorted(engine.load_errors.items()):
        print(f"refused {target}/{family}: {reason}", file=sys.stderr)
    for target, family in sorted(unserved_selections(engine).items()):
        print(f"warning: {target}: its selected family {family} (routing_decision.json) is not"
              " loaded: every output's `pred` will be null", file=sys.stderr)


class UsageError(ValueError):
    """A bad option or config: one line, exit 2."""


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """What `inspect` and `replay` load: their options, else the daemon's `models.*`."""

    run: str | None
    view: str
    targets: tuple[str, ...]
    families: tuple[str, ...]
    allow_pickle: bool
    interval_minutes: float
    compile_trees: bool
    device: str


def settings_of(args: argparse.Namespace) -> Any:
    """The daemon's settings (--config and the LIVEPRED_* environment), or None without
    --config."""
    from daemon.settings import ConfigError, load_settings

    if not getattr(args, "config", None):
        return None
    try:
        return load_settings(args.config, os.environ)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def model_choice(args: argparse.Namespace, settings: Any) -> ModelChoice:
    """`args.run`, `--view`, `--no-pickle` and `--interval-minutes` over `settings.models`
    (the defaults without a config)."""
    m = settings.models if settings is not None else None
    interval = args.interval_minutes if args.interval_minutes is not None else (
        float(m.interval_minutes) if m is not None else 0.0)
    if not (math.isfinite(interval) and interval >= 0):
        raise UsageError(f"--interval-minutes must be >= 0 (got {interval:g})")
    return ModelChoice(
        run=args.run or (str(m.run_root) if m is not None else None),
        view=args.view or (m.view if m is not None else "CROSS_SECTIONAL"),
        targets=tuple(m.targets) if m is not None else (),
        families=tuple(m.families) if m is not None else (),
        allow_pickle=not args.no_pickle and (m.allow_pickle if m is not None else True),
        interval_minutes=interval,
        compile_trees=m.compile_trees if m is not None else True,
        device=m.device if m is not None else "cpu",
    )
