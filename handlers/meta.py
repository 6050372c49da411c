"""`model_meta.json`: parsed, validated and frozen (CONTRACT section 2)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEQUENTIAL_FAMILY_NAMES = frozenset(
    {"CNN1D", "LSTM", "Transformer", "TabCNN", "TabLSTM", "TabTransformer"}
)
DEFAULT_CHANNELS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
DEFAULT_SEQUENCE_LENGTH = 20  # for a family sequential by name without `sequence_length`


class MetaError(ValueError):
    """model_meta.json is missing, unreadable or has a bad value (message names the key)."""


@dataclass(frozen=True, slots=True)
class ModelMeta(Mapping[str, Any]):
    """The parsed meta. Also a read-only mapping over the raw JSON, as the seed API returned a dict."""

    feature_list: tuple[str, ...]
    task: str = "regression"
    sequence_length: int | None = None
    model_checksum: str | None = None
    interval_minutes: float | None = None
    input_mode: str = "features"
    sequence_channels: tuple[str, ...] = DEFAULT_CHANNELS
    sequence_normalization: str = "none"
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    sequential: bool = False

    # Mapping view over the raw JSON (seed compatibility: meta["feature_list"]).
    def __getitem__(self, key: str) -> Any:
        if key == "feature_list":
            return list(self.feature_list)
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        keys = dict.fromkeys(["feature_list", *self.raw])
        return iter(keys)

    def __len__(self) -> int:
        return len(set(self.raw) | {"feature_list"})

    @property
    def binary(self) -> bool:
        return self.task == "binary"

    @property
    def raw_sequence(self) -> bool:
        return self.input_mode == "raw_sequence"

    @property
    def window(self) -> int:
        """Rows of history the model reads: T for a sequential model, else 1."""
        return self.sequence_length or 1 if self.sequential else 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], family: str = "") -> ModelMeta:
        if not isinstance(data, Mapping):
            raise MetaError("model_meta.json must hold a JSON object")
        raw = dict(data)
        features = raw.get("feature_list", raw.get("features"))
        input_mode = raw.get("input_mode", "features")
        if input_mode not in ("features", "raw_sequence"):
            raise MetaError(f"input_mode must be 'features' or 'raw_sequence', got {input_mode!r}")
        if features is None:
            if input_mode != "raw_sequence":
                raise MetaError("feature_list (or features) is required")
            features = []
        if not isinstance(features, list | tuple) or not all(
            isinstance(f, str) and f for f in features
        ):
            raise MetaError("feature_list must be a list of non-empty strings")
        if len(set(features)) != len(features):
            raise MetaError("feature_list has duplicate names")
        task = raw.get("task", "regression")
        if task not in ("regression", "binary"):
            raise MetaError(f"task must be 'regression' or 'binary', got {task!r}")
        seq_len = raw.get("sequence_length")
        if seq_len is not None and (
            isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1
        ):
            raise MetaError(f"sequence_length must be a positive integer, got {seq_len!r}")
        checksum = raw.get("model_checksum")
        if checksum is not None and not _is_sha256(checksum):
            raise MetaError("model_checksum must be a sha256 hex digest")
        interval = raw.get("interval_minutes")
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0
        ):
            raise MetaError(f"interval_minutes must be a positive number, got {interval!r}")
        channels = raw.get("sequence_channels", list(DEFAULT_CHANNELS))
        if not isinstance(channels, list | tuple) or not channels or not all(
            c in DEFAULT_CHANNELS for c in channels
        ):
            raise MetaError(f"sequence_channels must be a non-empty subset of {list(DEFAULT_CHANNELS)}")
        norm = raw.get("sequence_normalization", "none")
        if norm not in ("none", "zscore"):
            raise MetaError(f"sequence_normalization must be 'none' or 'zscore', got {norm!r}")
        metrics = raw.get("metrics") or {}
        if not isinstance(metrics, Mapping):
            raise MetaError("metrics must be an object")
        sequential = (
            seq_len is not None or family in SEQUENTIAL_FAMILY_NAMES or input_mode == "raw_sequence"
        )
        if sequential and seq_len is None:
            seq_len = DEFAULT_SEQUENCE_LENGTH
        if input_mode == "features" and not features:
            raise MetaError("feature_list is empty")
        return cls(
            feature_list=tuple(features),
            task=task,
            sequence_length=seq_len,
            model_checksum=checksum.lower() if checksum else None,
            interval_minutes=float(interval) if interval is not None else None,
            input_mode=input_mode,
            sequence_channels=tuple(channels),
            sequence_normalization=norm,
            metrics=dict(metrics),
            raw=raw,
            sequential=sequential,
        )

    @classmethod
    def from_file(cls, path: Path, family: str = "") -> ModelMeta:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MetaError(f"{path} is missing") from None
        except (OSError, ValueError) as exc:
            raise MetaError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, family)


def _is_sha256(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(ch in "0123456789abcdefABCDEF" for ch in value)
    )
