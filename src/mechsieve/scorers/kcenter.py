"""Diversity baseline: greedy k-center (farthest-point traversal) on any feature matrix.

Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach"
(ICLR 2018): repeatedly add the point farthest from the chosen centres, a 2-approximation of the
k-center problem. As a scorer it ranks the whole pool in pick order: the score of a centre is its
distance to the centres chosen before it (the coverage radius it closes), so the top-k by score
is the greedy k-center solution for every k. Differences: the first centre is the point nearest
the feature mean (not a random one), so the result needs no seed and ignores pool order; with
`max_centers` the traversal stops early and the rest are scored by their distance to the
nearest centre (always below the last centre's score).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Pool
from mechsieve.scorers.base import Scorer, ScoreResult
from mechsieve.scorers.baselines import pooled_last_layer, unit_rows
from mechsieve.scorers.common import ModelScorerConfig


def kcenter_greedy(features: np.ndarray, ids: list[str] | None = None, max_centers: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-point traversal of `features: [n, d]`.

    Returns (scores [n] float64, order [m] indices of the centres in pick order). The first
    centre scores its largest distance to any point plus one, so it stays first.
    """
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-center on an empty feature matrix")
    ids = ids or [f"{i:012d}" for i in range(n)]
    tie = np.empty(n, dtype=np.int64)
    tie[np.argsort(np.asarray(ids, dtype=object), kind="stable")] = np.arange(n)
    m = n if max_centers <= 0 else min(max_centers, n)
    to_mean = np.linalg.norm(x - x.mean(axis=0), axis=1)
    first = int(np.lexsort((tie, to_mean))[0])
    dist = np.linalg.norm(x - x[first], axis=1)
    scores = np.zeros(n, dtype=np.float64)
    scores[first] = float(dist.max()) + 1.0
    picked = np.zeros(n, dtype=bool)
    picked[first] = True
    order = [first]
    for _ in range(m - 1):
        cand = np.where(picked, -1.0, dist)
        best = int(np.lexsort((tie, -cand))[0])  # farthest; ties by id
        scores[best] = dist[best]
        picked[best] = True
        order.append(best)
        dist = np.minimum(dist, np.linalg.norm(x - x[best], axis=1))
    scores[~picked] = dist[~picked]
    return scores, np.asarray(order, dtype=np.int64)


@dataclass
class KCenterConfig(ModelScorerConfig):
    """Settings of k-center: the features (by default RDS+ embeddings) and the traversal."""

    pooling: Literal["mean_all", "mean_response"] = "mean_all"
    """Model features: mean over every token, or over the response tokens, of the last layer."""
    apply_final_norm: bool = True
    """Model features: pool the last layer after the model's final norm."""
    metric: Literal["cosine", "euclidean"] = "cosine"
    """`cosine`: distances between unit-normalised features; `euclidean`: raw features."""
    max_centers: int = 0
    """Stop the traversal after this many centres (0 = rank the whole pool)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("kcenter.pooling", self.pooling, ("mean_all", "mean_response"))
        check_choice("kcenter.metric", self.metric, ("cosine", "euclidean"))
        if self.max_centers < 0:
            raise ConfigError("kcenter.max_centers must be >= 0")


class KCenterScorer(Scorer):
    """Greedy k-center (Sener & Savarese 2018) on any feature matrix; see the module docstring.

    `KCenterScorer(cfg, features=array)` uses a given [n, d] matrix (aligned with the pool);
    otherwise the features are mean-pooled last-layer states of the model (as RDS+).
    """

    name = "kcenter"
    config_cls = KCenterConfig
    needs_model = True  # unless features are given (see check_inputs)

    def __init__(self, config: Any = None, features: np.ndarray | None = None) -> None:
        super().__init__(config)
        self.features = features

    def check_inputs(self, pool: Pool, target: Pool | None, loaded: Any) -> None:
        super().check_inputs(pool, target, loaded if self.features is None else True)

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, target, loaded)
        t0 = time.perf_counter()
        if self.features is not None:
            feats = np.asarray(self.features, dtype=np.float64)
            if feats.shape[0] != len(pool.examples):
                raise ValueError(f"kcenter: {feats.shape[0]} feature rows for {len(pool.examples)} examples")
        else:
            feats = pooled_last_layer(loaded, pool.examples, self.config, progress, "kcenter: pool")
        t1 = time.perf_counter()
        if self.config.metric == "cosine":
            feats = unit_rows(feats)
        scores, order = kcenter_greedy(feats, [ex.id for ex in pool.examples], self.config.max_centers)
        return ScoreResult(scores, {"centres": len(order), "radius_after": float(scores[order[-1]]) if
                                    len(order) > 1 else None},
                           {"features": t1 - t0, "traversal": time.perf_counter() - t1})
