"""The model side's exceptions: one class per kind of failure, each naming what failed."""

from __future__ import annotations

import threading


class LivepredError(Exception):
    """Base class of every error livepred raises on purpose."""


class ModelLoadError(LivepredError):
    """A model could not be loaded or was refused (integrity, pickle rules, interval)."""

    def __init__(self, family: str, target: str, reason: str) -> None:
        self.family = family
        self.target = target
        self.reason = reason
        super().__init__(f"model {target}/{family}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # pickled across processes
        return type(self), (self.family, self.target, self.reason)


class InferenceError(LivepredError):
    """A prediction failed for one family (and one symbol, for the single-row API)."""

    def __init__(self, family: str, symbol: str, reason: str) -> None:
        self.family = family
        self.symbol = symbol
        self.reason = reason
        super().__init__(f"inference {family} for {symbol}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.family, self.symbol, self.reason)


class MissingDependencyError(LivepredError):
    """An optional framework is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{package} is not installed: pip install 'livepred[{extra}]'")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.package, self.extra)


def short_error(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), or the type alone."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def model_faults() -> tuple[type[BaseException], ...]:
    """What an `except` around a model's own code contains: any Exception, and the exits a
    model's code may raise (`sys.exit()`, a stray GeneratorExit): one family fails, the
    process carries on. KeyboardInterrupt too, off the main thread, where only the model's
    code can raise it; on the main thread (replay, the Python API) it is the user's Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        return (Exception, SystemExit, GeneratorExit)
    return (Exception, SystemExit, GeneratorExit, KeyboardInterrupt)
