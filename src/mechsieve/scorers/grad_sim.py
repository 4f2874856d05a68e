"""Gradient similarity (`grad-sim`), and the query / tracked-module settings shared with the
influence scorers.

`grad-sim`: cosine between each training example's randomly projected loss gradient and the mean
projected loss gradient of the query examples (behaviour-showing examples). This is the
first-order, curvature-free relative of influence functions used as a baseline by LESS (Xia et
al. 2024, arXiv 2402.04333) and TracIn (Pruthi et al. 2020). Differences: one checkpoint (the
model as given), no Adam preconditioning (see the LESS baseline for that), and a Kronecker
Rademacher projection per linear layer (capture/gradients.py) instead of a dense one; only the
linear layers of the tracked blocks are differentiated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Pool
from mechsieve.data.render import pad_id
from mechsieve.scorers.base import ScorerError, ScoreResult, ShardedScorer, ShardState
from mechsieve.scorers.concept import ConceptSource, render_config


@dataclass
class GradientTargetConfig(ConceptSource):
    """Queries and tracked modules of the gradient-based scorers (the concept fields serve the
    concept measurement; `probe.layer` also bounds the tracked blocks)."""

    query: str = ""
    """Data file of query examples; else the `target` pool, else the `positive` concept file."""
    n_queries: int = 16
    """At most this many queries (a seeded sample) make the query gradient."""
    track_blocks: int = 0
    """How many blocks to track, counting down from the concept layer (0: all at or below it)."""
    track_stride: int = 1
    """Track every n-th block going down from the concept layer."""
    track_kinds: Literal["all", "mlp", "attn"] = "all"
    """Which linear layers of the tracked blocks."""
    batch_size: int = 8
    """Examples per backward batch (examples are sorted by length first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("track_kinds", self.track_kinds, ("all", "mlp", "attn"))
        if self.n_queries < 1 or self.track_blocks < 0 or self.track_stride < 1 or self.batch_size < 1:
            raise ConfigError("n_queries >= 1, track_blocks >= 0, track_stride >= 1 and batch_size >= 1 are required")


def tracked_blocks(top: int, cfg: GradientTargetConfig) -> list[int]:
    """Blocks top, top - stride, ... (at most `track_blocks` of them), ascending."""
    blocks = list(range(top, -1, -cfg.track_stride))
    if cfg.track_blocks:
        blocks = blocks[:cfg.track_blocks]
    return sorted(blocks)


def resolve_queries(cfg: GradientTargetConfig, target: Pool | None, seed: int) -> Pool:
    """The query examples: `query` file, else `target`, else the `positive` file; seeded sample."""
    from mechsieve.data.readers import read_pool

    if cfg.query:
        pool = read_pool(cfg.query)
    elif target is not None and len(target.examples):
        pool = target
    elif cfg.positive:
        pool = read_pool(cfg.positive)
    else:
        raise ScorerError("queries are needed: set query (a data file), pass a target pool "
                          "(CLI: --query FILE) or give the concept's positive file (--concept POS NEG)")
    if len(pool.examples) > cfg.n_queries:
        idx = sorted(np.random.default_rng(seed).choice(len(pool.examples), cfg.n_queries, replace=False))
        pool = Pool([pool.examples[i] for i in idx], pool.path, pool.container, pool.format)
    return pool


def boundary_layer(loaded: Any, cfg: GradientTargetConfig) -> int:
    from mechsieve.models.hooks import hook_points

    if cfg.probe.layer == "auto":
        raise ScorerError("probe.layer=auto is for the probe scorers (vector-filter, projection-diff): the gradient "
                          "methods track the blocks below a fixed layer; run vector-filter with probe.layer=auto to "
                          "find the best block, then give it here (--layer N)")
    return hook_points(loaded.model).normalize_layers([cfg.probe.layer])[0]


@dataclass
class GradSimConfig(GradientTargetConfig):
    """Settings of `grad-sim`."""

    proj_in: int = 32
    """Random projection size of each linear layer's input side."""
    proj_out: int = 32
    """Random projection size of each linear layer's output side (dimension per layer: in x out)."""


class GradSim(ShardedScorer):
    """Cosine of projected per-example loss gradients to the mean query gradient (LESS / TracIn
    style, one checkpoint, no optimizer preconditioning; see the module docstring).

    Sharded: `prepare` computes the mean projected query gradient; each shard rebuilds the same
    seeded projector and differentiates its own examples."""

    name = "grad-sim"
    config_cls = GradSimConfig
    needs_model = True

    def check_inputs(self, pool: Pool, target: Pool | None, loaded: Any) -> None:
        super().check_inputs(pool, None, loaded)  # the target is optional: it serves as queries

    def tracked(self, loaded: Any, blocks: list[int], seed: int) -> tuple[list, Any]:
        """The tracked linear modules and their seeded projector (built once per model and seed)."""
        from mechsieve.capture.gradients import KronProjector, linear_modules

        key = (id(loaded.model), tuple(blocks), seed)
        if getattr(self, "_tracked_key", None) != key:
            cfg = self.config
            modules = linear_modules(loaded.model, blocks, cfg.track_kinds)
            proj = KronProjector.make([tuple(m.weight.shape) for _, m in modules], cfg.proj_in, cfg.proj_out, seed)
            self._tracked_key, self._tracked = key, (modules, proj)
        return self._tracked

    def gradients(self, loaded: Any, examples: list, blocks: list[int], seed: int, progress: bool) -> np.ndarray:
        """[n, projected_dim] float32 projected loss gradients of `examples`."""
        from mechsieve.capture.gradients import per_example_grads
        from mechsieve.data.render import render_pool

        cfg = self.config
        modules, proj = self.tracked(loaded, blocks, seed)
        rendered, _ = render_pool(examples, loaded.tokenizer, render_config(cfg))
        return per_example_grads(loaded.model, rendered, modules, projector=proj, pad_id=pad_id(loaded.tokenizer),
                                 max_tokens=cfg.batch_size * cfg.max_len, max_batch=cfg.batch_size, progress=progress)

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        start = time.perf_counter()
        queries = resolve_queries(self.config, target, seed)
        blocks = tracked_blocks(boundary_layer(loaded, self.config), self.config)
        q = self.gradients(loaded, queries.examples, blocks, seed, progress)
        modules, proj = self.tracked(loaded, blocks, seed)
        return {"query_mean": q.astype(np.float64).mean(0), "blocks": [int(b) for b in blocks], "seed": int(seed),
                "explanations": {"tracked_blocks": [int(b) for b in blocks], "tracked_modules": len(modules),
                                 "projected_dim": int(proj.dim), "queries": len(queries.examples)},
                "timings": {"query": time.perf_counter() - start}}

    def score_shard(self, shard: Pool, state: ShardState, loaded: Any = None, progress: bool = True
                    ) -> ScoreResult:
        start = time.perf_counter()
        g = self.gradients(loaded, shard.examples, state["blocks"], state["seed"], progress)
        return ScoreResult(cosine_to(g, state["query_mean"]), {}, {"score": time.perf_counter() - start})


def cosine_to(grads: np.ndarray, query: np.ndarray) -> np.ndarray:
    """cos(grads[i], query) -> [n] float64 (0 for a zero gradient)."""
    q = np.asarray(query, dtype=np.float64)
    g = grads.astype(np.float64)
    denom = np.linalg.norm(g, axis=1) * np.linalg.norm(q)
    return np.divide(g @ q, denom, out=np.zeros(len(g)), where=denom > 0)


def cosine_to_mean(grads: np.ndarray, query_grads: np.ndarray) -> np.ndarray:
    """cos(grads[i], mean(query_grads)) -> [n] float64 (0 for a zero gradient)."""
    return cosine_to(grads, query_grads.astype(np.float64).mean(0))
