"""Attribution metrics: how well a ranking recovers the examples known to carry a behaviour.

- `average_precision` (AUC-PR): sum over score thresholds of (recall step) x precision, ties
  grouped as one threshold (the step-wise area, as scikit-learn's `average_precision_score`);
- `precision_at_k`, `recall_curve`: the top k of the ranking (ties broken by pool order);
- `removal_experiment`: Concept Influence's causal check (arXiv 2602.14869, evaluation): retrain
  without the top-k% of the ranking and without a seeded random k%, and measure the concept
  score of the retrained model on held-out prompts, and any further measure of the same runs
  (task loss). Training and measuring are passed in as functions, so this module stays free of
  models and files; evaluate/removal.py passes the real ones (LoRA retraining, generation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechsieve.config import ConfigError
from mechsieve.data.readers import DataError


def _check(scores: np.ndarray, labels: np.ndarray, method: str = "") -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise DataError(f"{scores.size} scores for {labels.size} labels: scores {scores.shape} and labels "
                        f"{labels.shape} must be the same 1-d shape, one of each per example")
    bad = np.flatnonzero(np.isnan(scores))
    if bad.size:
        raise DataError(f"{method or 'the scorer'} gave NaN scores to {bad.size} of {scores.size} examples "
                        f"(first at position {int(bad[0])}); no ranking metric is defined on them. Likely "
                        "causes: examples left without response tokens (raise max_len), or a concept / "
                        "gradient that is zero or overflowed (check the model's dtype)")
    return scores, labels


def ranking(scores: np.ndarray) -> np.ndarray:
    """Indices from the highest score down; ties keep pool order (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def ranks(scores: np.ndarray) -> np.ndarray:
    """rank[i] = 1 + position of example i in `ranking(scores)`."""
    order = ranking(scores)
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC-PR as average precision, tied scores forming one threshold; NaN without positives."""
    scores, labels = _check(scores, labels)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    # the last index of each group of equal scores is where a threshold sits
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp_at, n_at = tp[last], last + 1
    precision = tp_at / n_at
    recall = tp_at / n_pos
    steps = np.diff(np.r_[0.0, recall])
    return float((steps * precision).sum())


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of positives among the k highest-scored examples."""
    scores, labels = _check(scores, labels)
    if not 1 <= k <= len(scores):
        raise ConfigError(f"precision@k: k={k} must be in 1..{len(scores)} (the number of examples)")
    return float(labels[ranking(scores)[:k]].mean())


def recall_curve(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """recall[k-1]: share of all positives found in the top k, for k = 1..n -> [n]."""
    scores, labels = _check(scores, labels)
    n_pos = max(int(labels.sum()), 1)
    return np.cumsum(labels[ranking(scores)]) / n_pos


def attribution_metrics(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (10, 40),
                        method: str = "") -> dict[str, Any]:
    """AUC-PR, precision@k for each k (that fits), the base rate, and recall at those k.

    DataError (a user's error, not NaN metrics) for NaN scores, naming `method`, and for labels
    without a single positive, under which AUC-PR and recall are undefined.
    """
    scores, labels = _check(scores, labels, method)
    if not labels.any():
        raise DataError(f"none of the {len(labels)} examples is labelled positive, so AUC-PR and recall are "
                        "undefined; check that label_field (--label-field) names the record field that is "
                        "true for the known behaviour carriers")
    curve = recall_curve(scores, labels)
    out: dict[str, Any] = {"auc_pr": average_precision(scores, labels),
                           "base_rate": float(labels.mean()), "n": int(len(labels)),
                           "positives": int(labels.sum())}
    for k in ks:
        if 1 <= k <= len(scores):
            out[f"precision@{k}"] = precision_at_k(scores, labels, k)
            out[f"recall@{k}"] = float(curve[k - 1])
    return out


@dataclass
class MeasureRuns:
    """One measure (a named number of a retrained model) over the runs of a removal experiment."""

    top: list[float] = field(default_factory=list)
    """Per fraction: the model retrained without the top of the ranking."""
    random: list[list[float]] = field(default_factory=list)
    """Per fraction: one value per random removal of the same size."""
    baseline: float | None = None
    """The model retrained on the whole pool (None: not run)."""


def _mean_std(runs: list[list[float]]) -> tuple[list[float], list[float | None]]:
    """Per fraction: mean and sample std (ddof=1; None with a single run) of the random runs."""
    means = [float(np.mean(r)) for r in runs]
    stds = [float(np.std(r, ddof=1)) if len(r) > 1 else None for r in runs]
    return means, stds


@dataclass
class RemovalResult:
    """The behaviour (concept score) of models retrained without the top / a random fraction of
    the pool; `others` holds any further measures of the same runs (e.g. `task_loss`)."""

    fractions: list[float]
    top: list[float]
    random: list[list[float]]
    removed_positives_top: list[int] = field(default_factory=list)
    baseline: float | None = None
    others: dict[str, MeasureRuns] = field(default_factory=dict)
    """Measures besides the primary one, by name, over the same runs."""
    removed: list[int] = field(default_factory=list)
    """Per fraction: how many examples each run removed."""
    removed_positives_random: list[list[int]] = field(default_factory=list)
    """Per fraction: labelled positives among each random removal (with labels)."""

    def summary(self) -> dict[str, Any]:
        """JSON-able: the primary measure under the `concept_*` keys (as before), the random runs'
        sample std (ddof=1, None with one run), and each other measure `m` as `m_after_top_removal`,
        `m_after_random_removal` (mean), `m_random_std`, `m_random_runs`, `m_full_data`."""
        rnd, std = _mean_std(self.random)
        out: dict[str, Any] = {
            "fractions": self.fractions, "removed": self.removed, "concept_after_top_removal": self.top,
            "concept_after_random_removal": rnd, "concept_random_std": std, "random_runs": self.random,
            "removed_positives_top": self.removed_positives_top,
            "removed_positives_random": self.removed_positives_random, "full_data": self.baseline,
            "drop_vs_random": [r - t for t, r in zip(self.top, rnd)], "measures": ["concept", *self.others]}
        for name, runs in self.others.items():
            mean, sd = _mean_std(runs.random)
            out.update({f"{name}_after_top_removal": runs.top, f"{name}_after_random_removal": mean,
                        f"{name}_random_std": sd, f"{name}_random_runs": runs.random,
                        f"{name}_full_data": runs.baseline})
        return out


Measured = float | Mapping[str, float]


def removal_experiment(
    ids: Sequence[str],
    scores: np.ndarray,
    fractions: Sequence[float],
    retrain: Callable[[list[str]], Any],
    measure: Callable[[Any], Measured],
    random_repeats: int = 1,
    seed: int = 0,
    labels: np.ndarray | None = None,
    with_baseline: bool = False,
    primary: str = "concept",
    log: Callable[[str], None] | None = None,
) -> RemovalResult:
    """For each fraction f: retrain on the pool without its top f (by `scores`) and without
    `random_repeats` seeded random draws of the same size, and `measure` each retrained model (the
    concept score of its responses to held-out prompts). `retrain(kept_ids) -> model`; the
    behaviour should drop more under top removal. With `with_baseline`, the model trained on
    everything is measured too (first).

    `measure` returns a number, or a mapping of named numbers (e.g. {"concept": .., "task_loss":
    ..}) in which `primary` is the behaviour (`top`, `random`, `baseline`) and the others go to
    `others`. `log`, if given, gets a line before each retrain and one with its measures.
    """
    ids = list(ids)
    scores = np.asarray(scores, dtype=np.float64)
    if len(ids) != len(scores):
        raise DataError(f"{len(ids)} ids but {len(scores)} scores; one score per example")
    sizes = []
    for f in fractions:  # every fraction checked before the first (long) retrain
        if not 0.0 < f < 1.0:
            raise ConfigError(f"removal fraction {f} must be in (0, 1)")
        k = int(round(f * len(ids)))
        if not 0 < k < len(ids):
            raise ConfigError(f"removal fraction {f} of {len(ids)} examples removes {k}; give a fraction that "
                              f"removes at least one example and keeps at least one")
        sizes.append(k)
    if random_repeats < 1:
        raise ConfigError(f"random_repeats={random_repeats} must be >= 1: top removal is compared with random "
                          "removal of the same size")
    order = ranking(scores)
    pos = None if labels is None else np.asarray(labels).astype(bool)
    if pos is not None and pos.shape != scores.shape:
        raise DataError(f"{pos.size} labels for {scores.size} scores; one label per example")
    rng = np.random.default_rng(seed)
    result = RemovalResult(list(fractions), [], [], removed=sizes)
    total = len(sizes) * (1 + random_repeats) + int(with_baseline)
    done = 0
    names: list[str] = []

    def run(dropped: np.ndarray, what: str) -> dict[str, float]:
        nonlocal done
        done += 1
        drop = set(dropped.tolist())
        kept = [i for j, i in enumerate(ids) if j not in drop]
        if log is not None:
            log(f"[removal {done}/{total}] {what}: retraining on {len(kept)} of {len(ids)} examples")
        values = _as_measures(measure(retrain(kept)), primary)
        if names and list(values) != names:
            raise DataError(f"the removal measure returned {list(values)} after {names} in an earlier run; it must "
                            "return the same measures for every retrained model")
        names[:] = list(values)
        if log is not None:
            log(f"[removal {done}/{total}] {what}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return values

    def record(values: dict[str, float], where: str) -> None:
        for name, value in values.items():
            if name == primary:
                continue
            runs = result.others.setdefault(name, MeasureRuns())
            if where == "baseline":
                runs.baseline = value
            elif where == "top":
                runs.top.append(value)
            else:
                if len(runs.random) < len(result.random):
                    runs.random.append([])
                runs.random[-1].append(value)

    if with_baseline:
        values = run(np.zeros(0, dtype=np.int64), "full pool")
        result.baseline = values[primary]
        record(values, "baseline")
    for f, k in zip(fractions, sizes):
        values = run(order[:k], f"top {f:g} removed")
        result.top.append(values[primary])
        record(values, "top")
        if pos is not None:
            result.removed_positives_top.append(int(pos[order[:k]].sum()))
        result.random.append([])
        if pos is not None:
            result.removed_positives_random.append([])
        for r in range(random_repeats):
            rdrop = rng.choice(len(ids), size=k, replace=False)
            values = run(rdrop, f"random {f:g} removed ({r + 1}/{random_repeats})")
            result.random[-1].append(values[primary])
            record(values, "random")
            if pos is not None:
                result.removed_positives_random[-1].append(int(pos[rdrop].sum()))
    return result


def _as_measures(value: Measured, primary: str) -> dict[str, float]:
    """A measure's return value as {name: float}, the primary one first."""
    if isinstance(value, Mapping):
        if primary not in value:
            raise KeyError(f"the removal measure returned {sorted(value)} without the primary measure {primary!r}")
        return {primary: float(value[primary]), **{str(k): float(v) for k, v in value.items() if k != primary}}
    return {primary: float(value)}
