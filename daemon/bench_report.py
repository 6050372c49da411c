"""The benchmark's results as text: the targets check, console tables, Markdown tables for
BENCHMARKS.md, and the latency plot (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LATENCY_SCALE = "1000"  # the symbol count the targets are stated for


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b or any(map(_nan, (a, b))):
        return None
    return float(a) / float(b)


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: the measured value (a ratio where the target is one) and
    whether it is met. None: not measured in this run."""
    scale = LATENCY_SCALE if LATENCY_SCALE in (results.get("livepred") or {}) else None
    if scale is None and results.get("livepred"):
        scale = max(results["livepred"], key=int)
    lp = _get(results, "livepred", scale) if scale else None
    lp = lp or {}
    limit = results.get("redis_limit") or {}
    rtt = lp.get("rtt") or limit.get("rtt") or {}
    paired = lp.get("paired_limit")
    if paired:  # each drain against the passthrough drained just before it
        throughput = ("throughput vs Redis limit",
                      f"livepred {scale} symbols / the passthrough drained just before, median "
                      f"of {len(paired['ratio_runs'])} pairs", ">= 0.60", paired["ratio"])
    else:
        throughput = ("throughput vs Redis limit", f"livepred {scale} symbols / passthrough",
                      ">= 0.60", _ratio(lp.get("bars_per_s"), limit.get("bars_per_s")))
    rows = [
        (*throughput, lambda v: v >= 0.60),
        ("throughput vs naive", f"livepred {scale} symbols / naive", ">= 1000x",
         _ratio(lp.get("bars_per_s"), _get(results, "naive", "bars_per_s")),
         lambda v: v >= 1000),
        ("burst: last prediction", f"{_get(results, 'burst', 'symbols')} symbols, ms after the "
         "last bar written", "<= 250 ms", _get(results, "burst", "last_pred_ms"),
         lambda v: v <= 250),
        ("latency p50 vs Redis round trip", f"{scale} symbols at 50% load / one-bar "
         "passthrough just before", "<= 2x", _ratio(lp.get("p50_ms"), rtt.get("p50_ms")),
         lambda v: v <= 2),
        ("latency p99 vs Redis round trip", f"{scale} symbols at 50% load / one-bar "
         "passthrough just before", "<= 5x", _ratio(lp.get("p99_ms"), rtt.get("p99_ms")),
         lambda v: v <= 5),
        ("state memory per symbol", f"{_get(results, 'memory', 'symbols')} symbols, RSS growth",
         "< 4096 B", _get(results, "memory", "bytes_per_symbol"), lambda v: v < 4096),
        ("state rebuild", f"{_get(results, 'rebuild', 'bars')} retained bars",
         ">= 200,000 bars/s", _get(results, "rebuild", "bars_per_s"), lambda v: v >= 200_000),
    ]
    out = []
    for name, what, target, value, check in rows:
        ok = None if value is None or _nan(value) else bool(check(value))
        out.append({"name": name, "what": what, "target": target, "value": value, "ok": ok})
    out.append({"name": "RSS flat over a 10-minute soak", "what": "scripts/soak.py",
                "target": "flat", "value": None, "ok": None})
    return out


