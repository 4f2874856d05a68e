"""Token maskers as consumers of the shared feature pass, and one pool pass for selection methods
and token maskers together.

A `ForwardMasker` (XTF, excess loss) scores tokens in two steps: `feature_passes` names the
per-token features (capture.token_features) it reads from each model (the base model first; the
excess loss also reads its reference model), and `from_features` turns their arrays into
TokenScores with the masker's own post-processing (context-free TR, numeric protection, span
smoothing, the excess-loss difference). `score` is those two over already rendered examples, with
an optional FeatureCache; run alone, a masker's scores are what they were before it had features.

`score_and_mask` runs the features of any number of forward-only scorers (scorers.base.
ForwardScorer) and token maskers in one `feature_pass` per pass key over the pool: a masker's
per-token features share the scorers' pass (the same render and batching), except XTF's RI, which
needs eager attention and gets a pass of its own, and anything read from another model (the
excess loss's reference), which is another model's pass.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mechsieve.capture.shared import Feature, PassKey, PassReport, feature_pass, render_inputs
from mechsieve.config import ConfigError
from mechsieve.data.records import Pool
from mechsieve.data.render import RenderConfig, Rendered
from mechsieve.models.loading import LoadedModel
from mechsieve.tokens.base import TokenMasker, TokenScores

SEP = "\x1f"
"""Joins a label and its own feature name into one name of a shared pass (as scorers.many)."""


class ModelFeatures(NamedTuple):
    """The features a masker reads from one model's pass over the pool."""

    loaded: LoadedModel
    features: dict[str, Feature]


def as_loaded(model: Any, tokenizer: Any, identity: dict[str, Any] | None = None) -> LoadedModel:
    """`model` (a LoadedModel or a bare module) as a LoadedModel with `tokenizer`; `identity`, when
    given, replaces its identity (the FeatureCache keys entries by it)."""
    if isinstance(model, LoadedModel):
        return model if identity is None else LoadedModel(model.model, model.tokenizer, dict(identity), model.config)
    return LoadedModel(model, tokenizer, dict(identity or {}))


def rendered_key(max_tokens: int, max_batch: int) -> PassKey:
    """The pass key of a masker's own pass over examples it is given rendered: only the batching
    counts; the render is nominal (the default RenderConfig) since the data fingerprint
    (capture.token_features.rendered_fingerprint) has the tokens, so maskers with equal batching
    share their cache entries (XTF's KN is the excess loss's base NLL)."""
    return PassKey(RenderConfig(), max_tokens, max_batch)


def pass_summary(reports: Sequence[PassReport]) -> dict[str, Any]:
    """Tokens, seconds and batches of some passes, and how many features they computed / read cached."""
    passes = [p for r in reports for p in r.passes]
    return {"tokens": int(sum(p["tokens"] for p in passes)), "seconds": round(sum(r.seconds for r in reports), 2),
            "batches": int(sum(p.get("batches", 0) for p in passes)), "passes": len(passes),
            "features_computed": sum(len(r.computed) for r in reports),
            "features_cached": sum(len(r.cached) for r in reports)}


class ForwardMasker(TokenMasker):
    """A TokenMasker whose scoring is per-token features of forward passes plus post-processing
    (see the module docstring)."""

    @abstractmethod
    def feature_passes(self, loaded: LoadedModel, key: PassKey | None = None, *, cache: Any = None,
                       progress: bool = True) -> list[ModelFeatures]:
        """The features of the pool's passes, per model (`loaded`'s first). `key`: the pass key of
        a shared pass (its render and batching); None: the masker's own batching settings, for
        examples it is given rendered. `cache` / `progress` are for target-side passes."""

    @abstractmethod
    def from_features(self, loaded: LoadedModel, rendered: Sequence[Rendered], arrays: dict[str, dict[str, np.ndarray]],
                      reports: list[PassReport]) -> TokenScores:
        """TokenScores of `rendered` from the features' arrays (by name) and the passes' reports
        (one per entry of feature_passes); the model is for post-processing only (context-free TR)."""

    def score(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], progress: bool = True, *,
              cache: Any = None, identity: dict[str, Any] | None = None) -> TokenScores:
        """Score `rendered` through the features' passes. `model`: a LoadedModel or a module;
        `cache`: a store.features.FeatureCache, keyed by the model's identity (a LoadedModel's, or
        `identity`) and the rendered tokens."""
        loaded = as_loaded(model, tokenizer, identity)
        if cache is not None and not loaded.identity:
            raise ConfigError(f"{self.name}: a feature cache keys entries by the model's identity: pass a LoadedModel "
                              "or identity=..., or no cache")
        start = time.perf_counter()
        fingerprint = None
        if cache is not None:
            from mechsieve.capture.token_features import rendered_fingerprint

            fingerprint = rendered_fingerprint(rendered)
        arrays: dict[str, dict[str, np.ndarray]] = {}
        reports: list[PassReport] = []
        for part in self.feature_passes(loaded, None, cache=cache, progress=progress):
            got, report = feature_pass(part.loaded, list(rendered), part.features, cache=cache,
                                       data_fingerprint=fingerprint, progress=progress, desc=self.name)
            arrays.update(got)
            reports.append(report)
        scores = self.from_features(loaded, rendered, arrays, reports)
        scores.info["seconds"] = round(time.perf_counter() - start, 2)
        return scores


