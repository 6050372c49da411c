"""`InferenceEngine`: every loaded family of every target, predicted a whole batch at a time."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.batch_io import NON_FINITE_OUTPUT, BatchInputs, BatchResult, InputSpec, TargetBatch
from handlers.errors import InferenceError, ModelLoadError, model_faults, short_error
from handlers.features import parse_feature, warmup_bars
from handlers.meta import ModelMeta
from handlers.registry import padded_chunks
from handlers.sequences import FEATURES, RAW, SequenceSpec, to_float32, zscore

log = logging.getLogger(__name__)

DEFAULT_VIEW = "CROSS_SECTIONAL"
# Every model call gets a multiple of this many rows (the last row repeated, its extra outputs
# dropped). oneDNN and Eigen compute a batch's leftover rows (and a single row) with other
# kernels, whose sums round differently, and torch's element-wise ops (a sigmoid) take 32
# floats at a time with AVX-512: a bar's prediction would otherwise depend on how many bars
# shared its batch, and a restart, which batches differently, would not reproduce it. A model
# with a static batch size (`static_batch`) gets chunks of that size from its handler instead.
BATCH_QUANTUM = 32


@dataclass(frozen=True, slots=True)
class LoadedFamily:
    target: str
    family: str
    model: Any  # a handlers.base.ModelHandler
    meta: ModelMeta
    sequence: SequenceSpec | None
    needs_finite: bool
    unknown_features: tuple[str, ...]
    bars_to_ready: int  # bars in a fresh state before every input can be finite

    @property
    def format_name(self) -> str:
        return str(getattr(self.model, "format_name", type(self.model).__name__))

    @property
    def device(self) -> str | None:
        """The device a torch model runs on (None: a handler that does not say)."""
        value = getattr(self.model, "device", None)
        return value if isinstance(value, str) else None

    @property
    def compiled(self) -> bool | None:
        """Whether a tree model predicts through its native-code build (None: not a tree)."""
        value = getattr(self.model, "compiled", None)
        return value if isinstance(value, bool) else None


def bars_to_ready(meta: ModelMeta, sequence: SequenceSpec | None) -> int:
    if sequence is not None and sequence.kind != FEATURES:
        return sequence.length
    known = [warmup_bars(f) for f in meta.feature_list if parse_feature(f) is not None]
    rows = sequence.length if sequence is not None else 1
    return max(known, default=1) + rows - 1


class InferenceEngine:
    """Loads families from a loader and predicts batches; failures stay per family.

    Works with any loader that has `load_model(target, family, view=...)` and
    `list_available_families(target, view=...)`.
    """

    def __init__(
        self,
        loader: Any,
        device: str = "cpu",
        *,
        view: str = DEFAULT_VIEW,
        targets: Sequence[str] = (),
        families: Sequence[str] = (),
    ) -> None:
        self.loader = loader
        self.device = device
        self.view = view
        self.target_filter = tuple(targets)
        self.family_filter = tuple(families)
        self.models: dict[str, dict[str, LoadedFamily]] = {}
        self.selected: dict[str, str | None] = {}
        self.load_errors: dict[tuple[str, str], str] = {}
        self._spec: InputSpec | None = None
        self._columns: dict[tuple[str, str], np.ndarray] = {}
        # Seed single-row API: per (symbol, target, family) history of feature rows.
        self._rows: dict[tuple[str, str, str], deque[np.ndarray]] = {}

    # ---- loading -------------------------------------------------------------------------

    def load_all(self) -> InferenceEngine:
        """Load every selected family of every selected target; refusals go to load_errors."""
        targets = self.target_filter or tuple(self.loader.list_available_targets())
        for target in targets:
            self.load_models_for_target(target)
        return self

    def load_models_for_target(self, target: str, view: str | None = None) -> list[str]:
        view = view or self.view
        try:
            names = list(self.loader.list_available_families(target, view=view))
        except Exception as exc:  # a missing target is a refusal, not a crash
            self.load_errors[(target, "*")] = short_error(exc)
            return []
        if self.family_filter:
            names = [n for n in names if n in self.family_filter]
        loaded = self.models.setdefault(target, {})
        for family in names:
            try:
                loaded[family] = self._load_family(target, family, view)
                self.load_errors.pop((target, family), None)
            except Exception as exc:
                reason = exc.reason if isinstance(exc, ModelLoadError) else short_error(exc)
                self.load_errors[(target, family)] = reason
                log.warning(
                    "model refused: %s/%s: %s", target, family, reason,
                    extra={"target": target, "family": family, "reason": reason},
                )
        self.selected[target] = self._routing(target, view)
        self._spec = None
        return sorted(loaded)

    def _routing(self, target: str, view: str) -> str | None:
        getter = getattr(self.loader, "get_routing_decision", None)
        if getter is None:
            return None
        try:
            return getter(target, view=view)
        except Exception as exc:
            log.warning("routing decision of %s unreadable: %s", target, exc)
            return None

    def _load_family(self, target: str, family: str, view: str) -> LoadedFamily:
        model, meta = self.loader.load_model(target, family, view=view)
        if not isinstance(meta, ModelMeta):
            meta = ModelMeta.from_dict(meta, family)
        sequence = SequenceSpec.for_meta(meta)
        unknown = tuple(f for f in meta.feature_list if parse_feature(f) is None)
        if unknown:
            log.warning("%s/%s uses unknown features %s: they are NaN", target, family, unknown)
        return LoadedFamily(
            target=target,
            family=family,
            model=model,
            meta=meta,
            sequence=sequence,
            needs_finite=not bool(getattr(model, "accepts_nan", True)),
            unknown_features=unknown,
            bars_to_ready=bars_to_ready(meta, sequence),
        )

    def families(self) -> Iterable[LoadedFamily]:
        for target in sorted(self.models):
            for family in sorted(self.models[target]):
                yield self.models[target][family]

    @property
    def input_spec(self) -> InputSpec:
        if self._spec is None:
            names: dict[str, None] = {}
            sequences: dict[SequenceSpec, None] = {}
            for fam in self.families():
                if fam.sequence is None or fam.sequence.kind == FEATURES:
                    names.update(dict.fromkeys(fam.meta.feature_list))
                if fam.sequence is not None:
                    sequences[fam.sequence] = None
            self._spec = InputSpec(tuple(names), tuple(sequences))
            index = {name: i for i, name in enumerate(self._spec.feature_names)}
            self._columns = {
                (fam.target, fam.family): np.array(
                    [index[f] for f in fam.meta.feature_list], dtype=np.int64
                )
                for fam in self.families()
                if fam.sequence is None
            }
        return self._spec

    def close(self) -> None:
        for fam in self.families():
            closer = getattr(fam.model, "close", None)
            if closer is not None:
                try:
                    closer()
                except Exception:  # closing must never mask the real shutdown reason
                    log.exception("closing %s/%s failed", fam.target, fam.family)

    # ---- batch inference -----------------------------------------------------------------

    def predict_batch(self, inputs: BatchInputs) -> BatchResult:
        spec = self.input_spec
        n = len(inputs)
        results: dict[str, TargetBatch] = {}
        seconds: dict[tuple[str, str], float] = {}
        failures: dict[tuple[str, str, str], int] = {}
        for target in sorted(self.models):
            batch = TargetBatch(self.selected.get(target), {}, {}, {}, n)
            for family in sorted(self.models[target]):
                fam = self.models[target][family]
                started = time.perf_counter()
                preds, warming, failed, called = self._predict_family(fam, inputs, n, spec)
                if called:  # the time of model calls only, not of a family still warming
                    seconds[(target, family)] = time.perf_counter() - started
                unpublished = int(np.count_nonzero(~np.isfinite(preds) & (warming == 0)))
                if unpublished:
                    _count_failures(failures, target, family, failed, unpublished)
                batch.preds[family] = preds
                batch.warming[family] = warming
                batch.failed[family] = failed
            results[target] = batch
        return BatchResult(results, seconds, failures)

    def _family_input(self, fam: LoadedFamily, inputs: BatchInputs) -> np.ndarray:
        if fam.sequence is not None:
            return inputs.sequences[fam.sequence]
        cols = self._columns[(fam.target, fam.family)]
        return to_float32(inputs.features[:, cols])

    def _predict_family(
        self, fam: LoadedFamily, inputs: BatchInputs, n: int, spec: InputSpec
    ) -> tuple[np.ndarray, np.ndarray, list[str | None], bool]:
        """Each row's value, bars still needed, failure; and whether the model was called."""
        preds = np.full(n, np.nan)
        warming = np.zeros(n, dtype=np.int64)
        failed: list[str | None] = [None] * n
        if n == 0:
            return preds, warming, failed, False
        try:
            x = self._family_input(fam, inputs)
        except KeyError as exc:
            return preds, warming, [f"missing_input:{exc}"] * n, False
        rows = np.arange(n)
        if fam.needs_finite:
            if fam.unknown_features:
                reason = "unknown_feature:" + ",".join(fam.unknown_features)
                return preds, warming, [reason] * n, False
            flat = x.reshape(n, -1)
            ready = np.isfinite(flat).all(axis=1)
            if not ready.all():
                needed = np.maximum(fam.bars_to_ready - inputs.bars_seen, 1)
                if fam.sequence is not None and fam.sequence.kind == FEATURES:
                    # A feature sequence is ready once its newest non-finite row has left the
                    # window: row j (0 = oldest of T) needs j + 1 more bars, if they are
                    # finite. (A raw sequence is finite from its T-th bar: the count above.)
                    bad_rows = ~np.isfinite(x).all(axis=2)
                    newest_bad = x.shape[1] - 1 - np.argmax(bad_rows[:, ::-1], axis=1)
                    needed = np.maximum(needed, newest_bad + 1)
                warming = np.where(ready, 0, needed).astype(np.int64)
                rows = np.flatnonzero(ready)
                x = x[rows]
        if rows.size == 0:
            return preds, warming, failed, False
        try:
            preds[rows] = _predict_padded(fam.model, x)
        except model_faults() as exc:
            if _first_in_a_while((fam.target, fam.family)):
                log.warning("family %s/%s failed on %d rows: %s (the same again within %d s"
                            " is not logged; livepred_family_failures_total counts every row)",
                            fam.target, fam.family, rows.size, exc, WARN_EVERY_S)
            for i, value, why in _predict_apart(fam.model, x, rows, exc):
                if why is None:
                    preds[i] = value
                else:
                    failed[i] = why
        return preds, warming, failed, True

    # ---- the seed's single-row API -------------------------------------------------------

    def _family(self, target: str, family: str, view: str | None) -> LoadedFamily:
        fam = self.models.get(target, {}).get(family)
        if fam is not None:
            return fam
        try:
            fam = self._load_family(target, family, view or self.view)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ModelLoadError) else short_error(exc)
            raise InferenceError(family, "*", f"load failed: {reason}") from exc
        self.models.setdefault(target, {})[family] = fam
        self._spec = None
        return fam

    def predict(
        self,
        target: str,
        family: str,
        features: Any,
        symbol: str = "default",
        view: str | None = None,
    ) -> float:
        """One prediction for one symbol. A sequential family keeps the symbol's last T rows."""
        try:
            fam = self._family(target, family, view)
            row = np.asarray(features, dtype=_row_dtype(fam))
            if fam.sequence is not None and row.ndim == 1:
                history = self._history(symbol, fam)
                history.append(row)
                if len(history) < fam.sequence.length:
                    need = fam.sequence.length - len(history)
                    raise InferenceError(family, symbol, f"warming: {need} more rows needed")
                x = np.stack(list(history))[None, ...]
            else:
                x = row[None, ...]
            # As the daemon's buffers: a raw window in float64, z-scored, then float32.
            seq = fam.sequence
            if seq is not None and seq.kind == RAW and seq.normalization == "zscore":
                x = zscore(x)
            x = to_float32(x)
            if fam.needs_finite and not np.isfinite(x).all():
                raise InferenceError(family, symbol, "inputs not finite yet (warming)")
            value = float(_predict_padded(fam.model, x)[0])
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(family, symbol, short_error(exc)) from exc
        if not np.isfinite(value):
            raise InferenceError(family, symbol, NON_FINITE_OUTPUT)
        return value

    def predict_all_families(
        self, target: str, features: Any, symbol: str = "default", view: str | None = None
    ) -> dict[str, float]:
        """Every family of the target that can predict now; failures are logged and left out."""
        if target not in self.models:
            self.load_models_for_target(target, view)
        out: dict[str, float] = {}
        for family in sorted(self.models.get(target, {})):
            fam = self.models[target][family]
            feats = features.get(family) if isinstance(features, Mapping) else features
            if isinstance(features, Mapping) and feats is None:
                continue
            try:
                out[family] = self.predict(target, family, feats, symbol=symbol, view=view)
            except InferenceError as exc:
                log.info("%s/%s skipped for %s: %s", target, fam.family, symbol, exc.reason)
        return out

    def _history(self, symbol: str, fam: LoadedFamily) -> deque[np.ndarray]:
        key = (symbol, fam.target, fam.family)
        history = self._rows.get(key)
        if history is None:
            assert fam.sequence is not None
            history = self._rows[key] = deque(maxlen=fam.sequence.length)
        return history

    def warmup_sequential(
        self, target: str, family: str, rows: Any, symbol: str = "default", view: str | None = None
    ) -> int:
        """Fill a symbol's buffer with historical rows (oldest first); returns rows held."""
        try:
            fam = self._family(target, family, view)
        except InferenceError:
            raise
        if fam.sequence is None:
            raise InferenceError(family, symbol, "not a sequential family")
        history = self._history(symbol, fam)
        width = len(fam.sequence.columns)
        for row in np.asarray(rows, dtype=_row_dtype(fam)).reshape(-1, width):
            history.append(row)
        return len(history)

    def reset_buffers(self, symbol: str | None = None) -> None:
        if symbol is None:
            self._rows.clear()
            return
        for key in [k for k in self._rows if k[0] == symbol]:
            del self._rows[key]


