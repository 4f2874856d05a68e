"""The report's plots: matplotlib (Agg) figures rendered to inline SVG strings.

Each function takes plain arrays / dicts and returns `Html` (an `<svg>` element). Text stays text
(`svg.fonttype: none`, the browser's font), mathtext is off (a `$` in a source name is just a
`$`), and the SVG ids are prefixed with a hash of the figure so that many plots can share one page
and the same data always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from mechsieve.report.html import Html

SELECTED, OTHER, BLUE, GREY, GREEN = "#ee7733", "#c2c7cf", "#4477aa", "#999999", "#228833"
ATTR_COLORS = {"ri": "#d9695a", "kn": "#5b8fd1", "tr": "#d9a520", "union": "#1d2433"}
RC = {"svg.fonttype": "none", "svg.hashsalt": "mechsieve", "text.parse_math": False, "font.size": 9,
      "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 9.5, "axes.labelsize": 9,
      "legend.fontsize": 8, "legend.frameon": False}


@contextmanager
def figure(n_panels: int = 1, cols: int = 3, panel: tuple[float, float] = (3.6, 2.6)
           ) -> Iterator[tuple[Any, list[Any]]]:
    """A figure with `n_panels` axes on a grid (unused cells hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, n_panels))
    rows = math.ceil(max(n_panels, 1) / cols)
    with matplotlib.rc_context(RC):
        fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[n_panels:]:
            ax.axis("off")
        try:
            yield fig, flat[:n_panels]
        finally:
            plt.close(fig)


def to_svg(fig: Any) -> Html:
    """The figure as an inline `<svg>` element with page-unique, content-derived ids."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    prefix = "p" + hashlib.sha1(text.encode()).hexdigest()[:8] + "-"
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', text)
    return Html(f'<div class="plot">{text}</div>')


def score_histograms(scores: np.ndarray, sources: Sequence[str], selected: np.ndarray) -> Html:
    """Per source: histogram of scores, selected (orange) stacked on not selected (grey); shared bins."""
    scores = np.asarray(scores, dtype=np.float64)
    selected = np.asarray(selected, dtype=bool)
    names = list(dict.fromkeys(sources))
    src = np.asarray(sources, dtype=object)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    with figure(len(names), cols=4, panel=(2.9, 2.0)) as (fig, axes):
        for ax, name in zip(axes, names):
            mine = (src == name) & np.isfinite(scores)
            ax.hist([scores[mine & ~selected], scores[mine & selected]], bins=bins, stacked=True,
                    color=[OTHER, SELECTED], label=["not selected", "selected"])
            ax.set_title(f"{name}  ({int(selected[mine].sum())} / {int(mine.sum())} selected)")
            ax.set_xlabel("score")
        axes[0].set_ylabel("examples")
        axes[0].legend(loc="upper left")
        return to_svg(fig)


def layer_terms(layers: Sequence[int], terms: dict[str, dict[str, Sequence[float]]],
                explained: dict[str, Sequence[float]]) -> Html:
    """NAIT: per capability, each layer's mean term over the pool and over its top 10%; and the
    explained variance of each layer's direction."""
    x = np.arange(len(layers))
    n = len(terms) + (1 if explained else 0)
    with figure(n, cols=2, panel=(5.4, 2.6)) as (fig, axes):
        for ax, (name, t) in zip(axes, terms.items()):
            ax.bar(x - 0.2, t.get("pool_mean", []), width=0.4, color=OTHER, label="pool mean")
            ax.bar(x + 0.2, t.get("top_decile_mean", []), width=0.4, color=SELECTED, label="top 10% by score")
            ax.axhline(0, color=GREY, linewidth=0.6)
            ax.set_xticks(x, [str(v) for v in layers])
            ax.set_xlabel("layer")
            ax.set_ylabel("term in the score")
            ax.set_title(f"{name}: per-layer contribution")
            ax.legend()
        if explained:
            ax = axes[-1]
            for name, values in explained.items():
                ax.plot(x, values, marker="o", markersize=3, label=name)
            ax.set_xticks(x, [str(v) for v in layers])
            ax.set_ylim(0, 1)
            ax.set_xlabel("layer")
            ax.set_title("explained variance of the direction (target drifts)")
            ax.legend()
        return to_svg(fig)


def mask_shares(shares: dict[str, float]) -> Html:
    """XTF: share of response tokens masked per attribute and in all (union)."""
    names = list(shares)
    with figure(1, panel=(5.0, 0.45 * len(names) + 0.8)) as (fig, axes):
        ax = axes[0]
        vals = [100 * float(shares[k]) for k in names]
        ax.barh(range(len(names)), vals, color=[ATTR_COLORS.get(k, GREY) for k in names])
        ax.set_yticks(range(len(names)), [k.upper() if k != "union" else "any" for k in names])
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}%", va="center")
        ax.set_xlim(0, max(vals + [1.0]) * 1.25)
        ax.set_xlabel("% of response tokens masked")
        return to_svg(fig)


