"""Attribution metrics: how well a ranking recovers the examples known to carry a behaviour.

- `average_precision` (AUC-PR): sum over score thresholds of (recall step) x precision, ties
  grouped as one threshold (the step-wise area, as scikit-learn's `average_precision_score`);
- `precision_at_k`, `recall_curve`: the top k of the ranking (ties broken by pool order);
- `removal_experiment`: Concept Influence's causal check (arXiv 2602.14869, evaluation): retrain
  without the top-k% of the ranking and without a seeded random k%, and measure the concept
  score of the retrained model on held-out prompts. Training and measuring are passed in as
  functions, so this module stays free of models and files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
class RemovalResult:
    """Concept score of models retrained without the top / a random fraction of the pool."""

    fractions: list[float]
    top: list[float]
    random: list[list[float]]
    removed_positives_top: list[int] = field(default_factory=list)
    baseline: float | None = None

    def summary(self) -> dict[str, Any]:
        rnd = [float(np.mean(r)) for r in self.random]
        return {"fractions": self.fractions, "concept_after_top_removal": self.top,
                "concept_after_random_removal": rnd, "random_runs": self.random,
                "removed_positives_top": self.removed_positives_top, "full_data": self.baseline,
                "drop_vs_random": [r - t for t, r in zip(self.top, rnd)]}


def removal_experiment(
    ids: Sequence[str],
    scores: np.ndarray,
    fractions: Sequence[float],
    retrain: Callable[[list[str]], Any],
    measure: Callable[[Any], float],
    random_repeats: int = 1,
    seed: int = 0,
    labels: np.ndarray | None = None,
    with_baseline: bool = False,
) -> RemovalResult:
    """For each fraction f: retrain on the pool without its top f (by `scores`) and without a
    seeded random f, and `measure` each retrained model (the concept score of its responses to
    held-out prompts). `retrain(kept_ids) -> model`; the behaviour should drop more under top
    removal. With `with_baseline`, the model trained on everything is measured too.
    """
    ids = list(ids)
    scores = np.asarray(scores, dtype=np.float64)
    if len(ids) != len(scores):
        raise DataError(f"{len(ids)} ids but {len(scores)} scores; one score per example")
    order = ranking(scores)
    rng = np.random.default_rng(seed)
    result = RemovalResult(list(fractions), [], [])
    if with_baseline:
        result.baseline = float(measure(retrain(ids)))
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ConfigError(f"removal fraction {f} must be in (0, 1)")
        k = int(round(f * len(ids)))
        drop = set(order[:k].tolist())
        result.top.append(float(measure(retrain([i for j, i in enumerate(ids) if j not in drop]))))
        if labels is not None:
            result.removed_positives_top.append(int(np.asarray(labels)[order[:k]].sum()))
        runs = []
        for _ in range(random_repeats):
            rdrop = set(rng.choice(len(ids), size=k, replace=False).tolist())
            runs.append(float(measure(retrain([i for j, i in enumerate(ids) if j not in rdrop]))))
        result.random.append(runs)
    return result