# ---- formatting ------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or _nan(value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def _target_value(row: dict[str, Any]) -> str:
    v = row["value"]
    if v is None:
        return "-"
    if "x" in row["target"] and "B" not in row["target"]:
        return f"{v:,.2f}x" if v < 100 else f"{v:,.0f}x"
    if row["target"].startswith(">= 0."):  # a ratio of rates
        return f"{v:.2f}"
    return fmt(v)


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the console and Markdown output."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    limit = results.get("redis_limit") or {}
    naive = results.get("naive") or {}
    rows = [
        ["Redis limit (passthrough, XREADGROUP)", fmt(limit.get("bars_per_s")),
         fmt(_get(limit, "rtt", "p50_ms"), 2), fmt(_get(limit, "rtt", "p99_ms"), 2),
         fmt(_get(limit, "rtt", "p999_ms"), 2)],
        ["Redis limit (passthrough, fenced reads)", fmt(limit.get("fenced_bars_per_s")),
         fmt(_get(limit, "rtt_fenced", "p50_ms"), 2), fmt(_get(limit, "rtt_fenced", "p99_ms"), 2),
         fmt(_get(limit, "rtt_fenced", "p999_ms"), 2)],
        ["Naive (pandas + single-row predicts)", fmt(naive.get("bars_per_s")), "-", "-", "-"],
    ]
    out.append(("Baselines (bars/s: drain of a standing backlog; latency: one bar at a time, "
                "XADD to output visible)", ["scenario", "bars/s", "p50 ms", "p99 ms", "p99.9 ms"],
                rows))
    lp = results.get("livepred") or {}
    rows = []
    for scale in sorted(lp, key=int):
        r = lp[scale]
        rows.append([
            f"{int(scale):,}", fmt(r.get("bars_per_s")),
            fmt(_ratio(r.get("bars_per_s"), limit.get("bars_per_s")), 2),
            fmt(r.get("latency_rate")), fmt(r.get("p50_ms"), 2), fmt(r.get("p99_ms"), 2),
            fmt(r.get("p999_ms"), 2),
            f"{fmt(_get(r, 'rtt', 'p50_ms'), 2)} / {fmt(_get(r, 'rtt', 'p99_ms'), 2)}",
            f"{fmt(_get(r, 'light_load', 'p50_ms'), 2)} / {fmt(_get(r, 'light_load', 'p99_ms'), 2)}"
            f" @ {fmt(_get(r, 'light_load', 'rate'))}/s",
            fmt(r.get("rss_mb")), fmt(r.get("outputs_match")),
        ])
    out.append(("livepred, three families (throughput: drain of a standing backlog; latency: "
                "XADD to output visible at 50% of that rate, median of the runs' percentiles)",
                ["symbols", "bars/s", "x limit", "latency load/s", "p50 ms", "p99 ms",
                 "p99.9 ms", "one-bar RTT p50 / p99 ms (just before)",
                 "10% load p50 / p99 ms", "RSS MB",
                 "1 output/bar"], rows))
    pairs = [(s, lp[s]["paired_limit"]) for s in sorted(lp, key=int) if lp[s].get("paired_limit")]
    if pairs:
        rows = [
            [f"{int(s):,}", str(k + 1), fmt(limit_r), fmt(lp[s]["bars_per_s_runs"][k]),
             fmt(pair["ratio_runs"][k], 2)]
            for s, pair in pairs
            for k, limit_r in enumerate(pair["limit_bars_per_s_runs"])
        ]
        rows += [[f"{int(s):,}", "median", "-", "-", fmt(pair["ratio"], 2)] for s, pair in pairs]
        out.append(("Throughput against the passthrough drained just before each drain (the "
                    "same backlog, seconds apart: the box's drift over a run cancels)",
                    ["symbols", "pair", "passthrough bars/s", "livepred bars/s", "ratio"], rows))
    for title, path in (
        ("During the drain (the last of each scale): batch size and time per batch (reads "
         "made while a batch computes join the next one)", ("drain_per_batch",)),
        ("At 50% load: batch size and time per batch (fixed per-call costs show here)",
         ("latency_per_batch",)),
        ("At 10% load: batch size and time per batch (compute CPU: the computing thread's own "
         "CPU time)", ("light_load", "per_batch")),
    ):
        table = _per_batch_table(title, {s: _get(lp[s], *path) or {} for s in sorted(lp, key=int)})
        if table is not None:
            out.append(table)
    moderate = limit.get("moderate")
    if moderate:
        out.append(("Passthrough at the same load as livepred's latency run",
                    ["load bars/s", "p50 ms", "p99 ms", "p99.9 ms"],
                    [[fmt(moderate.get("rate")), fmt(moderate.get("p50_ms"), 2),
                      fmt(moderate.get("p99_ms"), 2), fmt(moderate.get("p999_ms"), 2)]]))
    split_rows = _split_rows(limit, lp)
    if split_rows:
        out.append(("Where the latency goes, by Redis's clock (the entry ids' whole "
                    "milliseconds): input XADD -> output XADD (waiting in the stream + the "
                    "consumer) and output XADD -> seen by the reader",
                    ["run", "load bars/s", "inside p50 / p99 ms", "reader p50 / p99 ms"],
                    split_rows))
    burst, rebuild, memory = results.get("burst"), results.get("rebuild"), results.get("memory")
    rows = []
    if burst:
        rows.append([f"burst: one bar for each of {burst['symbols']:,} symbols",
                     f"last prediction {fmt(burst['last_pred_ms'])} ms after the last bar "
                     f"written ({fmt(burst.get('from_first_sent_ms'))} ms after the first)"])
    if rebuild:
        rows.append([f"state rebuild: {fmt(rebuild.get('bars'))} retained bars, "
                     f"{fmt(rebuild.get('symbols'))} symbols",
                     f"{fmt(rebuild.get('bars_per_s'))} bars/s; start -> ACTIVE "
                     f"{fmt(rebuild.get('start_to_active_s'), 2)} s (models already loaded)"
                     + _phases(rebuild.get("phases_us_per_bar"))])
    if memory:
        rows.append([f"state memory: {fmt(memory['symbols'])} symbols",
                     f"{fmt(memory['bytes_per_symbol'])} B/symbol RSS growth; arrays "
                     f"{fmt(memory['nbytes_per_slot'])} B/slot"])
    if rows:
        out.append(("Burst, rebuild, memory", ["scenario", "result"], rows))
    bd = {s: (lp[s].get("breakdown_us_per_bar") or {}) for s in sorted(lp, key=int)}
    stages = list(dict.fromkeys(k for b in bd.values() for k in b))
    if stages:
        rows = [[stage, *(fmt(bd[s].get(stage), 2) for s in bd)] for stage in stages]
        rows.append(["sum", *(fmt(sum(bd[s].values()), 2) for s in bd)])
        rows.append(["wall (1e6 / bars/s)",
                     *(fmt(1e6 / lp[s]["bars_per_s"], 2) if lp[s].get("bars_per_s") else "-"
                       for s in bd)])
        out.append(("Per-stage breakdown during the drain (us per bar, the daemon's own stage "
                    "timings; redis_commit overlaps the next batch's compute, so the sum "
                    "exceeds the wall time)", ["stage", *(f"{int(s):,} symbols" for s in bd)],
                    rows))
    feats = results.get("features") or []
    if feats:
        out.append(("Feature state: update cost per bar vs pandas recompute (same run)",
                    ["symbols", "us/symbol-bar", "pandas us/symbol-bar", "speedup",
                     "B/slot (features)"],
                    [[fmt(f["symbols"]), fmt(f["incremental_us_per_symbol_bar"], 3),
                      fmt(f["pandas_us_per_symbol_bar"]), f"{f['speedup']:,.0f}x",
                      fmt(f["bytes_per_slot"])] for f in feats]))
    fams = results.get("families") or []
    if fams:
        pause = fams[0].get("pause_ms", 3.0)
        out.append(("Handlers: single-row vs batched predict, and one row after a pause",
                    ["family", "format", "B=1 us/row", f"B={fams[0]['batch']} us/row", "speedup",
                     f"B=1 after {pause:g} ms asleep, us"],
                    [[f["family"], f["format"], fmt(f["single_us_per_row"]),
                      fmt(f["batched_us_per_row"], 2), f"{f['speedup']:,.0f}x",
                      fmt(f.get("single_after_pause_us"))] for f in fams]))
    out.append(("Targets (ratios measured in this run)", ["target", "measured on", "goal",
                                                            "measured", "met"],
                [[t["name"], t["what"], t["target"], _target_value(t),
                  "-" if t["ok"] is None else ("yes" if t["ok"] else "NO")]
                 for t in results.get("targets") or []]))
    return out


