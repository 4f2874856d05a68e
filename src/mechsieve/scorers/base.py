"""The scorer contract: a pool (and its settings) in, one float per example out.

A scorer is a class with a settings dataclass (`Scorer.config_cls`, names paired: `NaitConfig` /
`Nait`) and one required method, `score`. Class attributes say what it needs: `needs_model`
(a `LoadedModel`, run through `mechsieve.capture`), `needs_target` (an in-domain target pool), and
`default_order` (`top`: high scores are selected first; `bottom`: low scores are).

Sharded scoring (`ShardedScorer`, `shardable = True`): `score` splits into three parts so an engine
(mechsieve.engine) can score shards of the pool in other processes or on other machines:
`prepare` (target-derived, once, on the driver) -> a state of JSON values and numpy arrays;
`score_shard(shard, state, loaded)` per shard (one model per worker); `combine(parts, state)` on
the driver. `score` is exactly those three over the whole pool, so there is one code path.

Forward-only scorers (`ForwardScorer`: nait, rds, loss, ifd, vector-filter, igds) go one step
further: their shard work is `features` (what they read from a forward pass: capture.shared
Features) and `from_features` (pure math on those arrays), so that `scorers.many.score_many`
computes the features of several methods in one shared pass; run alone, a scorer computes its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from mechsieve.config import from_dict, to_dict
from mechsieve.data.records import Pool


class ScorerError(ValueError):
    """A scorer was called without what it needs (a model, a target set) or on an unusable pool."""


@dataclass
class NoSettings:
    """A scorer without settings."""


@dataclass
class ScoreResult:
    """scores: [n] float64 aligned with `pool.examples`.

    per_target: optional [n, c] float64, one column per target capability (selection then takes
    the union of per-capability top-k); target_names names the columns. explanations: JSON-able
    method-specific details; timings: seconds per phase.
    """

    scores: np.ndarray
    explanations: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    per_target: np.ndarray | None = None
    target_names: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-example side arrays (first axis n) a sharded scorer's `combine` reads (e.g. NAIT's
    per-layer projections, normalised over the whole pool); not part of the selection."""


ShardState = dict[str, Any]
"""What `prepare` hands to `score_shard`: JSON-able values and numpy arrays at the top level (the
engine saves it beside the shards and ships it to every worker). `explanations` / `timings` keys,
when present, are the prepare part's and end up in the combined result."""


class Scorer(ABC):
    """Base of every scorer; see the module docstring."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = NoSettings
    needs_model: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False
    default_order: ClassVar[Literal["top", "bottom"]] = "top"
    shardable: ClassVar[bool] = False
    """True for `ShardedScorer`s: the engine may score shards of the pool in other processes."""

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.config_cls()
        elif isinstance(config, dict):
            config = from_dict(self.config_cls, config, prefix=f"{self.name}.")
        self.config = config

    @property
    def order(self) -> Literal["top", "bottom"]:
        """Which end of the scores is selected first; a setting may change it (loss: low)."""
        return self.default_order

    def settings(self) -> dict[str, Any]:
        """JSON-able settings, recorded beside every selection."""
        return to_dict(self.config)

    @abstractmethod
    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        """Score every example of `pool`: ScoreResult.scores is [len(pool)] float64."""

    def check_inputs(self, pool: Pool, target: Pool | None, loaded: Any) -> None:
        """Refuse an empty pool, or a call without the model / target this scorer needs."""
        if len(pool.examples) == 0:
            raise ScorerError(f"{self.name}: the pool is empty; nothing to score")
        if self.needs_model and loaded is None:
            raise ScorerError(f"{self.name} reads the model: pass loaded=mechsieve.models.load_model(...) "
                              "(the CLI loads --model, default smollm2-135m-instruct)")
        if self.needs_target and (target is None or len(target.examples) == 0):
            raise ScorerError(f"{self.name} scores against a target set: pass target= a pool of "
                              "in-domain examples (CLI: --target FILE)")


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def combine_parts(parts: list[ScoreResult], state: ShardState) -> ScoreResult:
    """The default `combine`: scores, per_target and arrays concatenated in shard order; numeric
    explanations and timings of the parts summed (shard explanations are counts; anything else
    belongs in state["explanations"]), then the prepare part's explanations and timings added."""
    if not parts:
        raise ScorerError("nothing to combine: no shard results")
    scores = np.concatenate([np.asarray(p.scores, dtype=np.float64) for p in parts])
    per_target = (np.concatenate([p.per_target for p in parts]) if parts[0].per_target is not None else None)
    arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays}
    explanations: dict[str, Any] = dict(state.get("explanations", {}))
    for key, value in parts[0].explanations.items():
        values = [p.explanations.get(key) for p in parts]
        explanations[key] = sum(values) if all(_is_count(v) for v in values) else value
    timings: dict[str, float] = dict(state.get("timings", {}))
    for p in parts:
        for key, value in p.timings.items():
            timings[key] = timings.get(key, 0.0) + float(value)
    names = parts[0].target_names or list(state.get("target_names", []))
    return ScoreResult(scores, explanations, timings, per_target, names, arrays)


