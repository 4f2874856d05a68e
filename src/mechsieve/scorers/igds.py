"""IGDS: interpretability-guided data selection with SAE features (METHODS.md section 1).

Paper: "From Insight to Action: A Novel Framework for Interpretability-Guided Data Selection in
Large Language Models" (ACL 2026, arXiv 2604.25167); no official code. An SAE at layer `l`
reads the residual stream. (1) Frequency recall on the target (probe) prompts: per latent `j`,
`freq_j` = share of probe inputs with `a_j > 0` at the chosen position and `mu_j` = mean of
`a_j` over the probe inputs; keep `freq_j > freq_threshold`, `mu_j > act_floor`, top `top_k` by
`mu_j`. (2) Interventional filtering: steer one latent at a time, `h' = h + (alpha - 1) a_j W_dec[j]`
(= decode(a with a_j scaled) + SAE error), and keep latents whose best alpha improves the dev
metric (`delta_j > 0`). (3) Feature-Resonant Score `FRS(x) = sum_{j in F} a_j(x)`; select the top.

Two presets (`preset`). `paper` is the above exactly as first built here (last prompt token, no
template check, no reference). `robust` (default) is this project's, because on SmolLM2 the
paper's recipe reads the chat template instead of the task (issue 18: in B1 all 8 kept latents
had recall frequency 1.0 and fired on the newline after `assistant`; on an all-GSM8K pool IGDS
50% equalled random 50%). Its recall and FRS differ from the paper so:
- `position=mean_all`: in a chat the last prompt token is a template token in every example (the
  newline after `assistant`), so what is frequent there is the format. The mean over all real
  tokens reads the question and the answer (`mean_response` reads the answer alone, but an
  example whose response render.max_len cut off then reads 0, as the demo's long GSM8K ones do).
- template check (`template_filter`): per latent, the share of its `template_top` (64) largest
  token activations, over the probe set and the pool sample, that sit on template tokens
  (`Rendered.content_mask`: every token outside a message's own text: role headers, special
  tokens, the newline after a role, the end-of-turn marker, an automatic system prompt); above
  `template_threshold` (0.5) the latent is dropped before the top_k cut, so the next ones move
  up. `explanations.recall.template.dropped` names the dropped ones among the top_k with their
  shares, and every kept row has its `template_share`. The paper reads one position and has no
  such test; a share over top activations (not all of them) asks what a latent is *for*.
- pool reference (`reference=pool`): without a `contrast` file, a seeded sample of the pool
  (`reference_size`, 256) is the reference: latents must fire `contrast_ratio` (2) x more often
  on the probe set than there. The paper's contrast is an option against general text; the pool
  is what the selection has to tell apart, and always-on latents fire there as on the probe set.
  A pool of the task itself (quality selection within a task) leaves no latent, and the run stops
  saying to set `reference=none`.
FRS (both presets): `score_position` reads the kept latents at the recall position (`same`) or at
any other; at a `mean_*` position `frs_norm` says how the per-latent sum over that position's
tokens `T` is normalised: `length` sum / |T| (the mean: the paper's "mean over response tokens",
the default), `sqrt` sum / sqrt|T|, `none` the sum. Active-feature counts track length (r = 0.92,
arXiv 2502.14050), so the sum is largely a length score; the mean favours short examples for a
latent that fires on a few tokens; sqrt lies between.

What this implementation decides where the paper is silent:
- `mu_j` averages over all probe inputs (zeros included); a `mean_*` position averages the
  per-token latents over its tokens (not the latents of the mean residual), so a latent "fires"
  on an example when it fires on any of those tokens.
- probe = every target prompt; dev = `dev_size` target examples (seeded draw, gold responses);
  the metric is the token-weighted teacher-forced response loss (default; `delta = base - steered`)
  or greedy-generation exact match (`metric=accuracy`, numbers as in GSM8K; steers every token).
- steering is applied at `steer_positions`: every token (default), the prompt, or the recall
  position; `delta_j` is the best over `alphas`. Differs from the paper (`robust` preset; `paper`
  keeps the paper's): the first real token (attention sink, off the SAE's training distribution)
  is never steered; each delta must beat the `control_quantile` of `controls` random directions
  of the same norm (same positions, activation and alphas), since on a few dev answers any push
  that size moves the loss about as much; if no latent passes, the run stops (`none_kept=stop`;
  `keep=top` goes on with the best by delta). `paper`: every token, no controls, and with no
  positive delta the best one is kept (`explanations.fallback`). `explanations.filtering` lists
  every candidate's delta, control quantile and why it was kept or dropped (igds_steer.py).
- `contrast`: a file of general text; latents must fire `contrast_ratio` times more often on the
  probe set than there (drops always-on latents); it replaces the pool reference, and the
  template check still reads the pool sample. Ablations: `recall=false` draws `top_k` candidates
  at random among latents that fire on the probe set (no reference, no template check: both are
  part of recall); `filtering=false` keeps all candidates; `reverse=true` selects the lowest FRS.
- snippets: at a `mean_*` FRS position each kept latent's snippet marks its largest token among
  that position's tokens (the prompt's, the response's or all); at `last_prompt`, that token.
- `sae` empty: a TopK SAE is trained on target + pool first (`train` settings; `features.sae_train`;
  reused from `save_sae` when there under the same settings). Its shuffle buffer sees the pool in
  order, so scores then depend on the pool's order; a given SAE makes them order-independent.
Cost: recall is one forward pass over the probe set plus (robust) one over the pool sample, with
every token encoded for the template check; scoring is one pass over the pool; filtering evaluates `top_k x len(alphas)`
steering pairs over the dev set, plus `controls x len(alphas)` per candidate that can be kept
(with `control_stop`, a candidate's controls stop once 2 of 8 reach its delta: the saving is in
the candidates that fail, e.g. B4's 556 pairs instead of 583 where 11 of 18 passed);
batched (`filter_impl`), the blocks up to the SAE layer run once per dev batch and `steer_batch`
pairs share a forward (keep `dev_size` small on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.capture.reductions import REDUCTIONS
from mechsieve.capture.shared import Feature, PassKey, digest
from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Pool
from mechsieve.data.render import pad_id
from mechsieve.features.sae_train import SaeTrainConfig
from mechsieve.scorers.base import ForwardScorer, ScorerError, ScoreResult, ShardState
from mechsieve.scorers.common import ModelScorerConfig, layer_pass, pass_key, render
from mechsieve.scorers.igds_recall import (
    FRS_NORMS,
    POSITIONS,
    TopActivations,
    frs_scale,
    position_mask,
    reference_sample,
    template_rows,
)
from mechsieve.scorers.igds_steer import (
    BatchedDevLoss,
    Filtering,
    count_forwards,
    interventional_filter,
    latents_at,
    reference_evaluator,
    snippet_text,
)

PRESETS: dict[str, dict[str, Any]] = {
    # today's recipe exactly (the paper's, as first built here)
    "paper": {"position": "last_prompt", "reference": "none", "template_filter": False,
              # steering
              "steer_first": True, "controls": 0, "none_kept": "best",
              },
    # this project's (module docstring)
    "robust": {"position": "mean_all", "reference": "pool", "template_filter": True,
               # steering
               "steer_first": False, "controls": 8, "none_kept": "stop",
               },
}
"""The settings each preset gives the IgdsConfig fields left unset (None)."""


@dataclass
class IgdsConfig(ModelScorerConfig):
    """Settings of IGDS."""

    sae: str = ""
    """SAE folder (SAELens, sparsify or mechsieve format) or saelens:RELEASE/ID; empty: train one."""
    layer: int | None = None
    """Block whose residual output the SAE reads; default: the SAE's own (or the middle block)."""
    position: Literal["last_prompt", "mean_prompt", "mean_response", "mean_all"] | None = None
    """Where latents are read for recall (and FRS under score_position=same): the last prompt
    token (paper), or the mean over the prompt, the response or all real tokens (robust)."""
    preset: Literal["robust", "paper"] = "robust"
    """`robust` (default): this project's recipe (module docstring); `paper`: the paper's recipe
    exactly as first built here (no template check, no pool reference, last prompt token). Fields
    left unset (None) take the preset's value; any field set explicitly overrides it."""
    reference: Literal["pool", "none"] | None = None
    """What recall contrasts the probe set against when `contrast` is empty: `pool` (robust) a
    seeded sample of the pool itself, `none` (paper) nothing. A latent must fire contrast_ratio x
    more often on the probe set than on the reference."""
    reference_size: int = 256
    """Pool examples drawn (seeded) for the pool reference and for the template check; 0 = all."""
    template_filter: bool | None = None
    """Drop latents whose top activations sit on the chat template's own tokens (robust: true;
    paper: false)."""
    template_threshold: float = 0.5
    """The template check drops a latent when more than this share of its top activations (over
    the probe set and the pool sample) sit on template tokens."""
    template_top: int = 64
    """How many top activations (token positions) per latent the template check looks at."""
    frs_norm: Literal["length", "sqrt", "none"] = "length"
    """FRS at a `mean_*` position, per latent: `length` sum over its tokens / |T| (the mean: the
    paper's "mean over response tokens", and what every preset does), `sqrt` sum / sqrt|T|, `none`
    the raw sum (tracks length); |T| = the position's token count. No effect at last_prompt."""
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
    score_position: Literal["same", "last_prompt", "mean_prompt", "mean_response", "mean_all"] = "same"
    """Where FRS reads the kept latents: at the recall position (same), or any of the positions
    `position` takes (e.g. recall on the prompt, score the response)."""
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
    # --- steering controls (interventional filtering; scorers/igds_steer.py)
    steer_first: bool | None = None
    """Steer each sequence's first real token too (paper: true, every token). robust: false, that
    token is the attention sink, far off what the SAE was trained on, and its push reaches every
    later token."""
    controls: int | None = None
    """Random-direction controls per candidate latent (robust 8, paper 0: none): its push
    `(alpha - 1) a_j u` with `u` a seeded random direction as long as `W_dec[j]`, same positions,
    same alphas; run for the candidates that can be kept."""
    control_quantile: float = 0.95
    """keep=positive keeps a latent only if its delta is above this quantile of its controls' deltas."""
    control_stop: bool = True
    """keep=positive: run the controls one at a time and stop a candidate's once enough of them
    reach its delta to put the quantile there (2 of 8 at 0.95); the latents kept are the same as
    with every control run. false: all controls of every candidate (each one's exact quantile)."""
    none_kept: Literal["stop", "best"] | None = None
    """When keep=positive keeps no latent: `stop` (robust) the run stops and says why; `best`
    (paper) the single best is kept and `explanations.fallback` says so."""
    filter_impl: Literal["batched", "reference"] = "batched"
    """Interventional filtering: `batched` (steer_batch pairs a forward, blocks below the SAE run
    once per dev batch) or `reference` (one hooked full forward per pair; the same numbers)."""
    steer_batch: int = 8
    """filter_impl=batched: (latent or control, alpha) pairs one forward evaluates, each on its own
    copy of the dev batch; memory grows with it (steer_batch x max_tokens tokens, logits included)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("igds.preset", self.preset, tuple(PRESETS))
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        check_choice("igds.position", self.position, POSITIONS)
        check_choice("igds.reference", self.reference, ("pool", "none"))
        check_choice("igds.frs_norm", self.frs_norm, FRS_NORMS)
        if not 0 <= self.template_threshold <= 1:
            raise ConfigError(f"igds.template_threshold={self.template_threshold}: must be in [0, 1]")
        if self.template_top < 1 or self.reference_size < 0:
            raise ConfigError("igds.template_top must be >= 1 and igds.reference_size >= 0 (0 = the whole pool)")
        check_choice("igds.metric", self.metric, ("loss", "accuracy"))
        check_choice("igds.steer_positions", self.steer_positions, ("all", "prompt", "position"))
        check_choice("igds.keep", self.keep, ("positive", "top"))
        check_choice("igds.weight", self.weight, ("none", "delta"))
        check_choice("igds.score_position", self.score_position, ("same", *POSITIONS))
        if any(int(j) < 0 for j in self.latents):
            raise ConfigError(f"igds.latents={self.latents}: latent indices must be >= 0")
        if self.top_k < 1 or self.keep_top < 1 or self.dev_size < 1:
            raise ConfigError("igds.top_k, igds.keep_top and igds.dev_size must be >= 1")
        if not self.alphas:
            raise ConfigError("igds.alphas is empty; give e.g. [2, 5, 10]")
        if not 0 <= self.freq_threshold < 1:
            raise ConfigError(f"igds.freq_threshold={self.freq_threshold}: must be in [0, 1)")
        # steering controls
        check_choice("igds.none_kept", self.none_kept, ("stop", "best"))
        check_choice("igds.filter_impl", self.filter_impl, ("batched", "reference"))
        if not isinstance(self.steer_first, bool):
            raise ConfigError(f"igds.steer_first={self.steer_first!r}: must be true or false")
        if self.controls < 0 or self.steer_batch < 1:
            raise ConfigError(f"igds.controls={self.controls} must be >= 0 (0: none) and igds.steer_batch="
                              f"{self.steer_batch} >= 1")
        if not 0 < self.control_quantile < 1:
            raise ConfigError(f"igds.control_quantile={self.control_quantile}: must be in (0, 1), e.g. 0.95")


# --- the math: pure functions on arrays -------------------------------------------------------

@dataclass
class Recall:
    """Frequency recall: candidate latents (best first) and per-latent statistics [d_sae];
    `template_share` [d_sae] when the template check ran, `template_dropped` the latents it
    removed from the top_k (best first), `funnel` how many latents passed each test;
    `reference_n` examples in the contrast reference, `template_tokens` tokens the check read."""

    features: np.ndarray
    freq: np.ndarray
    mean: np.ndarray
    contrast_freq: np.ndarray | None = None
    template_share: np.ndarray | None = None
    template_dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    funnel: dict[str, int] = field(default_factory=dict)
    reference_n: int = 0
    template_tokens: int = 0


def frequency_recall(counts: np.ndarray, sums: np.ndarray, n: int, freq_threshold: float, act_floor: float,
                     top_k: int, contrast_counts: np.ndarray | None = None, contrast_n: int = 0,
                     contrast_ratio: float = 2.0, template_share: np.ndarray | None = None,
                     template_threshold: float = 0.5) -> Recall:
    """Candidates from per-latent fire counts / activation sums over `n` probe inputs (IGDS step 3).

    Keeps `freq > freq_threshold`, `mean > act_floor`, with a contrast (reference) set `freq >=
    contrast_ratio * contrast_freq`, and with `template_share` [d_sae] `template_share <=
    template_threshold`; returns the `top_k` by mean activation (ties: lower index). The template
    test comes before the cut, so it makes room for the next latents; `template_dropped` are the
    ones it took out of the top_k that the other tests alone would give.
    """
    freq = counts / max(n, 1)
    mean = sums / max(n, 1)
    ok = (freq > freq_threshold) & (mean > act_floor)
    funnel = {"frequency": int(ok.sum())}
    cfreq = None
    if contrast_counts is not None:
        cfreq = contrast_counts / max(contrast_n, 1)
        ok &= freq >= contrast_ratio * cfreq
        funnel["contrast"] = int(ok.sum())
    idx = np.flatnonzero(ok)
    ranked = idx[np.lexsort((idx, -mean[idx]))]
    dropped = np.zeros(0, dtype=np.int64)
    if template_share is not None:
        on_template = np.asarray(template_share)[ranked] > template_threshold
        dropped = ranked[:top_k][on_template[:top_k]]
        ranked = ranked[~on_template]
        funnel["template"] = len(ranked)
    return Recall(ranked[:top_k].astype(np.int64), freq, mean, cfreq,
                  None if template_share is None else np.asarray(template_share, dtype=np.float64),
                  dropped.astype(np.int64), funnel)


def feature_resonant_score(latents: np.ndarray, features: np.ndarray, weights: np.ndarray | None = None
                           ) -> np.ndarray:
    """FRS(x) = sum_{j in F} w_j a_j(x) for `latents: [n, d_sae]` (IGDS step 5); [n] float64."""
    picked = np.asarray(latents, dtype=np.float64)[:, features]
    if weights is not None:
        picked = picked * np.asarray(weights, dtype=np.float64)[None, :]
    return picked.sum(axis=1)


def keep_features(deltas: np.ndarray, keep: str, keep_top: int, control_q: np.ndarray | None = None,
                  none_kept: str = "best") -> tuple[np.ndarray, bool]:
    """Indices (into the candidates) kept by filtering, best first, and whether the fallback was
    used. keep=positive: delta > 0 and above the controls' quantile `control_q` [c] (nan: no
    controls ran); keep=top: the keep_top best by delta, controls or not. When keep=positive keeps
    none: none_kept=best keeps the single best (the fallback), none_kept=stop raises ScorerError."""
    order = np.argsort(-deltas, kind="stable")
    if keep == "top":
        return order[:keep_top], False
    ok = deltas > 0
    if control_q is not None:
        ok &= np.isnan(control_q) | (deltas > control_q)
    kept = order[ok[order]]
    if len(kept):
        return kept, False
    if none_kept == "best":
        return order[:1], True
    raise ScorerError(none_kept_message(deltas, control_q))


def none_kept_message(deltas: np.ndarray, control_q: np.ndarray | None) -> str:
    """Why interventional filtering kept no latent, and the settings that go on anyway."""
    positive = int((deltas > 0).sum())
    if positive == 0:
        why = f"no candidate latent improved the dev metric (best delta {float(deltas.max()):.4g} of {len(deltas)})"
    else:
        c = int(np.argmax(np.where(deltas > 0, deltas - np.nan_to_num(control_q, nan=0.0), -np.inf)))
        why = (f"{positive} of {len(deltas)} candidate latents improved the dev metric, but none by more than its "
               f"random-direction controls of the same norm (closest: delta {float(deltas[c]):.4g} vs the controls' "
               f"quantile {float(control_q[c]):.4g}); their steering effects are within noise")
    return (f"igds: {why}. Stopping, as scorer.none_kept=stop says. To go on anyway: --set scorer.keep=top (keep the "
            "scorer.keep_top best by delta) or --set scorer.none_kept=best (keep the single best, the paper preset); "
            "for a test with more power: raise scorer.dev_size, try other scorer.alphas, or lower "
            "scorer.control_quantile")


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
    float64 (at a `mean_*` position the mean times `frs_scale` of `norm`), and where each is read
    for its snippet, `where` [n, kept] int64 (the last prompt token, or each latent's largest
    position among the tokens a `mean_*` position averages), relative to the row's first real token."""

    kind = "igds_kept_latents"

    def __init__(self, key: PassKey, sae: Any, kept: np.ndarray, position: str, norm: str = "length") -> None:
        super().__init__(key)
        self.layers = [int(sae.layer)]
        self.sae = sae
        self.kept = np.asarray(kept, dtype=np.int64)
        self.position = position
        self.norm = norm
        self.cols = torch.as_tensor(self.kept, device=sae.W_enc.device)

    def settings(self) -> dict[str, Any]:
        tensors = self.sae.tensors()
        return {"position": self.position, "norm": self.norm, "kept": self.kept.tolist(), "sae": self.sae.describe(),
                "sae_tensors": digest(*(tensors[k].detach().cpu().numpy() for k in sorted(tensors)))}

    def begin(self, n: int) -> None:
        self.vals = np.zeros((n, len(self.kept)), dtype=np.float64)
        self.where = np.zeros((n, len(self.kept)), dtype=np.int64)

    def on_layer(self, ctx, layer: int, acts: torch.Tensor) -> None:
        batch = ctx.batch
        if self.position == "last_prompt":
            a = latents_at(self.sae, acts, batch, self.position, self.cols)  # [b, kept]
            at = (batch.prompt_len - 1).clamp(min=0)[:, None].expand(-1, len(self.kept))
        else:  # one encode for both the mean and the snippet's position
            full = self.sae.encode(acts)[..., self.cols]  # [b, t, kept]
            a = REDUCTIONS[self.position](full, batch)
            inside = position_mask(batch, self.position, full.shape[1])
            at = full.masked_fill(~inside[..., None], -1.0).argmax(dim=1) - batch.offsets[:, None]
        self.vals[ctx.indices] = (a.double() * frs_scale(batch, self.position, self.norm)[:, None]).cpu().numpy()
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

    def latent_stats(self, loaded: Any, examples: list, sae: Any, progress: bool, desc: str,
                     top: TopActivations | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-latent fire counts and activation sums at the recall position over `examples`;
        with `top`, every real token's latents also go to the template check."""
        cfg = self.config
        counts = np.zeros(sae.d_sae, dtype=np.int64)
        sums = np.zeros(sae.d_sae, dtype=np.float64)
        rendered = render(examples, loaded, cfg)
        masks = [r.content_mask for r in rendered]

        def on_layer(ctx, layer: int, acts: torch.Tensor) -> None:
            if top is None:
                a = latents_at(sae, acts, ctx.batch, cfg.position)
            else:  # one encode of every token, for both
                full = sae.encode(acts)  # [b, t, d_sae]
                real = ctx.batch.attention_mask.bool()
                top.update(full[real], template_rows(masks, ctx.indices, ctx.batch.offsets, acts.shape[1])[real])
                a = REDUCTIONS[cfg.position](full, ctx.batch)
            counts[:] += (a > 0).sum(0).cpu().numpy()
            sums[:] += a.double().sum(0).cpu().numpy()

        if examples:
            layer_pass(loaded.model, rendered, [sae.layer], "resid", cfg, pad_id(loaded.tokenizer), on_layer, progress,
                       desc)
        return counts, sums, len(examples)

    def candidates(self, loaded: Any, target: Pool, sae: Any, seed: int, progress: bool,
                   pool: Pool | None = None) -> Recall:
        """Frequency recall on the probe (target) set, against the reference (`contrast` file, or a
        pool sample under reference=pool) and with the template check over probe + pool sample."""
        cfg = self.config
        if not cfg.recall:  # ablation: random latents among those active on the probe set
            counts, sums, n = self.latent_stats(loaded, target.examples, sae, progress, "igds: probe")
            active = np.flatnonzero(counts > 0)
            active = active if len(active) else np.arange(sae.d_sae)
            rng = np.random.default_rng(seed)
            picked = np.sort(rng.choice(active, size=min(cfg.top_k, len(active)), replace=False))
            return Recall(picked.astype(np.int64), counts / max(n, 1), sums / max(n, 1), None)
        top = TopActivations(sae.d_sae, cfg.template_top) if cfg.template_filter else None
        counts, sums, n = self.latent_stats(loaded, target.examples, sae, progress, "igds: probe", top)
        examples = pool.examples if pool is not None else []
        sample = [examples[i] for i in reference_sample(len(examples), cfg.reference_size, seed)]
        c_counts, c_n = None, 0
        if cfg.contrast:
            from mechsieve.data.readers import read_pool

            general = read_pool(cfg.contrast)
            c_counts, _, c_n = self.latent_stats(loaded, general.examples, sae, progress, "igds: contrast")
        if cfg.reference == "pool" and not cfg.contrast:
            c_counts, _, c_n = self.latent_stats(loaded, sample, sae, progress, "igds: pool reference", top)
        elif top is not None:
            self.latent_stats(loaded, sample, sae, progress, "igds: template check", top)
        rec = frequency_recall(counts, sums, n, cfg.freq_threshold, cfg.act_floor, cfg.top_k, c_counts, c_n,
                               cfg.contrast_ratio, None if top is None else top.share(), cfg.template_threshold)
        rec.reference_n, rec.template_tokens = c_n, 0 if top is None else top.tokens
        return rec

    def filter(self, loaded: Any, target: Pool, sae: Any, features: np.ndarray, seed: int) -> Filtering:
        """Interventional filtering of the candidate latents `features` on a seeded draw of
        `dev_size` target examples (igds_steer.interventional_filter): deltas, best alphas, the base
        metric, the controls' deltas and quantiles, batched or one pair at a time."""
        cfg = self.config
        n_dev = min(cfg.dev_size, len(target.examples))
        rng = np.random.default_rng(seed)
        dev = [target.examples[i] for i in np.sort(rng.choice(len(target.examples), n_dev, replace=False))]
        rendered = None if cfg.metric == "accuracy" else render(dev, loaded, cfg)
        if rendered is not None and cfg.filter_impl == "batched":
            evaluate = BatchedDevLoss(loaded, rendered, sae, cfg, cfg.controls, seed)
        else:
            evaluate = reference_evaluator(loaded, dev, rendered, sae, cfg, cfg.controls, seed)
        with count_forwards(loaded.model) as forwards:
            filt = interventional_filter(evaluate, features, cfg.alphas, 1.0 if rendered is None else -1.0,
                                         cfg.controls, cfg.control_quantile, cfg.keep, cfg.keep_top,
                                         cfg.control_stop)
        filt.forwards = forwards[0]
        return filt

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
            rec = self.candidates(loaded, target, sae, seed, progress, pool)
        t.append(time.perf_counter())
        if len(rec.features) == 0:
            raise ScorerError(self.no_candidates(rec, len(target)))
        deltas = np.zeros(len(rec.features))
        alphas = np.ones(len(rec.features))
        base, fallback = None, False
        kept_idx = np.arange(len(rec.features))
        if cfg.filtering and not cfg.latents:
            filt = self.filter(loaded, target, sae, rec.features, seed)
            deltas, alphas, base = filt.deltas, filt.best_alpha, filt.base
            kept_idx, fallback = keep_features(deltas, cfg.keep, cfg.keep_top, filt.control_q, cfg.none_kept)
        t.append(time.perf_counter())
        kept = rec.features[kept_idx]
        table = []
        for c, j in zip(kept_idx, kept):
            row = {"feature": int(j), "freq": round(float(rec.freq[j]), 4), "mean_act": round(float(rec.mean[j]), 5)}
            if rec.contrast_freq is not None:
                row["contrast_freq"] = round(float(rec.contrast_freq[j]), 4)
            if rec.template_share is not None:
                row["template_share"] = round(float(rec.template_share[j]), 4)
            if cfg.filtering and not cfg.latents:
                q = filt.control_q[c]
                row.update(delta=round(float(deltas[c]), 6), best_alpha=float(alphas[c]),
                           control_q=None if np.isnan(q) else round(float(q), 6))
            table.append(row)
        explanations = {
            "sae": sae.describe(), "layer": sae.layer, "position": cfg.position, "metric": cfg.metric,
            "candidates": [int(j) for j in rec.features], "kept": [int(j) for j in kept],
            "base_dev_metric": None if base is None else round(float(base), 6), "fallback": fallback,
            "ablations": {"recall": cfg.recall, "filtering": cfg.filtering, "reverse": cfg.reverse},
            "latents_given": bool(cfg.latents),
            "features": table,
            **self.recall_report(rec),
        }
        if cfg.filtering and not cfg.latents:
            explanations["filtering"] = {
                "impl": cfg.filter_impl, "steer_first": cfg.steer_first, "controls": cfg.controls,
                "control_quantile": cfg.control_quantile, "control_stop": cfg.control_stop,
                "none_kept": cfg.none_kept, "pairs": filt.pairs,
                "forwards": filt.forwards, "candidates": filt.table(rec.features, kept_idx, fallback)}
        if train_report:
            explanations["sae_training"] = train_report
        state: ShardState = {**sae_state(sae), "kept": kept.astype(np.int64), "explanations": explanations,
                             "timings": {p: t[i + 1] - t[i] for i, p in enumerate(("sae", "recall", "filtering"))}}
        if cfg.weight == "delta" and cfg.filtering and not cfg.latents:
            state["weights"] = deltas[kept_idx].astype(np.float64)
        return state

    def recall_report(self, rec: Recall) -> dict[str, Any]:
        """The explanations' preset, FRS reading and `recall` parts: the reference, how many latents
        passed each test, and the template check's threshold and dropped latents with their shares."""
        cfg = self.config
        reference = "file" if cfg.contrast else cfg.reference
        recall: dict[str, Any] = {"reference": reference if cfg.recall and not cfg.latents else "none",
                                  "reference_examples": rec.reference_n, "funnel": dict(rec.funnel)}
        if rec.template_share is not None:
            recall["template"] = {
                "threshold": cfg.template_threshold, "top": cfg.template_top, "tokens": rec.template_tokens,
                "dropped": [{"feature": int(j), "template_share": round(float(rec.template_share[j]), 4),
                             "freq": round(float(rec.freq[j]), 4), "mean_act": round(float(rec.mean[j]), 5)}
                            for j in rec.template_dropped]}
        return {"preset": cfg.preset, "score_position": self.frs_position(), "frs_norm": cfg.frs_norm,
                "recall": recall}

    def no_candidates(self, rec: Recall, n_probe: int) -> str:
        """Why recall found nothing, with the setting that fixes each likely cause."""
        cfg = self.config
        funnel = ", ".join(f"{k}: {v}" for k, v in rec.funnel.items())
        fixes = [f"lower igds.freq_threshold (now {cfg.freq_threshold}) or igds.act_floor (now {cfg.act_floor})"]
        if rec.funnel.get("contrast", 1) == 0 < rec.funnel.get("frequency", 0):
            fixes.append("the contrast removed every latent" + (
                ": the pool reference looks like the probe set (a pool of the task itself, e.g. quality "
                "selection within a task); set igds.reference=none" if not cfg.contrast else "; drop igds.contrast")
                + f" or lower igds.contrast_ratio (now {cfg.contrast_ratio})")
        if rec.funnel.get("template", 1) == 0 < rec.funnel.get("contrast", rec.funnel.get("frequency", 0)):
            fixes.append("every latent left sits on chat-template tokens; set igds.template_filter=false or raise "
                         f"igds.template_threshold (now {cfg.template_threshold})")
        return (f"igds: no SAE latent passed frequency recall on {n_probe} probe inputs at position={cfg.position} "
                f"(latents left after each test: {funnel or 'none'}); " + "; ".join(fixes))

    def frs_position(self) -> str:
        return self.config.position if self.config.score_position == "same" else self.config.score_position

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        device = next(loaded.model.parameters()).device
        sae = sae_from_state(state).to(device)
        return {"latents": KeptLatents(pass_key(self.config), sae, state["kept"], self.frs_position(),
                                       self.config.frs_norm)}

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