@dataclass
class SharedRun:
    """What `score_and_mask` produced: each scorer's ScoreResult and each masker's TokenScores (by
    label), the pool as the token scores are aligned with (rendered with the pass key), a report."""

    scores: dict[str, Any]
    token_scores: dict[str, TokenScores]
    rendered: list[Rendered]
    report: dict[str, Any] = field(default_factory=dict)


def shared_key(features: Sequence[Feature]) -> PassKey | None:
    """The pass key the features over whole examples at the residual stream share (None without
    any); several different ones are refused: the maskers could not share a pass with all of them."""
    keys = {f.key.id(): f.key for f in features if f.key.inputs == "example" and f.key.site == "resid"}
    if len(keys) > 1:
        raise ConfigError("the scorers render or batch the pool differently (render / max_tokens / max_batch), so "
                          "the token maskers cannot share one pass with all of them: give key= (a capture.shared."
                          "PassKey) or the same render and batching settings to every method")
    return next(iter(keys.values()), None)


def _own(arrays: Mapping[str, dict[str, np.ndarray]], label: str) -> dict[str, dict[str, np.ndarray]]:
    return {n.split(SEP, 1)[1]: a for n, a in arrays.items() if n.split(SEP, 1)[0] == label}


def score_and_mask(scorers: Mapping[str, Any], maskers: Mapping[str, ForwardMasker], pool: Pool, *,
                   target: Pool | None = None, loaded: LoadedModel, seed: int = 0, cache: Any = None,
                   key: PassKey | None = None, progress: bool = True) -> SharedRun:
    """Score `pool` with the forward-only scorers (label -> scorers.base.ForwardScorer) and its tokens
    with the maskers (label -> ForwardMasker) from one feature pass per pass key.

    `key`: the pass key of the maskers' features (render and batching); default: the one the
    scorers' features share. The maskers' token scores are aligned with the pool rendered with
    `key.render` (SharedRun.rendered). `cache`: a store.features.FeatureCache. Each method's scores
    are those it gives alone with the same render and batching settings (tested; XTF's KN and
    contextual TR, which alone ride in RI's eager pass, differ from it by float rounding only).
    The report has the shared pass(es) and those of other models (the excess loss's reference).
    """
    from mechsieve.scorers.base import ForwardScorer
    from mechsieve.scorers.many import prepare_many

    others = [label for label, s in scorers.items() if not isinstance(s, ForwardScorer)]
    if others:
        raise ConfigError(f"score_and_mask shares a forward pass; {others} are not forward-only scorers: score them "
                          "with scorers.many.score_many")
    if set(scorers) & set(maskers):
        raise ConfigError(f"labels {sorted(set(scorers) & set(maskers))} name both a scorer and a masker; rename one")
    for scorer in scorers.values():
        scorer.check_inputs(pool, target, loaded)
    states, prepared = prepare_many(scorers, pool, target=target, loaded=loaded, seed=seed, progress=progress)
    wanted = {f"{label}{SEP}{name}": feat for label, scorer in scorers.items()
              for name, feat in scorer.features(states[label], loaded).items()}
    key = key or shared_key(list(wanted.values()))
    if key is None and maskers:
        raise ConfigError("score_and_mask: no scorer reads whole examples at the residual stream to take the render "
                          "and batching from: give key=capture.shared.PassKey(render, max_tokens, max_batch)")
    elsewhere: dict[str, list[ModelFeatures]] = {}
    for label, masker in maskers.items():
        first, *rest = masker.feature_passes(loaded, key, cache=cache, progress=progress)
        if first.loaded is not loaded:
            raise ValueError(f"{label}: a masker's first features must be read from the base model")
        wanted.update({f"{label}{SEP}{name}": feat for name, feat in first.features.items()})
        elsewhere[label] = rest
    fingerprint = pool.fingerprint()
    arrays, shared = feature_pass(loaded, pool.examples, wanted, cache=cache, data_fingerprint=fingerprint,
                                  progress=progress, desc="shared pass")
    results = {}
    for label, scorer in scorers.items():
        part = scorer.from_features(pool, states[label], _own(arrays, label), shared.seconds, loaded)
        results[label] = scorer.combine([part], states[label])
    rendered = render_inputs(pool.examples, loaded.tokenizer, key) if maskers else []
    token_scores, other_reports = {}, []
    for label, masker in maskers.items():
        mine, reports = _own(arrays, label), [shared]
        for part in elsewhere[label]:  # another model: another pass
            got, report = feature_pass(part.loaded, pool.examples, part.features, cache=cache,
                                       data_fingerprint=fingerprint, progress=progress, desc=f"{label}: other model")
            mine.update(got)
            reports.append(report)
            other_reports.append(report.summary())
        token_scores[label] = masker.from_features(loaded, rendered, mine, reports)
    report = {"shared": shared.summary(), "other_models": other_reports,
              "prepare_seconds": {label: round(s, 4) for label, s in prepared.items()}}
    return SharedRun(results, token_scores, rendered, report)
