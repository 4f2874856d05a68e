"""IGDS: interpretability-guided data selection with SAE features (METHODS.md section 1).

Paper: "From Insight to Action: A Novel Framework for Interpretability-Guided Data Selection in
Large Language Models" (ACL 2026, arXiv 2604.25167); no official code. An SAE at layer `l`
reads the residual stream. (1) Frequency recall on the target (probe) prompts: per latent `j`,
`freq_j` = share of probe inputs with `a_j > 0` at the chosen position and `mu_j` = mean of
`a_j` over the probe inputs; keep `freq_j > freq_threshold`, `mu_j > act_floor`, top `top_k` by
`mu_j`. (2) Interventional filtering: steer one latent at a time, `h' = h + (alpha - 1) a_j W_dec[j]`
(= decode(a with a_j scaled) + SAE error), and keep latents whose best alpha improves the dev
metric (`delta_j > 0`). (3) Feature-Resonant Score `FRS(x) = sum_{j in F} a_j(x)`; select the top.

What this implementation decides where the paper is silent:
- `mu_j` averages over all probe inputs (zeros included); `position=mean_prompt` averages the
  per-token latents over the prompt (not the latents of the mean residual).
- probe = every target prompt; dev = `dev_size` target examples (seeded draw, gold responses);
  the metric is the token-weighted teacher-forced response loss (default; `delta = base - steered`)
  or greedy-generation exact match (`metric=accuracy`, numbers as in GSM8K; steers every token).
- steering is applied at `steer_positions`: every token (default), the prompt, or the recall
  position; `delta_j` is the best over `alphas`.
- if no candidate improves the metric, the best one is kept and `explanations.fallback` says so.
- `contrast`: a file of general text; latents must fire `contrast_ratio` times more often on the
  probe set than there (drops always-on latents). Ablations: `recall=false` draws `top_k`
  candidates at random among latents that fire on the probe set; `filtering=false` keeps all
  candidates; `reverse=true` selects the lowest FRS.
- `sae` empty: a TopK SAE is trained on target + pool first (`train` settings; `features.sae_train`;
  reused from `save_sae` when there under the same settings). Its shuffle buffer sees the pool in
  order, so scores then depend on the pool's order; a given SAE makes them order-independent.
Cost: recall and scoring are one forward pass each; filtering is `top_k x len(alphas)` passes
over the dev set (keep `dev_size` small on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.capture.shared import Feature, PassKey, digest
from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Pool
from mechsieve.data.render import pad_id
from mechsieve.features.sae_train import SaeTrainConfig
from mechsieve.scorers.base import ForwardScorer, ScorerError, ScoreResult, ShardState
from mechsieve.scorers.common import ModelScorerConfig, layer_pass, pass_key, render
from mechsieve.scorers.igds_steer import dev_accuracy, dev_loss, latents_at, snippet_text


@dataclass
class IgdsConfig(ModelScorerConfig):
    """Settings of IGDS."""

    sae: str = ""
    """SAE folder (SAELens, sparsify or mechsieve format) or saelens:RELEASE/ID; empty: train one."""
    layer: int | None = None
    """Block whose residual output the SAE reads; default: the SAE's own (or the middle block)."""
    position: Literal["last_prompt", "mean_prompt"] = "last_prompt"
    """Where latents are read for recall and FRS: last prompt token, or mean over the prompt."""
    freq_threshold: float = 0.6
    """Recall keeps latents firing on more than this share of probe inputs."""
    act_floor: float = 0.0
    """... and whose mean activation is above this floor."""
    top_k: int = 50
    """... the top_k of them by mean activation."""
    contrast: str = ""
    """Optional general-text file; latents must fire contrast_ratio x more often on the probe set."""
    contrast_ratio: float = 2.0
    """Frequency ratio task / general text a latent needs under `contrast`."""
    dev_size: int = 32
    """Target examples (with gold responses) for interventional filtering."""
    alphas: list[float] = field(default_factory=lambda: [2.0, 5.0, 10.0])
    """Steering factors tried per latent; delta is the best of them."""
    metric: Literal["loss", "accuracy"] = "loss"
    """Dev metric: teacher-forced response loss, or exact-match accuracy of greedy generation."""
    max_new_tokens: int = 256
    """Generation length for metric=accuracy."""
    steer_positions: Literal["all", "prompt", "position"] = "all"
    """Tokens steered under metric=loss: all, prompt only, or the recall position only."""
    keep: Literal["positive", "top"] = "positive"
    """Keep latents with delta > 0, or the keep_top best by delta."""
    keep_top: int = 10
    """How many latents keep=top keeps."""
    weight: Literal["none", "delta"] = "none"
    """FRS sums a_j (none) or delta_j * a_j (delta)."""
    score_position: Literal["same", "mean_response"] = "same"
    """FRS at the recall position (same) or averaged over response tokens."""
    recall: bool = True
    """Ablation switch: false = random candidates among latents active on the probe set."""
    filtering: bool = True
    """Ablation switch: false = keep every recalled candidate."""
    reverse: bool = False
    """Ablation switch: select the lowest FRS."""
    snippets: int = 3
    """Top-activating pool snippets shown per kept latent."""
    latents: list[int] = field(default_factory=list)
    """Kept latents given (e.g. those of an earlier run's `explanations.kept`): recall and
    interventional filtering are skipped and FRS sums these; empty: find them."""
    train: SaeTrainConfig = field(default_factory=lambda: SaeTrainConfig(d_sae=1024, k=16))
    """TopK SAE training settings when `sae` is empty."""
    save_sae: str = ""
    """Folder to save an SAE trained here to."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("igds.position", self.position, ("last_prompt", "mean_prompt"))
        check_choice("igds.metric", self.metric, ("loss", "accuracy"))
        check_choice("igds.steer_positions", self.steer_positions, ("all", "prompt", "position"))
        check_choice("igds.keep", self.keep, ("positive", "top"))
        check_choice("igds.weight", self.weight, ("none", "delta"))
        check_choice("igds.score_position", self.score_position, ("same", "mean_response"))
        if any(int(j) < 0 for j in self.latents):
            raise ConfigError(f"igds.latents={self.latents}: latent indices must be >= 0")
        if self.top_k < 1 or self.keep_top < 1 or self.dev_size < 1:
            raise ConfigError("igds.top_k, igds.keep_top and igds.dev_size must be >= 1")
        if not self.alphas:
            raise ConfigError("igds.alphas is empty; give e.g. [2, 5, 10]")
        if not 0 <= self.freq_threshold < 1:
            raise ConfigError(f"igds.freq_threshold={self.freq_threshold}: must be in [0, 1)")


# --- the math: pure functions on arrays -------------------------------------------------------

@dataclass
class Recall:
    """Frequency recall: candidate latents (best first) and per-latent statistics [d_sae]."""

    features: np.ndarray
    freq: np.ndarray
    mean: np.ndarray
    contrast_freq: np.ndarray | None = None


def frequency_recall(counts: np.ndarray, sums: np.ndarray, n: int, freq_threshold: float, act_floor: float,
                     top_k: int, contrast_counts: np.ndarray | None = None, contrast_n: int = 0,
                     contrast_ratio: float = 2.0) -> Recall:
    """Candidates from per-latent fire counts / activation sums over `n` probe inputs (IGDS step 3).

    Keeps `freq > freq_threshold`, `mean > act_floor` and, with a contrast set, `freq >=
    contrast_ratio * contrast_freq`; returns the `top_k` by mean activation (ties: lower index).
    """
    freq = counts / max(n, 1)
    mean = sums / max(n, 1)
    ok = (freq > freq_threshold) & (mean > act_floor)
    cfreq = None
    if contrast_counts is not None:
        cfreq = contrast_counts / max(contrast_n, 1)
        ok &= freq >= contrast_ratio * cfreq
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, -mean[idx]))][:top_k]
    return Recall(order.astype(np.int64), freq, mean, cfreq)


def feature_resonant_score(latents: np.ndarray, features: np.ndarray, weights: np.ndarray | None = None
                           ) -> np.ndarray:
    """FRS(x) = sum_{j in F} w_j a_j(x) for `latents: [n, d_sae]` (IGDS step 5); [n] float64."""
    picked = np.asarray(latents, dtype=np.float64)[:, features]
    if weights is not None:
        picked = picked * np.asarray(weights, dtype=np.float64)[None, :]
    return picked.sum(axis=1)


def keep_features(deltas: np.ndarray, keep: str, keep_top: int) -> tuple[np.ndarray, bool]:
    """Indices (into the candidates) kept by filtering, best first, and whether the fallback
    (no positive delta: keep the single best) was used."""
    order = np.argsort(-deltas, kind="stable")
    if keep == "top":
        return order[:keep_top], False
    positive = order[deltas[order] > 0]
    return (positive, False) if len(positive) else (order[:1], True)


def sae_state(sae: Any) -> ShardState:
    """An SAE as state entries: its tensors as float32 arrays (`sae.W_enc`, ...) and its settings."""
    arrays = {f"sae.{k}": v.detach().float().cpu().numpy() for k, v in sae.tensors().items()}
    return {**arrays, "sae": {"activation": sae.activation, "k": int(sae.k), "layer": sae.layer,
                              "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input), "source": sae.source}}


def sae_from_state(state: ShardState) -> Any:
    """The SAE that `sae_state` wrote (on the CPU)."""
    from mechsieve.features.sae import SparseAutoencoder

    tensors = {k[len("sae."):]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("sae.")}
    return SparseAutoencoder(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                             threshold=tensors.get("threshold"), **state["sae"])


class KeptLatents(Feature):
    """IGDS's pool feature: the kept latents' activations at the FRS position, `vals` [n, kept]
    float64, and where each is read for its snippet, `where` [n, kept] int64 (the last prompt token,
    or each latent's largest prompt position), relative to the row's first real token."""

    kind = "igds_kept_latents"

    def __init__(self, key: PassKey, sae: Any, kept: np.ndarray, position: str) -> None:
        super().__init__(key)
        self.layers = [int(sae.layer)]
        self.sae = sae
        self.kept = np.asarray(kept, dtype=np.int64)
        self.position = position
        self.cols = torch.as_tensor(self.kept, device=sae.W_enc.device)

    def settings(self) -> dict[str, Any]:
        tensors = self.sae.tensors()
        return {"position": self.position, "kept": self.kept.tolist(), "sae": self.sae.describe(),
                "sae_tensors": digest(*(tensors[k].detach().cpu().numpy() for k in sorted(tensors)))}

    def begin(self, n: int) -> None:
        self.vals = np.zeros((n, len(self.kept)), dtype=np.float64)
        self.where = np.zeros((n, len(self.kept)), dtype=np.int64)

    def on_layer(self, ctx, layer: int, acts: torch.Tensor) -> None:
        a = latents_at(self.sae, acts, ctx.batch, self.position, self.cols)  # [b, kept]
        self.vals[ctx.indices] = a.double().cpu().numpy()
        if self.position != "last_prompt":
            at = latents_at(self.sae, acts, ctx.batch, "argmax_prompt", self.cols)
        else:
            at = (ctx.batch.prompt_len - 1).clamp(min=0)[:, None].expand(-1, len(self.kept))
        self.where[ctx.indices] = at.cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"vals": self.vals, "where": self.where}


# --- the scorer --------------------------------------------------------------------------------

class Igds(ForwardScorer):
    """IGDS (ACL 2026, arXiv 2604.25167); see the module docstring for the differences."""

    name = "igds"
    config_cls = IgdsConfig
    needs_model = True
    needs_target = True

    @property
    def order(self) -> Literal["top", "bottom"]:
        return "bottom" if self.config.reverse else "top"

    def get_sae(self, loaded: Any, pool: Pool, target: Pool, progress: bool) -> tuple[Any, dict]:
        from mechsieve.features.sae import load_sae
        from mechsieve.models.hooks import hook_points

        cfg = self.config
        device = next(loaded.model.parameters()).device
        if cfg.sae:
            sae = load_sae(cfg.sae, cfg.layer)
            if sae.layer is None:
                raise ScorerError(f"igds: the SAE {cfg.sae} does not say which layer it reads; set igds.layer")
            sae.check_model(loaded.model)
            return sae.to(device), {}
        from mechsieve.features.sae import ARTEFACT
        from mechsieve.features.sae_train import sae_settings, save_sae, train_sae
        from mechsieve.store.artefacts import artefact_exists, load_artefact

        n = hook_points(loaded.model).n_layers
        layer = hook_points(loaded.model).normalize_layers([cfg.layer if cfg.layer is not None else n // 2])[0]
        examples = [*target.examples, *pool.examples]
        settings = sae_settings(loaded, layer, cfg.train, cfg.render, Pool(examples, "", "memory", "memory").fingerprint())
        if cfg.save_sae and artefact_exists(cfg.save_sae, ARTEFACT):  # reuse; other settings are refused
            _, meta = load_artefact(cfg.save_sae, ARTEFACT, expected=settings)
            return load_sae(cfg.save_sae).to(device), {**meta.get("report", {}), "reused": cfg.save_sae}
        trained = train_sae(loaded, examples, layer, cfg.train, cfg.render, cfg.max_tokens, cfg.max_batch, progress)
        if cfg.save_sae:
            save_sae(cfg.save_sae, trained, settings)
        return trained.sae.to(device), trained.report

    def latent_stats(self, loaded: Any, examples: list, sae: Any, progress: bool, desc: str
                     ) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-latent fire counts and activation sums at the recall position over `examples`."""
        cfg = self.config
        counts = np.zeros(sae.d_sae, dtype=np.int64)
        sums = np.zeros(sae.d_sae, dtype=np.float64)

        def on_layer(ctx, layer: int, acts: torch.Tensor) -> None:
            a = latents_at(sae, acts, ctx.batch, cfg.position)
            counts[:] += (a > 0).sum(0).cpu().numpy()
            sums[:] += a.double().sum(0).cpu().numpy()

        rendered = render(examples, loaded, cfg)
        layer_pass(loaded.model, rendered, [sae.layer], "resid", cfg, pad_id(loaded.tokenizer), on_layer, progress, desc)
        return counts, sums, len(examples)

    def candidates(self, loaded: Any, target: Pool, sae: Any, seed: int, progress: bool) -> Recall:
        cfg = self.config
        counts, sums, n = self.latent_stats(loaded, target.examples, sae, progress, "igds: probe")
        c_counts, c_n = None, 0
        if cfg.contrast:
            from mechsieve.data.readers import read_pool

            general = read_pool(cfg.contrast)
            c_counts, _, c_n = self.latent_stats(loaded, general.examples, sae, progress, "igds: contrast")
        if cfg.recall:
            return frequency_recall(counts, sums, n, cfg.freq_threshold, cfg.act_floor, cfg.top_k, c_counts, c_n,
                                    cfg.contrast_ratio)
        active = np.flatnonzero(counts > 0)
        active = active if len(active) else np.arange(sae.d_sae)
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(active, size=min(cfg.top_k, len(active)), replace=False))
        return Recall(picked.astype(np.int64), counts / max(n, 1), sums / max(n, 1), None)

    def filter(self, loaded: Any, target: Pool, sae: Any, features: np.ndarray, seed: int
               ) -> tuple[np.ndarray, np.ndarray, float]:
        """(deltas [c], best alpha [c], base metric) of the candidate latents `features`."""
        cfg = self.config
        n_dev = min(cfg.dev_size, len(target.examples))
        rng = np.random.default_rng(seed)
        dev = [target.examples[i] for i in np.sort(rng.choice(len(target.examples), n_dev, replace=False))]
        if cfg.metric == "accuracy":
            def metric(feature: int | None, alpha: float) -> float:
                return dev_accuracy(loaded, dev, sae, feature, alpha, cfg)
            sign = 1.0
        else:
            rendered = render(dev, loaded, cfg)

            def metric(feature: int | None, alpha: float) -> float:
                return dev_loss(loaded, rendered, sae, feature, alpha, cfg)
            sign = -1.0
        base = metric(None, 1.0)
        deltas = np.full(len(features), -np.inf)
        best = np.zeros(len(features))
        for c, j in enumerate(features):
            for alpha in cfg.alphas:
                d = sign * (metric(int(j), float(alpha)) - base)
                if d > deltas[c]:
                    deltas[c], best[c] = d, alpha
        return deltas, best, base

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        """The SAE and its kept features: SAE (trained if none given), recall, interventional
        filtering. Everything but the pool pass."""
        cfg = self.config
        t = [time.perf_counter()]
        sae, train_report = self.get_sae(loaded, pool, target, progress)
        t.append(time.perf_counter())
        if cfg.latents:
            given = np.asarray(cfg.latents, dtype=np.int64)
            if given.max() >= sae.d_sae:
                raise ScorerError(f"igds.latents: latent {int(given.max())} is beyond this SAE's {sae.d_sae} latents")
            counts, sums, n = self.latent_stats(loaded, target.examples, sae, progress, "igds: probe")
            rec = Recall(given, counts / max(n, 1), sums / max(n, 1))
        else:
            rec = self.candidates(loaded, target, sae, seed, progress)
        t.append(time.perf_counter())
        if len(rec.features) == 0:
            raise ScorerError(f"igds: no SAE latent passed frequency recall (freq > {cfg.freq_threshold}, mean > "
                              f"{cfg.act_floor}{', contrast' if cfg.contrast else ''}) on {len(target)} probe "
                              "inputs; lower igds.freq_threshold or drop igds.contrast")
        deltas = np.zeros(len(rec.features))
        alphas = np.ones(len(rec.features))
        base, fallback = None, False
        kept_idx = np.arange(len(rec.features))
        if cfg.filtering and not cfg.latents:
            deltas, alphas, base = self.filter(loaded, target, sae, rec.features, seed)
            kept_idx, fallback = keep_features(deltas, cfg.keep, cfg.keep_top)
        t.append(time.perf_counter())
        kept = rec.features[kept_idx]
        table = []
        for c, j in zip(kept_idx, kept):
            row = {"feature": int(j), "freq": round(float(rec.freq[j]), 4), "mean_act": round(float(rec.mean[j]), 5)}
            if rec.contrast_freq is not None:
                row["contrast_freq"] = round(float(rec.contrast_freq[j]), 4)
            if cfg.filtering and not cfg.latents:
                row.update(delta=round(float(deltas[c]), 6), best_alpha=float(alphas[c]))
            table.append(row)
        explanations = {
            "sae": sae.describe(), "layer": sae.layer, "position": cfg.position, "metric": cfg.metric,
            "candidates": [int(j) for j in rec.features], "kept": [int(j) for j in kept],
            "base_dev_metric": None if base is None else round(float(base), 6), "fallback": fallback,
            "ablations": {"recall": cfg.recall, "filtering": cfg.filtering, "reverse": cfg.reverse},
            "latents_given": bool(cfg.latents),
            "features": table,
        }
        if train_report:
            explanations["sae_training"] = train_report
        state: ShardState = {**sae_state(sae), "kept": kept.astype(np.int64), "explanations": explanations,
                             "timings": {p: t[i + 1] - t[i] for i, p in enumerate(("sae", "recall", "filtering"))}}
        if cfg.weight == "delta" and cfg.filtering and not cfg.latents:
            state["weights"] = deltas[kept_idx].astype(np.float64)
        return state

    def frs_position(self) -> str:
        return self.config.position if self.config.score_position == "same" else "mean_response"

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        device = next(loaded.model.parameters()).device
        sae = sae_from_state(state).to(device)
        return {"latents": KeptLatents(pass_key(self.config), sae, state["kept"], self.frs_position())}

    def from_features(self, shard: Pool, state: ShardState, arrays: dict, seconds: float,
                      loaded: Any = None) -> ScoreResult:
        """FRS of the shard's examples, and each kept latent's top snippets within the shard
        (`value`: the unrounded activation, which `combine` ranks by and drops)."""
        vals, where = arrays["latents"]["vals"], arrays["latents"]["where"]
        scores = feature_resonant_score(vals, np.arange(vals.shape[1]), state.get("weights"))
        tops = [[i for i in np.argsort(-vals[:, c], kind="stable")[:self.config.snippets] if vals[i, c] > 0]
                for c in range(vals.shape[1])]
        needed = sorted({int(i) for top in tops for i in top})
        rendered = dict(zip(needed, render([shard.examples[i] for i in needed], loaded, self.config))) if needed else {}
        snippets = [[{"id": shard.examples[i].id, "act": round(float(vals[i, c]), 5),
                      "text": snippet_text(loaded.tokenizer, rendered[int(i)], int(where[i, c])),
                      "value": float(vals[i, c])} for i in top] for c, top in enumerate(tops)]
        return ScoreResult(scores, {"snippets": snippets}, {"score_pool": seconds})

    def combine(self, parts: list[ScoreResult], state: ShardState) -> ScoreResult:
        """Scores in pool order; per latent, the best snippets over all shards (each shard sent its
        own best, so the merge is exact; ties keep pool order, as one pass over the pool would)."""
        explanations = dict(state["explanations"])
        table = [dict(row) for row in explanations["features"]]
        for pos, row in enumerate(table):
            found = [s for p in parts for s in p.explanations["snippets"][pos]]
            best = sorted(range(len(found)), key=lambda i: -found[i]["value"])[:self.config.snippets]
            row["snippets"] = [{k: v for k, v in found[i].items() if k != "value"} for i in best]
        explanations["features"] = table
        timings = {**state["timings"], "score_pool": sum(p.timings["score_pool"] for p in parts)}
        return ScoreResult(np.concatenate([p.scores for p in parts]), explanations, timings)
