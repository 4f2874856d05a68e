"""Experiment results: mean ± std over seeds, delta against full data, JSON / CSV / table / PNG."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.config import to_dict
from mechsieve.evaluate.tasks import LOWER_IS_BETTER

BOOKKEEPING = ("method", "seed")


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns holding task metrics (`task/metric`), in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if "/" in key:
                seen[key] = None
    return list(seen)


def mean_std(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of `values`; the std of a single value is 0."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std of no values")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: seeds, and for each numeric column its mean, std (ddof=1; 0 for one seed) and
    delta of the mean against the `full` method's mean (when `full` ran)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in BOOKKEEPING]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        stats: dict[str, Any] = {"runs": len(mine)}
        for col in columns:
            values = [r[col] for r in mine if isinstance(r.get(col), (int, float)) and not isinstance(r.get(col), bool)]
            if not values:
                continue
            mean, std = mean_std(values)
            stats[col] = {"mean": mean, "std": std, "n": len(values)}
        out[method] = stats
    if "full" in out:
        for stats in out.values():
            for col, s in stats.items():
                if isinstance(s, dict) and isinstance(out["full"].get(col), dict):
                    s["delta_vs_full"] = s["mean"] - out["full"][col]["mean"]
    return out


def format_table(summary: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table: one row per method, `mean ± std (Δ vs full)` per metric column."""
    header = ["method", "runs", "selected", *columns]
    lines = [header]
    for method, stats in summary.items():
        chosen = stats.get("selected")
        cells = [method, str(stats["runs"]), f"{chosen['mean']:.0f}" if isinstance(chosen, dict) else "-"]
        for col in columns:
            cells.append(_fmt(stats.get(col), delta=method != "full"))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  ({'lower' if c.split('/')[-1] in LOWER_IS_BETTER else 'higher'} is better: {c})" for c in columns]
    return "\n".join(text + ["mean ± std over seeds; (Δ) = difference of the mean against full data", *notes])


def _fmt(s: dict[str, Any] | None, digits: int = 4, delta: bool = True) -> str:
    if not isinstance(s, dict):
        return "-"
    text = f"{s['mean']:.{digits}f}"
    if s["n"] > 1:
        text += f" ± {s['std']:.{digits}f}"
    if delta and "delta_vs_full" in s:
        text += f" ({s['delta_vs_full']:+.{digits}f})"
    return text


def plot(summary: dict[str, dict[str, Any]], columns: list[str], path: Path) -> Path:
    """Bars of each metric's mean per method with std error bars; full data as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mechsieve.store.atomic import atomic_path

    n = max(len(columns), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)),
                             squeeze=False)
    methods = list(summary)
    for ax, col in zip(axes.flat, columns):
        means = [summary[m].get(col, {}).get("mean", np.nan) for m in methods]
        stds = [summary[m].get(col, {}).get("std", 0.0) for m in methods]
        colors = ["#999999" if m == "base" else "#4477aa" if m == "full" else "#ee7733" for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, color=colors, capsize=3)
        if "full" in summary and col in summary["full"]:
            ax.axhline(summary["full"][col]["mean"], color="#4477aa", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        better = "lower" if col.split("/")[-1] in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{col}\n({better} is better)", fontsize=9)
        finite = [m for m in means if np.isfinite(m)]
        if finite and better == "lower":
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6) - max(stds + [0]), hi + 0.1 * (hi - lo + 1e-6) + max(stds + [0]))
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_results(cfg: Any, rows: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Path]:
    """results.json (config, rows, summary), results.csv (rows), results.png, table.txt under cfg.out."""
    from mechsieve.store.atomic import write_json, write_text

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = metric_columns(rows)
    summary = summarize(rows)
    table = format_table(summary, [c for c in columns if is_primary(c, cfg)] or columns)
    write_json(out / "results.json", {"config": to_dict(cfg), **extra, "rows": rows, "summary": summary,
                                      "table": table})
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "table.txt", table + "\n")
    plot(summary, [c for c in columns if is_primary(c, cfg)] or columns, out / "results.png")
    return {"results": out / "results.json", "csv": out / "results.csv", "table": out / "table.txt",
            "plot": out / "results.png"}


def is_primary(column: str, cfg: Any) -> bool:
    for task in getattr(cfg, "eval", []):
        if column == f"{task.label()}/{task.primary}" or (task.task == "loss" and column == f"{task.label()}/loss_per_example"):
            return True
    return False