WARN_EVERY_S = 60
_warned_at: dict[tuple[str, str], float] = {}


def _first_in_a_while(key: tuple[str, str]) -> bool:
    """True at most once per WARN_EVERY_S per key: a family failing on every batch is one
    log line a minute, not one per batch."""
    now = time.monotonic()
    if now - _warned_at.get(key, -WARN_EVERY_S) < WARN_EVERY_S:
        return False
    _warned_at[key] = now
    return True


def _count_failures(
    failures: dict[tuple[str, str, str], int], target: str, family: str,
    failed: list[str | None], unpublished: int,
) -> None:
    """`unpublished` ready rows without a value: by failed reason kind, the rest non-finite."""
    counted = 0
    for reason in failed:
        if reason is not None:
            key = (target, family, reason.split(":", 1)[0])
            failures[key] = failures.get(key, 0) + 1
            counted += 1
    if unpublished > counted:
        failures[(target, family, NON_FINITE_OUTPUT)] = unpublished - counted


def _row_dtype(fam: LoadedFamily) -> type[np.floating[Any]]:
    """Raw OHLCV rows are kept in float64 (z-scored before the float32 cast), as in the
    daemon's buffers; feature rows are float32."""
    return np.float64 if fam.sequence is not None and fam.sequence.kind == RAW else np.float32


