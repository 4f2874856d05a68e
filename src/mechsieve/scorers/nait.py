"""NAIT: neuron-aware instruction-tuning data selection (METHODS.md section 2).

Paper: "Neuron-Aware Data Selection In Instruction Tuning For Large Language Models" (ICLR 2026,
arXiv 2603.13201); no official code. Per layer `l`, the activation drift of an example is
`dA_l(x) = A_l(x)[last token] - A_l(x)[first content token]`; the capability direction `v_l` is
the first principal component of the target set's drifts, sign-calibrated so the mean drift
projects non-negatively; the score is `s(y) = sum_l dA_l(y) . v_l`.

What this implementation adds or decides where the paper is silent:
- `site`: residual stream after each block (default) or MLP neurons (input of the down
  projection); the paper says "neurons" without fixing which.
- `drift`: `last` (the paper's), `last_prompt` (last prompt token, i.e. the instruction only),
  or `mean` (mean over response tokens minus mean over prompt tokens).
- `similarity`: `dot` (paper) or `cosine`; `normalize`: per-layer z-normalisation of each term
  before summing, with the target set's statistics (`target`) or the pool's (`pool`).
- several capabilities (one per target source): one direction set each; selection takes the
  union of per-capability top-k (round-robin), trimmed to the budget. The score column is the
  max over capabilities.
- the pool pass never keeps drifts: each layer's drift is projected inside the hook, so memory
  is [n, capabilities, layers]. Directions are a reusable artefact (features.neurons).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.capture.batching import Collated
from mechsieve.capture.reductions import REDUCTIONS
from mechsieve.capture.shared import Feature, PassKey, digest, feature_pass
from mechsieve.config import ConfigError, check_choice, to_dict
from mechsieve.data.records import Pool
from mechsieve.data.render import pad_id
from mechsieve.features.neurons import CapabilityDirections, fit_directions
from mechsieve.models.hooks import hook_points
from mechsieve.scorers.base import ForwardScorer, ScorerError, ScoreResult, ShardState
from mechsieve.scorers.baselines import target_groups
from mechsieve.scorers.common import ModelScorerConfig, layer_pass, pass_key, render

DRIFTS = ("last", "last_prompt", "mean")


@dataclass
class NaitConfig(ModelScorerConfig):
    """Settings of NAIT."""

    site: Literal["resid", "mlp"] = "resid"
    """`resid`: residual stream after each block; `mlp`: MLP neurons (input of the down projection)."""
    layers: list[int] | Literal["all"] = "all"
    """Blocks to use (negative counts from the end), or `all`."""
    drift: Literal["last", "last_prompt", "mean"] = "last"
    """`last`: last token - first content token (paper); `last_prompt`: last prompt token - first
    content token; `mean`: mean over response - mean over prompt."""
    similarity: Literal["dot", "cosine"] = "dot"
    """Per-layer term: dot product with the direction (paper) or cosine."""
    normalize: Literal["none", "target", "pool"] = "none"
    """Z-normalise each layer's term before summing, with target-set or pool statistics."""
    capabilities: Literal["source", "single"] = "source"
    """`source`: each source of the target pool is a capability (union selection); `single`: one."""
    directions: str = ""
    """Folder of a saved direction artefact to use instead of fitting on the target set."""
    save_directions: str = ""
    """Folder to save the fitted directions to (nait_directions.safetensors + .json)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("nait.site", self.site, ("resid", "mlp"))
        check_choice("nait.drift", self.drift, DRIFTS)
        check_choice("nait.similarity", self.similarity, ("dot", "cosine"))
        check_choice("nait.normalize", self.normalize, ("none", "target", "pool"))
        check_choice("nait.capabilities", self.capabilities, ("source", "single"))
        if self.layers != "all" and not self.layers:
            raise ConfigError("nait.layers is empty; give 'all' or a list like [0, 5, -1]")


def drift_of(acts: torch.Tensor, batch: Collated, kind: str) -> torch.Tensor:
    """[b, d] drift of a batch's per-token activations `acts: [b, t, d]` (see NaitConfig.drift)."""
    acts = acts.float()
    if kind == "mean":
        return REDUCTIONS["mean_response"](acts, batch) - REDUCTIONS["mean_prompt"](acts, batch)
    rows = torch.arange(acts.shape[0], device=acts.device)
    first = acts[rows, batch.column(batch.content_start)]
    end = REDUCTIONS["last"](acts, batch) if kind == "last" else REDUCTIONS["last_prompt"](acts, batch)
    return end - first