def pr_curve(recall: np.ndarray, precision: np.ndarray, base_rate: float, ap: float,
             recall_at_k: np.ndarray) -> Html:
    """Attribution: precision-recall (step, one point per score threshold) and recall in the top k."""
    with figure(2, cols=2, panel=(4.2, 3.0)) as (fig, axes):
        ax = axes[0]
        ax.step(np.r_[0.0, recall], np.r_[precision[0] if len(precision) else 1.0, precision], where="pre",
                color=BLUE, label=f"AUC-PR {ap:.3f}")
        ax.axhline(base_rate, color=GREY, linestyle="--", linewidth=1, label=f"base rate {base_rate:.3f}")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("precision-recall")
        ax.legend(loc="lower left")
        ax = axes[1]
        k = np.arange(1, len(recall_at_k) + 1)
        ax.plot(k, recall_at_k, color=BLUE, label="ranking")
        ax.plot(k, k / max(len(k), 1), color=GREY, linestyle="--", linewidth=1, label="random order (expected)")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("top k of the ranking")
        ax.set_ylabel("share of labelled examples found")
        ax.set_title("recall in the top k")
        ax.legend(loc="lower right")
        return to_svg(fig)


def removal_curve(removal: dict[str, Any]) -> Html:
    """Attribution: the behaviour after retraining without the top / a random fraction; with the
    task loss of the same runs (a removal experiment's `task_loss_*` keys) in a second panel, so
    that a removal which only breaks the model shows."""
    fractions = np.asarray(removal.get("fractions", []), dtype=np.float64) * 100
    panels = [("concept", "behaviour score after retraining", "removal curve")]
    if removal.get("task_loss_after_top_removal"):
        panels.append(("task_loss", "held-out task loss per token", "task loss after retraining"))
    with figure(len(panels), panel=(5.0, 3.0)) as (fig, axes):
        for ax, (name, ylabel, title) in zip(axes, panels):
            if name == "concept":
                top = removal.get("concept_after_top_removal", [])
                runs = removal.get("random_runs") or [[v] for v in removal.get("concept_after_random_removal", [])]
                full = removal.get("full_data")
            else:
                top = removal.get(f"{name}_after_top_removal", [])
                runs = removal.get(f"{name}_random_runs") or [[v] for v in removal.get(f"{name}_after_random_removal", [])]
                full = removal.get(f"{name}_full_data")
            rnd_mean = np.asarray([np.mean(r) for r in runs], dtype=np.float64)
            rnd_std = np.asarray([np.std(r, ddof=1) if len(r) > 1 else 0.0 for r in runs], dtype=np.float64)
            ax.plot(fractions, np.asarray(top, dtype=np.float64), marker="o", color=SELECTED,
                    label="top of the ranking removed")
            ax.errorbar(fractions, rnd_mean, yerr=rnd_std, marker="s", color=GREY, capsize=3, label="random removed")
            if full is not None:
                ax.axhline(float(full), color=BLUE, linestyle="--", linewidth=1, label="full data")
            ax.set_xlabel("% of the pool removed before retraining")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend()
        return to_svg(fig)


def experiment_bars(summary: dict[str, dict[str, Any]], rows: list[dict[str, Any]], columns: Sequence[str],
                    lower_is_better: set[str]) -> Html:
    """Experiment: per metric, each method's mean with a std error bar over seeds and one dot per
    seed; full data as a dashed line."""
    methods = list(summary)
    with figure(len(columns), cols=3, panel=(3.9, 3.0)) as (fig, axes):
        for ax, col in zip(axes, columns):
            means = np.asarray([summary[m].get(col, {}).get("mean", np.nan) for m in methods], dtype=np.float64)
            stds = np.asarray([summary[m].get(col, {}).get("std", 0.0) for m in methods], dtype=np.float64)
            colors = [GREY if m == "base" else BLUE if m == "full" else SELECTED for m in methods]
            x = np.arange(len(methods))
            ax.bar(x, np.nan_to_num(means), yerr=stds, color=colors, capsize=3, alpha=0.85)
            for i, m in enumerate(methods):
                vals = [r[col] for r in rows if r.get("method") == m and isinstance(r.get(col), (int, float))]
                ax.plot([i] * len(vals), vals, "o", color="#1d2433", markersize=2.5)
            if isinstance(summary.get("full", {}).get(col), dict):
                ax.axhline(summary["full"][col]["mean"], color=BLUE, linestyle="--", linewidth=1)
            ax.set_xticks(x, methods, rotation=25, ha="right")
            better = "lower" if col.split("/")[-1] in lower_is_better else "higher"
            ax.set_title(f"{col}\n({better} is better)")
            finite = means[np.isfinite(means)]
            if finite.size and better == "lower":  # losses sit far from 0: zoom on the differences
                pad = 0.15 * (finite.max() - finite.min() + 1e-6) + float(np.nanmax(stds))
                ax.set_ylim(finite.min() - pad, finite.max() + pad)
        return to_svg(fig)
