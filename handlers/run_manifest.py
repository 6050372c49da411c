"""The run's own JSON files (CONTRACT section 2): `manifest.json` (run id, artifact sha256s)
and the other JSON documents of a run, read and shape-checked; `RunLayoutError` if malformed."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from handlers.errors import LivepredError


class RunLayoutError(LivepredError, ValueError):
    """A run-level file (manifest.json, routing_decision.json) is malformed."""


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = read_json(path)
    run_id = data.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise RunLayoutError(f"{path}: run_id must be a string")
    artifacts = data.get("artifacts", {})
    if not isinstance(artifacts, dict) or not all(
        isinstance(k, str) and _is_sha256(v) for k, v in artifacts.items()
    ):
        raise RunLayoutError(
            f"{path}: artifacts must map paths relative to the run to sha256 hex digests"
        )
    return data


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunLayoutError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RunLayoutError(f"{path} must hold a JSON object")
    return data


def normalise_key(key: str) -> str:
    return PurePosixPath(key.replace("\\", "/")).as_posix().removeprefix("./")


def _is_sha256(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in "0123456789abcdefABCDEF" for c in value)
    )
