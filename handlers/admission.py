"""What a model file must pass before it is loaded (CONTRACT section 2): the bar interval it was
trained on, a pickle's leave to run code, its sha256 against the run's records. Each check
returns the refusal's reason, or None."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path

from handlers.artifact_hash import artifact_sha256

_SHOWN_HEX = 12  # sha256 prefix length in messages


def interval_refusal(trained_minutes: float | None, configured_minutes: float) -> str | None:
    """A model trained on other bars than `models.interval_minutes` (0: not checked)."""
    if not configured_minutes or trained_minutes is None:
        return None
    if abs(trained_minutes - configured_minutes) <= 1e-9:
        return None
    return (
        f"trained on {trained_minutes:g}-minute bars (model_meta.json interval_minutes) but"
        f" models.interval_minutes = {configured_minutes:g}"
    )


def pickle_refusal(path: Path, shown: str, *, allow_pickle: bool) -> str | None:
    """Pickles run code when loaded: only with `models.allow_pickle`, and only a file that no
    group or other user can write (`shown`: the path as messages name it)."""
    if not allow_pickle:
        return (
            f"{shown} is a pickle, which runs code when loaded, and"
            " models.allow_pickle is false (set it to true to load pickles)"
        )
    mode = path.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"pickle {path} is writable by group or others (mode {stat.S_IMODE(mode):o});"
            f" pickles run code when loaded: chmod go-w {path}"
        )
    return None


def checksum_refusal(
    run_root: Path,
    family_rel: str,
    artifacts: Mapping[str, str],
    model_path: Path,
    model_rel: str,
    model_checksum: str | None,
) -> str | None:
    """Every manifest artifact inside the family directory `family_rel` (relative to
    `run_root`, as the manifest's keys are), then the model file's `model_checksum`
    (`model_rel`: its path as messages name it)."""
    prefix = family_rel.rstrip("/") + "/"
    for key, expected in sorted(artifacts.items()):
        if not key.startswith(prefix):
            continue
        path = run_root / key
        if not path.exists():
            return f"manifest.json lists {key}, which is missing"
        actual = artifact_sha256(path)
        if actual != expected:
            return mismatch(key, "manifest.json artifacts", expected, actual)
    if model_checksum is not None:
        actual = artifact_sha256(model_path)
        if actual != model_checksum:
            return mismatch(model_rel, "model_meta.json model_checksum", model_checksum, actual)
    return None


def mismatch(rel_path: str, source: str, expected: str, actual: str) -> str:
    """The message for a file whose sha256 is not the one `source` records."""
    return (
        f"sha256 mismatch for {rel_path}: {source} says {expected[:_SHOWN_HEX]}..., the file is"
        f" {actual[:_SHOWN_HEX]}...; the file changed after training: restore it, or fix {source}"
    )