class ShardedScorer(Scorer):
    """A scorer whose work splits into `prepare` (driver) + `score_shard` (any worker) + `combine`
    (driver); see the module docstring. Scorers that need the whole pool at once (k-center,
    influence, seeded sampling) are plain `Scorer`s: the engine runs them on the driver (local) or
    refuses them (ray)."""

    shardable: ClassVar[bool] = True

    @abstractmethod
    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        """Everything that does not depend on a shard (directions, a concept, target embeddings,
        chosen SAE features), computed once; `pool` is there for methods that fit on it (IGDS
        training its SAE) and is not to be scored here."""

    @abstractmethod
    def score_shard(self, shard: Pool, state: ShardState, loaded: Any = None, progress: bool = True
                    ) -> ScoreResult:
        """Score the examples of `shard` ([m] scores) from `state`; a pure function of both."""

    def combine(self, parts: list[ScoreResult], state: ShardState) -> ScoreResult:
        """The pool's result from its shards' results, in pool order (default: `combine_parts`)."""
        return combine_parts(parts, state)

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, target, loaded)
        state = self.prepare(pool, target=target, loaded=loaded, seed=seed, progress=progress)
        part = self.score_shard(pool, state, loaded, progress)
        return self.combine([part], state)


class ForwardScorer(ShardedScorer):
    """A sharded scorer whose shard work is forward-only features plus math on them.

    `features(state, loaded)` -> {name: capture.shared.Feature}: what it reads from the pool's
    forward pass (its own names; the features' pass keys say how examples are rendered and batched).
    `from_features(shard, state, arrays, seconds, loaded)` -> the shard's ScoreResult from
    {name: arrays} (each [m, ...], rows in shard order) and the seconds of the pass(es) that made
    them; `loaded` is there for its tokenizer (IGDS decodes snippets), never to run the model. Run alone,
    `score_shard` computes the features in a pass of its own, so alone and shared are one code path.
    """

    @abstractmethod
    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        """The features this scorer reads, by name (capture.shared.Feature instances)."""

    @abstractmethod
    def from_features(self, shard: Pool, state: ShardState, arrays: dict[str, dict[str, np.ndarray]],
                      seconds: float, loaded: Any = None) -> ScoreResult:
        """The shard's scores from its features' arrays (no forward pass, no I/O)."""

    def score_shard(self, shard: Pool, state: ShardState, loaded: Any = None, progress: bool = True
                    ) -> ScoreResult:
        from mechsieve.capture.shared import feature_pass

        arrays, report = feature_pass(loaded, shard.examples, self.features(state, loaded), progress=progress,
                                      desc=f"{self.name}: pool")
        return self.from_features(shard, state, arrays, report.seconds, loaded)
