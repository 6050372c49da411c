"""`livepred inspect RUN`: what the daemon would load from a training run, and what it refuses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.model_setup import unserved_selections, why_nothing_loaded
from handlers.engine import InferenceEngine
from handlers.run import ModelLoader


def inspect_run(
    run_root: Path,
    *,
    view: str = "CROSS_SECTIONAL",
    allow_pickle: bool = True,
    interval_minutes: float = 0.0,
    targets: Sequence[str] = (),
    families: Sequence[str] = (),
) -> dict[str, Any]:
    if not run_root.exists():
        raise FileNotFoundError(f"{run_root}: no such directory")
    if not run_root.is_dir():
        raise NotADirectoryError(f"{run_root}: not a directory (a training run is one)")
    if not (run_root / "targets").is_dir():
        raise NotADirectoryError(
            f"{run_root}: not a training run (no targets/ directory: expected"
            " targets/<target>/models/view=<VIEW>/family=<Family>/)"
        )
    loader = ModelLoader(run_root, allow_pickle=allow_pickle, interval_minutes=interval_minutes)
    engine = InferenceEngine(loader, view=view, targets=targets, families=families).load_all()
    report: dict[str, Any] = {}
    for target in loader.list_available_targets():
        if targets and target not in targets:
            continue
        found: dict[str, Any] = {}
        for fam in engine.models.get(target, {}).values():
            meta = fam.meta
            found[fam.family] = {
                "status": "loaded",
                "handler": fam.format_name,
                "compiled": fam.compiled,  # trees: native code (True) or the framework's own
                "task": meta.task,
                "input": (
                    f"(B, {meta.window}, {len(fam.sequence.columns)})"
                    if fam.sequence is not None
                    else f"(B, {len(meta.feature_list)})"
                ),
                "input_mode": meta.input_mode,
                "features": list(meta.feature_list),
                "unknown_features": list(fam.unknown_features),
                # None: never (an unknown feature is NaN for ever, and the family needs
                # finite inputs; it is listed under `failed` on every bar).
                "bars_to_ready": (
                    1 if not fam.needs_finite
                    else None if fam.unknown_features
                    else fam.bars_to_ready
                ),
                "predicts_on_nan": not fam.needs_finite,
                "interval_minutes": meta.interval_minutes,
                "metrics": meta.metrics,
            }
        for (t, family), reason in engine.load_errors.items():
            if t == target:
                found[family] = {"status": "refused", "reason": reason}
        report[target] = {
            "selected": engine.selected.get(target),
            "families": dict(sorted(found.items())),
        }
    nothing = None if any(True for _ in engine.families()) else why_nothing_loaded(engine)
    warnings = [
        f"{target}: its selected family {family} (routing_decision.json) is not loaded:"
        " every output's `pred` will be null"
        for target, family in sorted(unserved_selections(engine).items())
    ]
    engine.close()
    return {
        "run_root": str(run_root),
        "run_id": str(getattr(loader, "run_id", "")),
        "view": view,
        "feature_union": list(engine.input_spec.feature_names),
        "targets": report,
        "warnings": warnings,
        "nothing_loaded": nothing,  # None, or why no family loaded (the daemon would not start)
        # Listed in manifest.json, absent from the run: the daemon refuses a reload to it.
        "missing_artifacts": loader.missing_artifacts(),
    }


def render(report: dict[str, Any]) -> None:
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    # Piped (a file, less, a ticket): wide enough that a refusal's reason and its fix are
    # not cut at 80 columns; a terminal's own width otherwise.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(width=wide)
    console.print(f"[bold]run[/] {report['run_id']}  ({report['run_root']}, view {report['view']})")
    for target, info in report["targets"].items():
        selected = info["selected"] or "none"
        table = Table(title=f"target {target}  selected: {selected}", title_justify="left")
        for col in ("family", "status", "handler", "input", "ready after"):
            table.add_column(col)
        table.add_column("features / reason", overflow="fold")  # whole, never cut with "…"
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
            if f["predicts_on_nan"]:
                ready = "every bar (NaN ok)"
            elif f["bars_to_ready"] is None:
                ready = "[red]never (unknown feature)[/]"
            else:
                ready = f"{f['bars_to_ready']} bars"
            handler = f["handler"] + {True: " (compiled)", False: "", None: ""}[f["compiled"]]
            table.add_row(family, "[green]loaded[/]", handler, f["input"], ready, feats)
            if f["metrics"]:
                shown = ", ".join(f"{k} {v}" for k, v in list(f["metrics"].items())[:6])
                table.add_row("", "", "", "", "", f"[dim]metrics: {shown}[/]")
        console.print(table)
    unknown = {u for info in report["targets"].values() for f in info["families"].values()
               for u in f.get("unknown_features", ())}
    known = [name for name in report["feature_union"] if name not in unknown]
    console.print(f"features computed: {', '.join(known) or 'none'}"
                  + (f"  [yellow](unknown, always NaN: {', '.join(sorted(unknown))})[/]"
                     if unknown else ""))
    for warning in report.get("warnings", ()):
        console.print(f"[yellow]warning[/]: {warning}")
    missing = report.get("missing_artifacts") or []
    if missing:
        console.print(f"[red]incomplete run[/]: manifest.json lists {len(missing)} file(s) the"
                      f" run does not have (a reload to it is refused): {', '.join(missing[:5])}"
                      + (", …" if len(missing) > 5 else ""))
