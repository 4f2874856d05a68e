"""Baseline scorers every comparison needs (METHODS.md section 5): random, full, loss, IFD, RDS+.

- `random`: a seeded uniform score per example, hashed from (seed, id), so the same seed picks
  the same examples whatever the pool's order.
- `full`: every example (score 0; the pipeline selects all).
- `loss`: mean next-token loss of the response under the base model (perplexity selection,
  Marion et al. 2023, arXiv 2309.04564); `direction` high or low.
- `ifd`: Instruction-Following Difficulty of Cherry LLM (Li et al., NAACL 2024,
  arXiv 2308.12032): ppl(y | x) / ppl(y).
- `rds`: RDS+ (Ivison et al. 2025, arXiv 2503.01807): cosine of the last layer's hidden states,
  pooled by a position-weighted mean (the paper's "+", SGPT's weights w_i proportional to the
  position i = 1..T), to the target set; a plain mean is an option (`pooling=mean`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mechsieve.capture.shared import Pooled, ResponseLoss, feature_pass
from mechsieve.config import check_choice
from mechsieve.data.records import Pool
from mechsieve.scorers.base import ForwardScorer, NoSettings, Scorer, ScoreResult, ShardState
from mechsieve.scorers.common import ModelScorerConfig, final_norm, pass_key


def hashed_uniform(ids: list[str], seed: int) -> np.ndarray:
    """[n] float64 in [0, 1): one draw per id from sha256(seed, id), independent of order."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, ex_id in enumerate(ids):
        digest = hashlib.sha256(f"{seed}\x00{ex_id}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


class RandomScorer(Scorer):
    """Random selection (seeded). Draws are hashed from (seed, example id) instead of taken from a
    generator in pool order, so a shuffled pool gives the same subset under the same seed."""

    name = "random"
    config_cls = NoSettings

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, target, loaded)
        return ScoreResult(hashed_uniform([ex.id for ex in pool.examples], seed), {"seed": seed})


class FullScorer(Scorer):
    """Full data: every example (score 0 for all; the pipeline selects the whole pool)."""

    name = "full"
    config_cls = NoSettings

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, target, loaded)
        return ScoreResult(np.zeros(len(pool.examples), dtype=np.float64))


