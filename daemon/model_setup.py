"""Which models the service serves: loaded from the settings, checked, compared on reload."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from daemon.settings import Settings
from handlers import tree_compiler
from handlers.engine import InferenceEngine
from handlers.run import ModelLoader

log = structlog.get_logger("livepred.service")


class NoModelsError(RuntimeError):
    """Not one family of the run could be loaded: nothing to serve."""


def build_engine(settings: Settings) -> InferenceEngine:
    """Load every selected family (blocking: call it off the event loop)."""
    m = settings.models
    tree_compiler.enabled = m.compile_trees
    try:
        loader = ModelLoader(
            m.run_root,
            allow_pickle=m.allow_pickle,
            interval_minutes=float(m.interval_minutes),
            device=m.device,
        )
    except (OSError, ValueError) as exc:
        # A missing or unreadable run directory: one line naming the key, not a traceback.
        raise NoModelsError(f"models.run_root = {m.run_root!r}: {exc}") from None
    engine = InferenceEngine(
        loader, device=m.device, view=m.view, targets=m.targets, families=m.families
    )
    try:
        _warn_unknown_names(loader, m.view, m.targets, m.families)
        engine.load_all()
    except OSError as exc:  # e.g. <run_root>/targets not readable by this user
        raise NoModelsError(f"models.run_root = {m.run_root!r}: {exc}") from None
    _warn_short_warmup(engine, settings.state.warmup_bars)
    if not any(True for _ in engine.families()):
        filters = "".join(
            f" with models.{key} = {list(value)!r}"
            for key, value in (("targets", m.targets), ("families", m.families)) if value
        )
        raise NoModelsError(
            f"no model could be loaded from models.run_root = {m.run_root!r}{filters}"
            + f" ({why_nothing_loaded(engine)})"
        )
    return engine


def why_nothing_loaded(engine: InferenceEngine) -> str:
    """For an engine with no family: each refusal, or else what the run has."""
    reasons = "; ".join(f"{t}/{f}: {r}" for (t, f), r in sorted(engine.load_errors.items()))
    return reasons or what_the_run_has(engine.loader, engine.view)


def what_the_run_has(loader: ModelLoader, view: str) -> str:
    """Why nothing matched, said with what is there: the views, targets and families."""
    targets = loader.list_available_targets()
    if not targets:
        return "no targets/<target>/models/view=<VIEW>/family=<Family>/ directories found"
    views = sorted({
        d.name.removeprefix("view=")
        for t in targets
        for d in loader.view_dir(t, view).parent.glob("view=*")
        if d.is_dir()
    })
    if view not in views:
        return (f"no view={view} directory (models.view); views present: "
                f"{', '.join(views) or 'none'}")
    families = sorted({f for t in targets for f in loader.list_available_families(t, view=view)})
    return (f"the run has targets {', '.join(targets)} and families "
            f"{', '.join(families) or 'none'} in view {view}")


def _warn_unknown_names(
    loader: ModelLoader, view: str, targets: Sequence[str], families: Sequence[str]
) -> None:
    """A name in models.targets / models.families that the run does not have is most likely
    a typo: said once at start, with what the run has (the rest is served)."""
    have = loader.list_available_targets()
    missing = [t for t in targets if t not in have]
    if missing:
        log.warning("models.targets names targets the run does not have",
                    names=missing, run_root=str(loader.run_root), targets=have)
    if families:
        seen = {f for t in (targets or have) if t in have
                for f in loader.list_available_families(t, view=view)}
        missing = [f for f in families if f not in seen]
        if missing:
            log.warning(f"models.families names families no target has in view={view}",
                        names=missing, run_root=str(loader.run_root), families=sorted(seen))


def _warn_short_warmup(engine: InferenceEngine, warmup_bars: int) -> None:
    """A restart replays at most `warmup_bars` bars per symbol: fewer than a family's inputs
    need, and its outputs after a restart differ from an uninterrupted run's for a while."""
    short = {
        f"{fam.target}/{fam.family}": fam.bars_to_ready
        for fam in engine.families() if fam.bars_to_ready > warmup_bars
    }
    if short:
        log.warning("state.warmup_bars is below what these families' inputs need: after a"
                    " restart their outputs differ from an uninterrupted run's until each"
                    " symbol has that many new bars", warmup_bars=warmup_bars, needs=short)


def missing_artifacts(engine: InferenceEngine) -> list[str]:
    """The files of the models this engine is configured to serve (its targets, families and
    view) that the run's manifest lists and the run lacks; none without a manifest. A host
    deployed with only its own subtree of a larger training run is complete."""
    missing = getattr(engine.loader, "missing_artifacts", None)
    if missing is None:
        return []

    def served(key: str) -> bool:
        parts = key.split("/")
        if len(parts) < 5 or parts[0] != "targets" or parts[2] != "models":
            return False  # not a model's file (a report, the training data): not served
        target, view, family = parts[1], parts[3], parts[4]
        return (
            (not engine.target_filter or target in engine.target_filter)
            and view == f"view={engine.view}"
            and (not engine.family_filter or family.removeprefix("family=") in engine.family_filter)
        )

    return [key for key in missing() if served(key)]


def lost_in_swap(old: InferenceEngine, new: InferenceEngine) -> list[str]:
    """What serves now and would not after swapping in `new`: families, and a target's `pred`
    when the new run selects none. Logged, not refused: a deploy may mean it."""
    lost = []
    for target, families in old.models.items():
        now = new.models.get(target, {})
        for family in sorted(set(families) - set(now)):
            why = new.load_errors.get((target, family), "not in the new run")
            lost.append(f"{target}/{family} ({why})")
        if now and old.selected.get(target) and not new.selected.get(target):
            lost.append(f"{target}: pred (the new run selects no family: no"
                        " routing_decision.json)")
    return lost


def unserved_selections(engine: InferenceEngine) -> dict[str, str]:
    """Targets whose routed (selected) family is not loaded: their `pred` is always null."""
    return {
        target: family
        for target, family in engine.selected.items()
        if family is not None and family not in engine.models.get(target, {})
    }


def run_id_of(engine: InferenceEngine) -> str:
    loader = engine.loader
    return str(getattr(loader, "run_id", "") or "")