def layer_terms(proj: np.ndarray, norms: np.ndarray, dirs: CapabilityDirections, similarity: str,
                normalize: str) -> np.ndarray:
    """Per-layer terms [n, c, L] from projections [n, c, L] and drift norms [n, L]."""
    terms = proj / np.where(norms > 0, norms, 1.0)[:, None, :] if similarity == "cosine" else proj
    if normalize == "target":
        mu, sd = (dirs.cos_mean, dirs.cos_std) if similarity == "cosine" else (dirs.proj_mean, dirs.proj_std)
    elif normalize == "pool":
        mu, sd = terms.mean(axis=0), terms.std(axis=0)
    else:
        return terms
    return (terms - mu[None]) / np.where(sd > 0, sd, 1.0)[None]


class DriftProjection(Feature):
    """NAIT's pool feature: each layer's drift (`drift_of`) projected on the capability directions
    inside the hook: `proj` [n, c, L] float64 and the drift norms `norms` [n, L] float64; nothing
    [n, L, d] is ever held."""

    kind = "nait_drift_projection"

    def __init__(self, key: PassKey, drift: str, dirs: CapabilityDirections, device: Any) -> None:
        super().__init__(key)
        self.layers = [int(x) for x in dirs.layers]
        self.drift = drift
        self.directions = np.ascontiguousarray(dirs.directions)
        self.v = torch.from_numpy(self.directions).to(device)  # [c, L, d]
        self.slot = {layer: k for k, layer in enumerate(self.layers)}

    def settings(self) -> dict[str, Any]:
        return {"drift": self.drift, "directions": digest(self.directions)}

    def begin(self, n: int) -> None:
        c, n_layers = self.directions.shape[0], len(self.layers)
        self.proj = np.zeros((n, c, n_layers), dtype=np.float64)
        self.norms = np.zeros((n, n_layers), dtype=np.float64)

    def on_layer(self, ctx, layer: int, acts: torch.Tensor) -> None:
        k = self.slot[layer]
        dr = drift_of(acts, ctx.batch, self.drift)  # [b, d]
        self.proj[ctx.indices, :, k] = (dr @ self.v[:, k].T).double().cpu().numpy()
        self.norms[ctx.indices, k] = dr.norm(dim=-1).double().cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"proj": self.proj, "norms": self.norms}


