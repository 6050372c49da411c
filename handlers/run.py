"""The training-run directory (CONTRACT section 2): manifest, meta, routing, and `ModelLoader`,
which turns a family directory into a loaded handler or a refusal (the checks: `admission`)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from handlers.admission import checksum_refusal, interval_refusal, pickle_refusal
from handlers.base import ModelHandler
from handlers.errors import LivepredError, ModelLoadError, model_faults
from handlers.meta import MetaError, ModelMeta
from handlers.registry import MODEL_FILE_NAMES, detect_model_file, handler_class
from handlers.run_manifest import RunLayoutError, normalise_key, read_json, read_manifest

log = logging.getLogger(__name__)

DEFAULT_VIEW = "CROSS_SECTIONAL"


# --- descriptions (for `livepred inspect`) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class FamilyDescription:
    """What `inspect` shows for one family. `refusal` is why it is not loaded, if it is not."""

    family: str
    format_name: str | None = None
    model_file: str | None = None  # relative to run_root
    handler: str | None = None
    features: tuple[str, ...] = ()
    sequence_length: int | None = None  # None: not sequential
    input_mode: str = "features"
    task: str = "regression"
    interval_minutes: float | None = None
    accepts_nan: bool | None = None  # True: predicts on every bar; False: needs finite inputs
    metrics: dict[str, Any] = field(default_factory=dict)
    loaded: bool = False
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class TargetDescription:
    target: str
    view: str
    selected_family: str | None
    routing_error: str | None
    families: tuple[FamilyDescription, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the loader ----------------------------------------------------------------------------


class ModelLoader:
    """Reads one training run; loads each family's model once and caches it (or its refusal).

    A refusal is a ModelLoadError whose reason says what to do about it. Refusing one family
    never affects another.
    """

    def __init__(
        self,
        run_root: str | os.PathLike[str],
        *,
        allow_pickle: bool = True,
        interval_minutes: float = 0.0,
        device: str = "cpu",
    ) -> None:
        given = Path(run_root).expanduser()
        if not given.is_dir():
            raise FileNotFoundError(
                f"run directory {given} does not exist or is not a directory (models.run_root)"
            )
        if isinstance(interval_minutes, bool) or not interval_minutes >= 0:
            raise ValueError(f"models.interval_minutes must be >= 0, got {interval_minutes!r}")
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"models.device must be 'cpu' or 'cuda', got {device!r}")
        # Resolved once: a `runs/current` symlink switched later does not mix two runs.
        self.run_root = given.resolve()
        self.allow_pickle = allow_pickle
        self.interval_minutes = float(interval_minutes)
        self.device = device
        self._manifest = read_manifest(self.run_root / "manifest.json")
        self._artifacts: dict[str, str] = {
            normalise_key(key): value.lower()
            for key, value in self._manifest.get("artifacts", {}).items()
        }
        self._lock = threading.RLock()
        self._models: dict[tuple[str, str, str], tuple[ModelHandler, ModelMeta]] = {}
        self._refusals: dict[tuple[str, str, str], str] = {}
        self._metas: dict[tuple[str, str, str], ModelMeta] = {}

    # -- run-level facts

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def run_id(self) -> str:
        run_id = self._manifest.get("run_id")
        return run_id if isinstance(run_id, str) and run_id else self.run_root.name

    def missing_artifacts(self) -> list[str]:
        """The files manifest.json lists (`artifacts`) that are not in the run: a run still
        being copied, or a broken one."""
        return sorted(key for key in self._artifacts if not (self.run_root / key).exists())

    def view_dir(self, target: str, view: str = DEFAULT_VIEW) -> Path:
        return self.run_root / "targets" / _name(target) / "models" / f"view={_name(view)}"

    def family_dir(self, target: str, family: str, view: str = DEFAULT_VIEW) -> Path:
        return self.view_dir(target, view) / f"family={_name(family)}"

    def list_available_targets(self) -> list[str]:
        return _child_dirs(self.run_root / "targets")

    def list_available_families(self, target: str, view: str = DEFAULT_VIEW) -> list[str]:
        names = _child_dirs(self.view_dir(target, view))
        return sorted(name[len("family=") :] for name in names if name.startswith("family="))

    def get_routing_decision(self, target: str, view: str = DEFAULT_VIEW) -> str | None:
        """routing_decision.json `selected_family`; None when the file is absent."""
        path = self.view_dir(target, view) / "routing_decision.json"
        if not path.is_file():
            return None
        data = read_json(path)
        selected = data.get("selected_family")
        if selected is not None and not isinstance(selected, str):
            raise RunLayoutError(f"{path}: selected_family must be a string or null")
        return selected

    # -- per family

    def load_meta(self, target: str, family: str, view: str = DEFAULT_VIEW) -> ModelMeta:
        key = (view, target, family)
        with self._lock:
            if key in self._metas:
                return self._metas[key]
            family_dir = self._existing_family_dir(target, family, view)
            try:
                meta = ModelMeta.from_file(family_dir / "model_meta.json", family)
            except MetaError as exc:
                raise ModelLoadError(family, target, f"model_meta.json: {exc}") from None
            self._metas[key] = meta
            return meta

    def get_feature_list(self, target: str, family: str, view: str = DEFAULT_VIEW) -> list[str]:
        return list(self.load_meta(target, family, view).feature_list)

    def get_model_metrics(
        self, target: str, family: str, view: str = DEFAULT_VIEW
    ) -> dict[str, Any]:
        return dict(self.load_meta(target, family, view).metrics)

    def load_model(
        self, target: str, family: str, view: str = DEFAULT_VIEW
    ) -> tuple[ModelHandler, ModelMeta]:
        """The family's handler and meta, loaded once; the same objects on every later call."""
        key = (view, target, family)
        with self._lock:
            if key in self._models:
                return self._models[key]
            if key in self._refusals:
                raise ModelLoadError(family, target, self._refusals[key])
            try:
                loaded = self._load(target, family, view)
            except ModelLoadError as exc:
                self._refusals[key] = exc.reason
                # Raised to the caller (the engine logs it once, with the reason).
                log.debug("refused %s/%s (%s): %s", target, family, view, exc.reason)
                raise
            self._models[key] = loaded
            return loaded

    def describe(self, view: str = DEFAULT_VIEW, *, load: bool = True) -> list[TargetDescription]:
        """Every target and family of the run: format, inputs, metrics, and any refusal."""
        described = []
        for target in self.list_available_targets():
            try:
                selected, routing_error = self.get_routing_decision(target, view), None
            except RunLayoutError as exc:
                selected, routing_error = None, str(exc)
            families = tuple(
                self._describe_family(target, family, view, load)
                for family in self.list_available_families(target, view)
            )
            described.append(TargetDescription(target, view, selected, routing_error, families))
        return described

    def close(self) -> None:
        """Close every loaded handler and forget all cached models, metas and refusals."""
        with self._lock:
            for handler, _ in self._models.values():
                try:
                    handler.close()
                except Exception:  # closing is best effort; one bad close must not stop others
                    log.exception("closing a model handler failed")
            self._models.clear()
            self._refusals.clear()
            self._metas.clear()

    def __enter__(self) -> ModelLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals

    def _existing_family_dir(self, target: str, family: str, view: str) -> Path:
        try:
            family_dir = self.family_dir(target, family, view)
        except ValueError as exc:
            raise ModelLoadError(family, target, str(exc)) from None
        if not family_dir.is_dir():
            available = ", ".join(self.list_available_families(target, view)) or "none"
            raise ModelLoadError(
                family, target, f"no directory {self._rel(family_dir)} (families: {available})"
            )
        return family_dir

    def _load(self, target: str, family: str, view: str) -> tuple[ModelHandler, ModelMeta]:
        meta = self.load_meta(target, family, view)
        family_dir = self._existing_family_dir(target, family, view)
        found = detect_model_file(family_dir)
        if found is None:
            raise ModelLoadError(
                family,
                target,
                f"no model file in {self._rel(family_dir)}: expected one of {', '.join(MODEL_FILE_NAMES)}",
            )
        format_name, model_path = found
        refusal = interval_refusal(meta.interval_minutes, self.interval_minutes)
        if refusal is None and format_name == "pickle":
            shown = self._rel(model_path)
            refusal = pickle_refusal(model_path, shown, allow_pickle=self.allow_pickle)
        if refusal is None:
            refusal = checksum_refusal(
                self.run_root,
                self._rel(family_dir),
                self._artifacts,
                model_path,
                self._rel(model_path),
                meta.model_checksum,
            )
        if refusal is not None:
            raise ModelLoadError(family, target, refusal)
        try:
            cls = handler_class(format_name)
        except LivepredError as exc:  # MissingDependencyError names the pip extra
            raise ModelLoadError(family, target, str(exc)) from None
        # Said before: a load that hangs (a pickle's own code) is named by the last line.
        log.info("loading %s (%s)", self._rel(model_path), format_name)
        try:
            handler = cls.load(model_path, meta, device=self.device)  # type: ignore[attr-defined]
        except LivepredError as exc:
            raise ModelLoadError(family, target, str(exc)) from None
        except model_faults() as exc:  # a framework's error for a corrupt or foreign file,
            # or the unpickled code's own (even a sys.exit in __setstate__)
            raise ModelLoadError(
                family,
                target,
                f"could not load {self._rel(model_path)} as {format_name}: {_one_line(exc)}",
            ) from exc
        return handler, meta

    def _describe_family(
        self, target: str, family: str, view: str, load: bool
    ) -> FamilyDescription:
        try:
            meta = self.load_meta(target, family, view)
        except ModelLoadError as exc:
            return FamilyDescription(family, refusal=exc.reason)
        found = detect_model_file(self.family_dir(target, family, view))
        handler = None
        refusal = None
        if load:
            try:
                handler, _ = self.load_model(target, family, view)
            except ModelLoadError as exc:
                refusal = exc.reason
        elif found is None:
            refusal = "no model file"
        return FamilyDescription(
            family=family,
            format_name=found[0] if found else None,
            model_file=self._rel(found[1]) if found else None,
            handler=type(handler).__name__ if handler is not None else None,
            features=meta.feature_list,
            sequence_length=meta.window if meta.sequential else None,
            input_mode=meta.input_mode,
            task=meta.task,
            interval_minutes=meta.interval_minutes,
            accepts_nan=handler.accepts_nan if handler is not None else None,
            metrics=dict(meta.metrics),
            loaded=handler is not None,
            refusal=refusal,
        )

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.run_root).as_posix()
        except ValueError:
            return str(path)


def load_model_from_run(
    run_root: str | os.PathLike[str],
    target: str,
    family: str,
    view: str = DEFAULT_VIEW,
    **loader_options: Any,
) -> tuple[ModelHandler, ModelMeta]:
    """One-shot: a fresh ModelLoader's `load_model` (options as ModelLoader's keywords)."""
    return ModelLoader(run_root, **loader_options).load_model(target, family, view)


# --- helpers -------------------------------------------------------------------------------


def _name(value: str) -> str:
    """A target, view or family name, which must stay one path component."""
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or any(c in value for c in "/\\\0")
    ):
        raise ValueError(f"invalid name {value!r}: must be one non-empty path component")
    return value


def _child_dirs(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    try:
        return sorted(
            p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    except OSError as exc:  # not readable by this user: said in one line, with the path
        raise OSError(f"{directory}: cannot list it: {exc.strerror or exc}") from None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 300 else text[:297] + "..."
