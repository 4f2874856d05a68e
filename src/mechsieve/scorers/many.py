"""Several methods, one forward pass: `score_many` scores a pool with any set of scorers, and the
forward-only ones (`ForwardScorer`: nait, rds, loss, ifd, vector-filter, igds) read their pool
features from one shared pass (capture.shared.feature_pass) instead of one pass each.

Each scorer still runs its own `prepare` (target-side work: directions, a concept, an SAE and its
kept latents) and its own `combine`; only the pool's forward pass is shared, so every method's
scores are those it gives alone (tested). Scorers that are not forward-only (LESS, grad-sim,
influence, k-center, random, full, ...) are scored as they are, one after the other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mechsieve.data.records import Pool
from mechsieve.scorers.base import ForwardScorer, Scorer, ScoreResult, ShardState

SEP = "\x1f"
"""Joins a method's label and its own feature name into one name of the shared pass."""


def shard_many(scorers: Mapping[str, ForwardScorer], states: Mapping[str, ShardState], shard: Pool, loaded: Any,
               *, cache: Any = None, fingerprint: str | None = None, progress: bool = True
               ) -> tuple[dict[str, ScoreResult], Any]:
    """One shared pass over `shard` for the features of every scorer (label -> scorer, with its
    prepared state); returns (label -> the shard's ScoreResult, the pass's PassReport)."""
    from mechsieve.capture.shared import feature_pass

    wanted = {f"{label}{SEP}{name}": feat for label, scorer in scorers.items()
              for name, feat in scorer.features(states[label], loaded).items()}
    arrays, report = feature_pass(loaded, shard.examples, wanted, cache=cache, data_fingerprint=fingerprint,
                                  progress=progress, desc="shared pass")
    parts = {}
    for label, scorer in scorers.items():
        mine = {key.split(SEP, 1)[1]: value for key, value in arrays.items() if key.split(SEP, 1)[0] == label}
        parts[label] = scorer.from_features(shard, states[label], mine, report.seconds, loaded)
    return parts, report


def prepare_many(scorers: Mapping[str, ForwardScorer], pool: Pool, *, target: Pool | None, loaded: Any, seed: int,
                 progress: bool) -> tuple[dict[str, ShardState], dict[str, float]]:
    """Each scorer's `prepare` (label -> state) and its seconds."""
    states, seconds = {}, {}
    for label, scorer in scorers.items():
        start = time.perf_counter()
        states[label] = scorer.prepare(pool, target=target, loaded=loaded, seed=seed, progress=progress)
        seconds[label] = time.perf_counter() - start
    return states, seconds


def score_many(scorers: Mapping[str, Scorer], pool: Pool, *, target: Pool | None = None, loaded: Any = None,
               seed: int = 0, cache: Any = None, progress: bool = True) -> tuple[dict[str, ScoreResult], dict[str, Any]]:
    """Score `pool` with every scorer of `scorers` (label -> Scorer; a label is usually the method's
    name); the forward-only ones share one pool pass. `cache`: a store.features.FeatureCache, so a
    later call with one more method computes only its missing features.

    Returns (label -> ScoreResult over the whole pool, report): the report has the shared pass's
    passes (layers, whether it ran to the logits, tokens, seconds), the features computed and those
    read from the cache, and each method's prepare / own seconds.
    """
    for scorer in scorers.values():
        scorer.check_inputs(pool, target, loaded)
    forward = {label: s for label, s in scorers.items() if isinstance(s, ForwardScorer)}
    results: dict[str, ScoreResult] = {}
    report: dict[str, Any] = {"shared": sorted(forward), "methods": {}}
    if forward:
        states, prepared = prepare_many(forward, pool, target=target, loaded=loaded, seed=seed, progress=progress)
        parts, passed = shard_many(forward, states, pool, loaded, cache=cache, fingerprint=pool.fingerprint(),
                                   progress=progress)
        for label, scorer in forward.items():
            results[label] = scorer.combine([parts[label]], states[label])
            report["methods"][label] = {"prepare_seconds": round(prepared[label], 4)}
        report["pass"] = passed.summary()
    for label, scorer in scorers.items():
        if label in forward:
            continue
        start = time.perf_counter()
        results[label] = scorer.score(pool, target=target, loaded=loaded, seed=seed, progress=progress)
        report["methods"][label] = {"own_seconds": round(time.perf_counter() - start, 4)}
    return {label: results[label] for label in scorers}, report