class Nait(ForwardScorer):
    """NAIT (ICLR 2026, arXiv 2603.13201); see the module docstring for the differences."""

    name = "nait"
    config_cls = NaitConfig
    needs_model = True
    needs_target = True

    def artefact_settings(self, loaded: Any, layers: list[int]) -> dict[str, Any]:
        c = self.config
        return {"model": loaded.identity, "site": c.site, "layers": layers, "drift": c.drift,
                "capabilities": c.capabilities, "render": to_dict(c.render)}

    def check_inputs(self, pool: Pool, target: Pool | None, loaded: Any) -> None:
        if self.config.directions and target is None:  # a saved artefact stands in for the target
            target = pool
        super().check_inputs(pool, target, loaded)

    def drifts(self, loaded: Any, examples: list, layers: list[int], progress: bool, desc: str) -> np.ndarray:
        """[m, L, d] float32 drifts of a (small) target set."""
        rendered = render(examples, loaded, self.config)
        slot = {layer: k for k, layer in enumerate(layers)}
        out: np.ndarray | None = None

        def on_layer(ctx, layer: int, acts: torch.Tensor) -> None:
            nonlocal out
            dr = drift_of(acts, ctx.batch, self.config.drift)
            if out is None:
                out = np.zeros((len(rendered), len(layers), dr.shape[-1]), dtype=np.float32)
            out[ctx.indices, slot[layer]] = dr.cpu().numpy()

        layer_pass(loaded.model, rendered, layers, self.config.site, self.config, pad_id(loaded.tokenizer),
                   on_layer, progress, desc)
        return out

    def directions_for(self, loaded: Any, target: Pool | None, layers: list[int], progress: bool
                       ) -> CapabilityDirections:
        expected = self.artefact_settings(loaded, layers)
        if self.config.directions:
            if target is not None:
                expected["target"] = target.fingerprint()
            return CapabilityDirections.load(self.config.directions, expected)
        groups = target_groups(target, self.config.capabilities)
        small = [name for name, idx in groups.items() if len(idx) < 2]
        if small:
            raise ScorerError(f"nait: target capabilities {small} have fewer than 2 examples; a principal "
                              "direction needs at least 2 (set nait.capabilities=single to pool all sources)")
        all_drifts = self.drifts(loaded, target.examples, layers, progress, "nait: target")
        dirs = fit_directions({name: all_drifts[idx] for name, idx in groups.items()}, layers,
                              {**expected, "target": target.fingerprint()})
        if self.config.save_directions:
            dirs.save(self.config.save_directions)
        return dirs

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        """The capability directions (fitted on the target set, or loaded), as arrays."""
        layers = hook_points(loaded.model).normalize_layers(self.config.layers)
        t0 = time.perf_counter()
        dirs = self.directions_for(loaded, target, layers, progress)
        return {"names": list(dirs.names), "layers": [int(x) for x in layers], "dir_layers": [int(x) for x in dirs.layers],
                "directions": dirs.directions, "explained": dirs.explained, "proj_mean": dirs.proj_mean,
                "proj_std": dirs.proj_std, "cos_mean": dirs.cos_mean, "cos_std": dirs.cos_std,
                "timings": {"directions": time.perf_counter() - t0}}

    @staticmethod
    def directions_of(state: ShardState) -> CapabilityDirections:
        return CapabilityDirections(state["names"], state["dir_layers"], state["directions"], state["explained"],
                                    state["proj_mean"], state["proj_std"], state["cos_mean"], state["cos_std"])

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        device = next(loaded.model.parameters()).device
        key = pass_key(self.config, site=self.config.site)
        return {"drift": DriftProjection(key, self.config.drift, self.directions_of(state), device)}

    def from_features(self, shard: Pool, state: ShardState, arrays: dict, seconds: float,
                      loaded: Any = None) -> ScoreResult:
        """Per-layer terms of the shard's drift projections; scores are final unless normalize=pool
        (then `combine` normalises with the whole pool's statistics)."""
        cfg = self.config
        dirs = self.directions_of(state)
        proj, norms = arrays["drift"]["proj"], arrays["drift"]["norms"]
        local = "none" if cfg.normalize == "pool" else cfg.normalize
        per = layer_terms(proj, norms, dirs, cfg.similarity, local).sum(axis=2)  # [m, c]
        return ScoreResult(per.max(axis=1), {}, {"forward_pool": seconds},
                           per_target=per if len(dirs.names) > 1 else None, target_names=dirs.names,
                           arrays={"proj": proj, "norms": norms})

    def combine(self, parts: list[ScoreResult], state: ShardState) -> ScoreResult:
        cfg = self.config
        dirs = self.directions_of(state)
        proj = np.concatenate([p.arrays["proj"] for p in parts])
        norms = np.concatenate([p.arrays["norms"] for p in parts])
        terms = layer_terms(proj, norms, dirs, cfg.similarity, cfg.normalize)  # [n, c, L]
        per = terms.sum(axis=2)  # [n, c]
        top = np.argsort(-per.max(axis=1), kind="stable")[:max(1, len(per) // 10)]  # the report shows these
        explanations = {
            "capabilities": dirs.names,
            "layers": state["layers"],
            "explained_variance": {name: np.round(dirs.explained[c], 4).tolist() for c, name in enumerate(dirs.names)},
            "layer_terms": {name: {"pool_mean": np.round(terms[:, c].mean(0), 6).tolist(),
                                   "top_decile_mean": np.round(terms[top, c].mean(0), 6).tolist()}
                            for c, name in enumerate(dirs.names)},
            "directions": cfg.directions or cfg.save_directions or None,
        }
        timings = {"directions": state["timings"]["directions"],
                   "forward_pool": sum(p.timings["forward_pool"] for p in parts)}
        return ScoreResult(per.max(axis=1), explanations, timings,
                           per_target=per if len(dirs.names) > 1 else None, target_names=dirs.names)

    def project(self, loaded: Any, pool: Pool, dirs: CapabilityDirections, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
        """One pass over the pool: drift projections [n, c, L] on the directions, drift norms [n, L]."""
        device = next(loaded.model.parameters()).device
        feat = DriftProjection(pass_key(self.config, site=self.config.site), self.config.drift, dirs, device)
        arrays, _ = feature_pass(loaded, pool.examples, {"drift": feat}, progress=progress, desc="nait: pool")
        return arrays["drift"]["proj"], arrays["drift"]["norms"]