def _predict_apart(
    model: Any, x: np.ndarray, rows: np.ndarray, exc: BaseException
) -> list[tuple[int, float, str | None]]:
    """After a batch call raised: each row's outcome as if its kind of rows were predicted
    apart, so that rows a model refuses (NaN, which sklearn estimators reject) do not fail the
    rows that share their batch. The rows without NaN are tried as one call, then, if that
    raises too, one by one, unless the first and the middle one also raise alone (the model
    is broken for every row: one call per row would cost a drain's batch seconds). The rows
    with NaN are one call, their outcome shared (a model refuses NaN rows, or takes them)."""
    if rows.size == 1:
        return [(int(rows[0]), np.nan, f"error:{type(exc).__name__}")]
    finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    out: list[tuple[int, float, str | None]] = []
    for group, nan_rows in ((np.flatnonzero(finite), False), (np.flatnonzero(~finite), True)):
        if group.size == 0:
            continue
        if group.size == rows.size:  # the call that raised was this group already
            failure: BaseException | None = exc
        else:
            failure = None
            try:
                values = _predict_padded(model, x[group])
            except model_faults() as group_exc:
                failure = group_exc
            else:
                out += [(int(rows[j]), float(v), None) for j, v in zip(group, values, strict=True)]
                continue
        assert failure is not None
        if nan_rows or group.size == 1 or _raises_alone(model, x, group[[0, group.size // 2]]):
            reason = f"error:{type(failure).__name__}"
            out += [(int(rows[j]), np.nan, reason) for j in group]
            continue
        for j in group:
            try:
                out.append((int(rows[j]), float(_predict_padded(model, x[j : j + 1])[0]), None))
            except model_faults() as row_exc:
                out.append((int(rows[j]), np.nan, f"error:{type(row_exc).__name__}"))
    return out


def _raises_alone(model: Any, x: np.ndarray, probes: np.ndarray) -> bool:
    for j in probes:
        try:
            _predict_padded(model, x[j : j + 1])
        except model_faults():
            continue
        return False
    return True


def _predict_padded(model: Any, x: np.ndarray) -> np.ndarray:
    """`model.predict(x)` as float64 (B,), called so that a row's value does not depend on the
    rows beside it: on a multiple of BATCH_QUANTUM rows, or on exactly `fixed_batch` rows per
    call for a handler that has one (TensorFlow); a static-batch handler chunks itself."""
    n = x.shape[0]
    if n == 0:
        return np.empty(0)
    if getattr(model, "row_by_row", False):  # see handlers.pickled: one call per row
        parts = [np.asarray(model.predict(x[i : i + 1]), dtype=np.float64).reshape(-1)
                 for i in range(n)]
        if any(part.shape[0] != 1 for part in parts):
            raise ValueError("model returned other than one value for one row")
        return np.concatenate(parts)
    fixed = getattr(model, "fixed_batch", None)
    if fixed:
        chunks = padded_chunks(x, fixed)
    else:
        extra = 0 if getattr(model, "static_batch", None) else -n % BATCH_QUANTUM
        chunks = padded_chunks(x, n + extra) if extra else [x]
    parts = [np.asarray(model.predict(chunk), dtype=np.float64).reshape(-1) for chunk in chunks]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    rows = sum(chunk.shape[0] for chunk in chunks)
    if out.shape[0] != rows:
        raise ValueError(f"model returned {out.shape[0]} values for {rows} rows")
    return out[:n] if rows != n else out


def predict(loader: Any, target: str, family: str, features: Any) -> float:
    """Seed convenience: one prediction with a throwaway engine."""
    return InferenceEngine(loader).predict(target, family, features)
