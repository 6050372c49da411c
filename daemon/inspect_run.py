"""`livepred inspect RUN`: what the daemon would load from a training run, and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.engine import InferenceEngine
from handlers.run import ModelLoader


def inspect_run(
    run_root: Path,
    *,
    view: str = "CROSS_SECTIONAL",
    allow_pickle: bool = True,
    interval_minutes: float = 0.0,
) -> dict[str, Any]:
    if not run_root.is_dir():
        raise NotADirectoryError(f"{run_root}: not a training run directory")
    loader = ModelLoader(run_root, allow_pickle=allow_pickle, interval_minutes=interval_minutes)
    engine = InferenceEngine(loader, view=view).load_all()
    targets: dict[str, Any] = {}
    for target in loader.list_available_targets():
        families: dict[str, Any] = {}
        for fam in engine.models.get(target, {}).values():
            meta = fam.meta
            families[fam.family] = {
                "status": "loaded",
                "handler": fam.format_name,
                "task": meta.task,
                "input": (
                    f"(B, {meta.window}, {len(fam.sequence.columns)})"
                    if fam.sequence is not None
                    else f"(B, {len(meta.feature_list)})"
                ),
                "input_mode": meta.input_mode,
                "features": list(meta.feature_list),
                "unknown_features": list(fam.unknown_features),
                "bars_to_ready": 1 if not fam.needs_finite else fam.bars_to_ready,
                "predicts_on_nan": not fam.needs_finite,
                "interval_minutes": meta.interval_minutes,
                "metrics": meta.metrics,
            }
        for (t, family), reason in engine.load_errors.items():
            if t == target:
                families[family] = {"status": "refused", "reason": reason}
        targets[target] = {
            "selected": engine.selected.get(target),
            "families": dict(sorted(families.items())),
        }
    engine.close()
    return {
        "run_root": str(run_root),
        "run_id": str(getattr(loader, "run_id", "")),
        "view": view,
        "feature_union": list(engine.input_spec.feature_names),
        "targets": targets,
    }


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]run[/] {report['run_id']}  ({report['run_root']}, view {report['view']})")
    for target, info in report["targets"].items():
        table = Table(title=f"target {target}  selected: {info['selected']}", title_justify="left")
        for col in ("family", "status", "handler", "input", "ready after", "features / reason"):
            table.add_column(col)
        for family, f in info["families"].items():
            if f["status"] == "refused":
                table.add_row(family, "[red]refused[/]", "", "", "", f["reason"])
                continue
            names = f["features"]
            feats = (
                ", ".join(names)
                if len(names) <= 4
                else f"{len(names)}: {', '.join(names[:3])}, … {names[-1]}"
            ) or f["input_mode"]
            if f["unknown_features"]:
                feats += f"  [yellow](unknown: {', '.join(f['unknown_features'])})[/]"
            ready = "every bar (NaN ok)" if f["predicts_on_nan"] else f"{f['bars_to_ready']} bars"
            table.add_row(family, "[green]loaded[/]", f["handler"], f["input"], ready, feats)
        console.print(table)
    console.print(f"features computed: {', '.join(report['feature_union'])}")