@dataclass
class LossConfig(ModelScorerConfig):
    """Settings of the loss baseline."""

    direction: Literal["high", "low"] = "high"
    """Select the highest-loss (hard) or the lowest-loss (easy) responses first."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("loss.direction", self.direction, ("high", "low"))


class LossScorer(ForwardScorer):
    """Loss / perplexity baseline (perplexity-based pruning, e.g. Marion et al. 2023, arXiv
    2309.04564; the Loss baseline of IGDS): mean next-token NLL of the response tokens (end-of-turn
    marker included) given the prompt, under the base model. Score = the loss; `direction` picks
    the end (high: hard examples first; low: easy ones). Differences: the loss is on the response
    only (not the whole text), and examples left with no response token after truncation get NaN
    (ranked last, never selected)."""

    name = "loss"
    config_cls = LossConfig
    needs_model = True

    @property
    def order(self) -> Literal["top", "bottom"]:
        return "top" if self.config.direction == "high" else "bottom"

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        return {}

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        return {"loss": ResponseLoss(pass_key(self.config))}

    def from_features(self, shard: Pool, state: ShardState, arrays: dict, seconds: float,
                      loaded: Any = None) -> ScoreResult:
        sums, counts = arrays["loss"]["sums"], arrays["loss"]["counts"]
        loss = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        return ScoreResult(loss, {"no_response_tokens": int((counts == 0).sum()),
                                  "response_tokens": int(counts.sum())}, {"forward": seconds})


@dataclass
class IfdConfig(ModelScorerConfig):
    """Settings of IFD."""

    drop_above_one: bool = True
    """Cherry LLM drops examples with IFD > 1 (the prompt makes the answer *harder* to predict):
    they get NaN (ranked last, never selected). False keeps the raw ratio."""


class IfdScorer(ForwardScorer):
    """IFD (Cherry LLM, Li et al. NAACL 2024): exp(mean NLL of y given x - mean NLL of y alone).

    Differences from the paper's code: the conditional pass uses the model's chat template (the
    paper uses its own prompt template) and scores the response with its end-of-turn marker; the
    unconditional pass renders the response alone as plain text + EOS, so both losses cover an
    end-of-answer token. The paper selects the top IFD after dropping IFD > 1 (`drop_above_one`).
    Examples without a prompt (plain text) get NaN: their IFD is 1 by construction.
    `IfdScorer(cfg, conditional_loss=loss)` reuses the `loss` scorer's scores ([n], same render
    settings) as the conditional term and runs only the response-alone pass.
    """

    name = "ifd"
    config_cls = IfdConfig
    needs_model = True

    def __init__(self, config: Any = None, conditional_loss: np.ndarray | None = None) -> None:
        super().__init__(config)
        self.conditional_loss = conditional_loss

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        if self.conditional_loss is None:
            return {}
        cond = np.asarray(self.conditional_loss, dtype=np.float64)
        if cond.shape != (len(pool.examples),):
            raise ValueError(f"ifd: conditional_loss has shape {cond.shape} for {len(pool.examples)} examples")
        ids = [ex.id for ex in pool.examples]
        if len(set(ids)) != len(ids):
            raise ValueError("ifd: conditional_loss is matched to examples by id, but the pool repeats ids")
        return {"conditional_ids": ids, "conditional_loss": cond}

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        feats = {"alone": ResponseLoss(pass_key(self.config, inputs="response_only"))}
        if "conditional_loss" not in state:  # the same feature as the loss scorer's: shared with it
            feats["conditional"] = ResponseLoss(pass_key(self.config))
        return feats

    def from_features(self, shard: Pool, state: ShardState, arrays: dict, seconds: float,
                      loaded: Any = None) -> ScoreResult:
        if "conditional_loss" in state:
            where = {ex_id: i for i, ex_id in enumerate(state["conditional_ids"])}
            cond_loss = state["conditional_loss"][[where[ex.id] for ex in shard.examples]]
        else:
            s_c, n_c = arrays["conditional"]["sums"], arrays["conditional"]["counts"]
            cond_loss = np.where(n_c > 0, s_c / np.maximum(n_c, 1), np.nan)
        s_u, n_u = arrays["alone"]["sums"], arrays["alone"]["counts"]
        # Without a prompt, y|x and y are the same text: IFD would be 1 by construction, not a
        # measurement, so such examples are not scored (NaN: ranked last, never selected).
        has_prompt = np.array([bool(ex.prompt) for ex in shard.examples])
        ok = ~np.isnan(cond_loss) & (n_u > 0) & has_prompt
        ifd = np.full(len(shard.examples), np.nan)
        ifd[ok] = np.exp(cond_loss[ok] - s_u[ok] / n_u[ok])
        above = ok & (ifd > 1.0)
        if self.config.drop_above_one:
            ifd[above] = np.nan
        return ScoreResult(ifd, {"above_one": int(above.sum()), "dropped": int(above.sum()) if
                                 self.config.drop_above_one else 0, "no_prompt": int((~has_prompt).sum()),
                                 "not_scored": int((~ok).sum())}, {"forward": seconds})


@dataclass
class RdsConfig(ModelScorerConfig):
    """Settings of RDS+."""

    pooling: Literal["weighted_mean", "mean", "mean_response"] = "weighted_mean"
    """`weighted_mean` (RDS+): over every real token, weights w_i = i / sum_j j for the positions
    i = 1..T (SGPT); `mean`: plain mean over every token (before: the default); `mean_response`:
    plain mean over the response tokens only."""
    aggregate: Literal["mean", "max"] = "mean"
    """How the cosines to the target examples combine into one score."""
    apply_final_norm: bool = True
    """Pool the last layer after the model's final norm (Hugging Face `hidden_states[-1]`)."""
    capabilities: Literal["source", "single"] = "source"
    """`source`: each source of the target pool is its own capability (union selection); `single`: one set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("rds.pooling", self.pooling, ("weighted_mean", "mean", "mean_response"))
        check_choice("rds.aggregate", self.aggregate, ("mean", "max"))
        check_choice("rds.capabilities", self.capabilities, ("source", "single"))


POOLING_REDUCTIONS = {"weighted_mean": "weighted_mean_all", "mean": "mean_all"}
"""RdsConfig.pooling -> capture.reductions name; other names (k-center's) are reductions already."""


def pooled_feature(loaded: Any, cfg: Any) -> Pooled:
    """The shared-pass feature of RDS+ and k-center: the last layer pooled by `cfg.pooling`, after
    the final norm when `cfg.apply_final_norm` (cfg: RdsConfig, KCenterConfig)."""
    from mechsieve.models.hooks import hook_points

    last = hook_points(loaded.model).n_layers - 1
    norm = final_norm(loaded.model) if cfg.apply_final_norm else None
    return Pooled(pass_key(cfg), last, POOLING_REDUCTIONS.get(cfg.pooling, cfg.pooling), norm)


def pooled_last_layer(loaded: Any, examples: list, cfg: Any, progress: bool, desc: str) -> np.ndarray:
    """[n, d] float64 pooled last-layer hidden states (after the final norm if asked).

    `cfg`: a ModelScorerConfig with `pooling` and `apply_final_norm` (RdsConfig, KCenterConfig)."""
    arrays, _ = feature_pass(loaded, examples, {"pooled": pooled_feature(loaded, cfg)}, progress=progress, desc=desc)
    return arrays["pooled"]["pooled"].astype(np.float64)


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def target_groups(target: Pool, capabilities: str) -> dict[str, list[int]]:
    """Target example indices per capability: per source, or all in one group."""
    if capabilities == "single":
        return {"target": list(range(len(target.examples)))}
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(target.examples):
        groups.setdefault(ex.source, []).append(i)
    return groups


class RdsScorer(ForwardScorer):
    """RDS+ (Ivison et al. 2025, "Large-Scale Data Selection for Instruction Tuning"): embed each
    example as the position-weighted mean over its tokens of the last-layer hidden state (weights
    proportional to the position 1..T, as the paper takes from SGPT; `pooling=mean`: the plain
    mean), score = cosine to the target examples aggregated by mean (option: max). The paper
    pools its own prompt format over the whole text; here the text is the example as rendered
    (chat template included). The paper uses round-robin over target tasks; here
    each target source is a capability and selection takes the union of per-capability top-k.
    `pool_embeddings` keeps the last call's [n, d] embeddings (the whole pool's after `score`) for
    reuse, e.g. by k-center."""

    name = "rds"
    config_cls = RdsConfig
    needs_model = True
    needs_target = True

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        t0 = time.perf_counter()
        emb_t = unit_rows(pooled_last_layer(loaded, target.examples, self.config, progress, "rds: target"))
        groups = target_groups(target, self.config.capabilities)
        return {"target_embeddings": emb_t, "groups": groups, "target_names": list(groups),
                "explanations": {"target_examples": len(target.examples)},
                "timings": {"forward_target": time.perf_counter() - t0}}

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        return {"pool": pooled_feature(loaded, self.config)}

    def from_features(self, shard: Pool, state: ShardState, arrays: dict, seconds: float,
                      loaded: Any = None) -> ScoreResult:
        self.pool_embeddings = arrays["pool"]["pooled"].astype(np.float64)
        emb_p = unit_rows(self.pool_embeddings)
        t1 = time.perf_counter()
        cos = emb_p @ state["target_embeddings"].T  # [m, targets]
        agg = np.mean if self.config.aggregate == "mean" else np.max
        per = np.stack([agg(cos[:, idx], axis=1) for idx in state["groups"].values()], axis=1)
        return ScoreResult(per.max(axis=1), {}, {"forward_pool": seconds, "similarity": time.perf_counter() - t1},
                           per_target=per if per.shape[1] > 1 else None, target_names=list(state["groups"]))
