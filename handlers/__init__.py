"""Model side: the training-run loader, one handler per model format, features, the engine.

Importing this package imports no framework: handlers load TensorFlow/torch lazily.
"""

from __future__ import annotations

from handlers.engine import InferenceEngine, predict
from handlers.errors import InferenceError, MissingDependencyError, ModelLoadError
from handlers.features import FeatureBuilder, build_features_from_prices
from handlers.run import ModelLoader, load_model_from_run

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