def _per_batch_table(
    title: str, per_batch: dict[str, dict[str, float]]
) -> tuple[str, list[str], list[list[str]]] | None:
    """One row per measured quantity (bars per batch, then ms per batch), a column per scale."""
    keys = list(dict.fromkeys(k for b in per_batch.values() for k in b))
    if not keys:
        return None
    rows = [[("bars per batch" if k == "mean_batch" else f"{k} ms"),
             *(fmt(per_batch[s].get(k), 2) for s in per_batch)] for k in keys]
    return title, ["", *(f"{int(s):,} symbols" for s in per_batch)], rows


def _split_rows(limit: dict[str, Any], lp: dict[str, Any]) -> list[list[str]]:
    runs: list[tuple[str, Any, Any]] = [
        ("passthrough, one bar at a time", _get(limit, "rtt", "rate"), _get(limit, "rtt", "split")),
        ("passthrough at livepred's 50% load", _get(limit, "moderate", "rate"),
         _get(limit, "moderate", "split")),
    ]
    for scale in sorted(lp, key=int):
        r = lp[scale]
        runs.append((f"livepred {int(scale):,} symbols, 50% load", r.get("latency_rate"), r))
        runs.append((f"livepred {int(scale):,} symbols, 10% load", _get(r, "light_load", "rate"),
                     _get(r, "light_load", "split")))
    rows = []
    for name, rate, split in runs:
        if not split or "inside_p50_ms" not in split:
            continue
        rows.append([name, fmt(rate),
                     f"{fmt(split['inside_p50_ms'])} / {fmt(split['inside_p99_ms'])}",
                     f"{fmt(split['reader_p50_ms'], 2)} / {fmt(split['reader_p99_ms'], 2)}"])
    return rows


