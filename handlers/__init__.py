"""Model side: the training-run loader, one handler per model format, features, the engine.

Importing this package imports no framework: handlers load TensorFlow/torch lazily. Its
names (CONTRACT section 8) are loaded on first use, so a module that needs only
`handlers.errors` (the daemon's config, `livepred tail`) does not load numpy and pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handlers.engine import InferenceEngine, predict
    from handlers.errors import InferenceError, MissingDependencyError, ModelLoadError
    from handlers.features import FeatureBuilder, build_features_from_prices
    from handlers.run import ModelLoader, load_model_from_run

_WHERE = {
    "FeatureBuilder": "handlers.features",
    "InferenceEngine": "handlers.engine",
    "InferenceError": "handlers.errors",
    "MissingDependencyError": "handlers.errors",
    "ModelLoadError": "handlers.errors",
    "ModelLoader": "handlers.run",
    "build_features_from_prices": "handlers.features",
    "load_model_from_run": "handlers.run",
    "predict": "handlers.engine",
}

__all__ = [
    "FeatureBuilder",
    "InferenceEngine",
    "InferenceError",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelLoader",
    "build_features_from_prices",
    "load_model_from_run",
    "predict",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:  # a submodule (`handlers.engine`), as when the package loaded them all
        try:
            return importlib.import_module(f"handlers.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"handlers.{name}":
                raise
            raise AttributeError(f"module 'handlers' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