def _phases(phases: dict[str, float] | None) -> str:
    if not phases:
        return ""
    return "; steps one by one, us/bar: " + ", ".join(
        f"{k} {fmt(v, 2)}" for k, v in phases.items()
    )


def console(results: dict[str, Any]) -> str:
    parts = []
    for title, header, rows in tables(results):
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        parts.append("\n".join([title, line, "-" * len(line), *body]))
    return "\n\n".join(parts)


def markdown(results: dict[str, Any]) -> str:
    parts = []
    for title, header, rows in tables(results):
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---- the plot --------------------------------------------------------------------------------


def _nines(p: Sequence[float]) -> list[float]:
    return [-math.log10(max(1.0 - x, 1e-6)) for x in p]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    curves: list[tuple[str, list[float]]] = []
    limit = results.get("redis_limit") or {}
    for key, label in (("rtt", "passthrough, one bar at a time"),
                       ("moderate", "passthrough at livepred 1k-symbol load")):
        sample = _get(limit, key, "latency_sample_ms")
        if sample:
            curves.append((label, sample))
    for scale, r in sorted((results.get("livepred") or {}).items(), key=lambda kv: int(kv[0])):
        if r.get("latency_sample_ms"):
            curves.append((f"livepred {int(scale):,} symbols @ {r['latency_rate']:,.0f}/s",
                           r["latency_sample_ms"]))
    for label, sample in curves:
        n = len(sample)
        ranks = [(i + 0.5) / n for i in range(n)]
        left.plot(_nines(ranks), sample, label=label)
    ticks = [0.5, 0.9, 0.99, 0.999]
    left.set_xticks(_nines(ticks), [f"p{t * 100:g}" for t in ticks])
    left.set_yscale("log")
    left.set_ylabel("XADD -> output visible (ms)")
    left.set_title("Latency by percentile")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    names, values = [], []
    if _get(results, "naive", "bars_per_s"):
        names.append("naive")
        values.append(results["naive"]["bars_per_s"])
    for scale, r in sorted((results.get("livepred") or {}).items(), key=lambda kv: int(kv[0])):
        n = int(scale)
        names.append(f"livepred\n{n // 1000}k sym" if n >= 1000 and n % 1000 == 0
                     else f"livepred\n{n} sym")
        values.append(r["bars_per_s"])
    if limit.get("bars_per_s"):
        names.append("Redis limit")
        values.append(limit["bars_per_s"])
    right.bar(names, values, color=["#999"] + ["#1f77b4"] * (len(names) - 2) + ["#2ca02c"])
    right.set_yscale("log")
    right.set_ylabel("bars/s (drain of a backlog)")
    right.set_title("Throughput")
    for i, v in enumerate(values):
        right.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    machine = results.get("machine") or {}
    fig.suptitle(f"livepred bench ({results.get('mode', '')}): {machine.get('cpu', '')}, "
                 f"{machine.get('cpus', '?')} CPUs, Redis {machine.get('redis_version', '?')}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
