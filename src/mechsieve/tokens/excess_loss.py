"""Excess-loss token masking: keep the response tokens a clean in-domain reference finds easier.

Rho-1: Lin et al., "Not All Tokens Are What You Need for Pretraining" (arXiv 2404.07965), Eq. 3-4:
a reference model is trained on clean, in-domain data; the excess loss of token t is
L_base(t) - L_ref(t) (next-token NLL of t from position t - 1), and the training loss is taken
only on the top k% of tokens by it. TokenCleaning: Pang et al., "Token Cleaning: Fine-Grained
Data Selection for LLM Supervised Fine-Tuning" (ICML 2025, UCSC-REAL/TokenCleaning) applies it
to SFT answers and keeps the top 60% of tokens over the whole pool. A token the reference
predicts no better than the base (inserted noise, off-domain text) gets a low or negative excess
loss and is masked.

Here the reference is the base model with a LoRA fitted on the in-domain set (`fit_reference`,
on a deep copy: the user's base model is never touched), a folder the user gives (a model, or a
PEFT LoRA adapter over the base: `load_reference`), or any loaded model passed in. Scoring is two
batched passes (base, then reference), each a `TokenNll` feature (capture.token_features) of
`capture.shared.feature_pass`, so a FeatureCache keeps them (the reference under an identity of its
own) and the base term can share the pool pass of other methods (tokens.shared.score_and_mask);
only one batch's logits [b, t, V] exist at a time. Special tokens (the end-of-turn marker) are never masked. The
ranking of `keep_top` is over the pool, not per example (as TokenCleaning): masked tokens are the
floor((1 - keep) * n) lowest of the pool's n eligible scored tokens, ties masked in pool order
(earlier example, then earlier position, first).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mechsieve.config import ConfigError, check_choice, check_positive
from mechsieve.data.render import RenderConfig, Rendered
from mechsieve.models.loading import LoadedModel
from mechsieve.tokens.base import EL, TokenMasks, TokenScores, register_masker
from mechsieve.tokens.shared import ForwardMasker
from mechsieve.tokens.xtf import eligible_tokens
from mechsieve.train.config import TrainConfig


@dataclass
class ReferenceTrainConfig(TrainConfig):
    """TrainConfig with defaults for fitting a reference LoRA on a small clean in-domain set.

    A subclass rather than a TrainConfig built with other values, so that a YAML section or a
    `--set excess_loss.train.lora_r=8` keeps these defaults for the fields it does not name.
    """

    learning_rate: float = 1e-4
    """Peak learning rate of AdamW. Half the fine-tuning default: the set is small and seen
    several times, and the reference should learn the domain, not memorise the answers."""
    epochs: float = 3.0
    """Passes over the in-domain set. One pass over a few hundred answers is a few dozen steps,
    too few for a LoRA to move; three give the reference a clear edge on in-domain tokens."""


@dataclass
class ExcessLossConfig:
    """Settings of excess-loss token masking (Rho-1 / TokenCleaning)."""

    rule: Literal["keep_top", "threshold"] = "keep_top"
    """keep_top: keep the `keep` fraction of the pool's tokens with the highest excess loss;
    threshold: mask tokens whose excess loss is below `threshold`."""
    keep: float = 0.6
    """keep_top: fraction of the pool's eligible response tokens kept (TokenCleaning's 60%);
    the ranking is over the whole pool, not per example."""
    threshold: float = 0.0
    """threshold: mask tokens whose excess loss (nats) is below it; 0 masks every token the
    reference predicts worse than the base."""
    reference: str = ""
    """A folder of a reference model, or of a PEFT LoRA adapter over the base (adapter_config.json
    present), e.g. the `reference/` a previous run wrote; empty: fit one on the in-domain set."""
    train: ReferenceTrainConfig = field(default_factory=ReferenceTrainConfig)
    """How the reference LoRA is fitted on the clean in-domain set: a TrainConfig with its own
    defaults (3 epochs at lr 1e-4); a plain TrainConfig given in code is used as it is."""
    max_tokens: int = 4096
    """Token budget of one scoring batch (batch size x longest sequence)."""
    max_batch: int = 64
    """Most examples in one scoring batch."""

    def __post_init__(self) -> None:
        check_choice("excess_loss.rule", self.rule, ("keep_top", "threshold"))
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"excess_loss.keep={self.keep} must lie in (0, 1] (the fraction of tokens kept)")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"excess_loss.threshold={self.threshold} must be a finite number (nats)")
        if not isinstance(self.reference, str):
            raise ConfigError(f"excess_loss.reference={self.reference!r} must be a folder path or empty")
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"excess_loss.train must be a TrainConfig section, got {type(self.train).__name__}")
        check_positive("excess_loss.max_tokens", self.max_tokens)
        check_positive("excess_loss.max_batch", self.max_batch)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of each token given its prefix.

    logits: [b, t, V]; input_ids: [b, t]; valid: [b, t] bool. Returns [b, t] float32 with
    out[b, j] = -log_softmax(logits[b, j - 1])[input_ids[b, j]], NaN at j = 0 and where token j or
    j - 1 is padding. One row at a time, in float32, so the extra memory is one [t, V] row.
    """
    b, t = input_ids.shape
    out = torch.full((b, t), float("nan"), dtype=torch.float32, device=logits.device)
    for r in range(b):
        nll = F.cross_entropy(logits[r, :-1].float(), input_ids[r, 1:], reduction="none")
        ok = valid[r, 1:] & valid[r, :-1]
        out[r, 1:] = torch.where(ok, nll, out[r, 1:])
    return out


def keep_top_mask(scores_list: Sequence[np.ndarray], eligible_list: Sequence[np.ndarray], keep: float
                  ) -> list[np.ndarray]:
    """Rho-1 / TokenCleaning selection over a pool: bool [t_i] per example, True = masked.

    scores_list[i], eligible_list[i]: [t_i]. Of the pool's n eligible tokens with a finite score,
    the floor((1 - keep) * n) lowest are masked (so at least keep * n are kept); ties are masked
    in pool order (earlier example, then earlier position, first). Other tokens are never masked.
    """
    ok = [e & np.isfinite(s) for s, e in zip(scores_list, eligible_list)]
    flat = np.concatenate([s[m] for s, m in zip(scores_list, ok)] or [np.zeros(0)])
    n_mask = int(np.floor((1.0 - keep) * flat.size + 1e-9))
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argsort(flat, kind="stable")[:n_mask]] = True  # stable: ties in pool order
    out, start = [], 0
    for m in ok:
        mask = np.zeros(m.shape, dtype=bool)
        mask[m] = chosen[start:start + int(m.sum())]
        start += int(m.sum())
        out.append(mask)
    return out


def below_threshold_mask(scores_list: Sequence[np.ndarray], eligible_list: Sequence[np.ndarray],
                         threshold: float) -> list[np.ndarray]:
    """Eligible tokens with a finite score below `threshold`: bool [t_i] per example, True = masked."""
    out = []
    for s, e in zip(scores_list, eligible_list):
        ok = e & np.isfinite(s)
        out.append(ok & (np.where(ok, s, np.inf) < threshold))
    return out


def _module(model: Any) -> Any:
    return model.model if isinstance(model, LoadedModel) else model


def weights_digest(module: Any) -> str:
    """A short content hash of a model's LoRA weights (of all its weights when it has none)."""
    from mechsieve.capture.shared import digest

    params = [(n, p) for n, p in module.named_parameters() if "lora_" in n] or list(module.named_parameters())
    return digest(*[p.detach().float().cpu().numpy() for _, p in sorted(params, key=lambda x: x[0])])


@register_masker("excess-loss")
class ExcessLoss(ForwardMasker):
    """Excess-loss token masking (see the module docstring for the papers and the choices).

    `reference`: an already loaded reference model (a LoadedModel, or a causal LM module taking
    the same input ids and returning `.logits`); else call `fit_reference` or `load_reference`.
    """

    def __init__(self, cfg: ExcessLossConfig | None = None, reference: Any = None) -> None:
        self.cfg = cfg or ExcessLossConfig()
        self.reference = reference
        self.reference_info: dict[str, Any] = {"source": "given"} if reference is not None else {}

    # -- the reference model -----------------------------------------------------------------
    def fit_reference(self, loaded: LoadedModel, examples: Sequence[Any], render_cfg: RenderConfig | None = None,
                      progress: bool = True, out_dir: str | Path | None = None) -> LoadedModel:
        """Fit a LoRA (per cfg.train) on a deep copy of `loaded.model` over the in-domain
        `examples` (Example records); store it as self.reference and return it. `out_dir`: also
        save the adapter there (with train.json), loadable later as excess_loss.reference."""
        from mechsieve.train.items import items_from_examples
        from mechsieve.train.loop import train

        items = items_from_examples(examples, loaded.tokenizer, render_cfg)
        ref = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, dict(loaded.identity), loaded.config)
        result = train(ref, items, self.cfg.train, out_dir=out_dir, progress=progress)
        self.reference = ref
        self.reference_info = {"source": "fitted", "examples": len(examples), "steps": result.steps,
                               "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1],
                               "seconds": round(result.seconds, 2),
                               "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None}
        return ref

    def load_reference(self, loaded: LoadedModel) -> LoadedModel:
        """Load cfg.reference for the base `loaded`: a PEFT adapter folder over a deep copy of the
        base, or a model folder (on the base's device and dtype); store and return it."""
        from mechsieve.models.loading import load_model
        from mechsieve.train.lora import ADAPTER_CONFIG, load_adapter

        folder = Path(self.cfg.reference)
        if not self.cfg.reference or not folder.is_dir():
            raise ConfigError(f"excess_loss.reference={self.cfg.reference!r} is not a folder; give a model folder, "
                              "a LoRA adapter folder (`mechsieve train --out`), or leave it empty to fit one on "
                              "the in-domain set")
        if (folder / ADAPTER_CONFIG).exists():
            base = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, dict(loaded.identity), loaded.config)
            ref, kind = load_adapter(base, folder), "adapter"
        else:
            dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
            cfg = replace(loaded.config, name=str(folder), device=str(loaded.device),
                          dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "auto")
            ref, kind = load_model(cfg), "model"
            if ref.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
                raise ConfigError(f"excess_loss.reference={self.cfg.reference!r}: its tokenizer differs from the "
                                  "base model's; excess loss compares the same tokens, so the reference must share "
                                  "the base's tokenizer (fine-tune it from the base, or leave reference empty)")
        self.reference = ref
        self.reference_info = {"source": kind, "folder": str(folder)}
        return ref

    # -- scoring (model): one TokenNll feature per model ---------------------------------------
    def reference_loaded(self, loaded: LoadedModel, identify: bool = False) -> LoadedModel:
        """The reference as a LoadedModel with the base's tokenizer. `identify`: give it an identity
        of its own for the feature cache: a loaded model's own identity when it differs from the
        base's, else the base's plus a digest of the reference's weights (its LoRA weights when it
        has some; a fitted or adapter-loaded reference is a copy of the base with the base's identity)."""
        if self.reference is None:
            raise ConfigError("excess-loss has no reference model: call fit_reference(loaded, in_domain_examples) "
                              "or set excess_loss.reference to a model / adapter folder and call load_reference")
        module = _module(self.reference)
        identity: dict[str, Any] = {}
        if identify:
            own = self.reference.identity if isinstance(self.reference, LoadedModel) else None
            identity = dict(own) if own and own != loaded.identity else {**loaded.identity,
                                                                          "reference": weights_digest(module)}
        return LoadedModel(module, loaded.tokenizer, identity, loaded.config)

    def feature_passes(self, loaded: LoadedModel, key: Any = None, *, cache: Any = None,
                       progress: bool = True) -> list[Any]:
        """`base`: the base model's TokenNll (capture.token_features), `reference`: the reference
        model's, with the same pass key (`key`, or this masker's batching settings)."""
        from mechsieve.capture.token_features import TokenNll
        from mechsieve.tokens.shared import ModelFeatures, rendered_key

        ref = self.reference_loaded(loaded, identify=cache is not None)
        key = key or rendered_key(self.cfg.max_tokens, self.cfg.max_batch)
        return [ModelFeatures(loaded, {"base": TokenNll(key)}), ModelFeatures(ref, {"reference": TokenNll(key)})]

    def from_features(self, loaded: LoadedModel, rendered: Sequence[Rendered], arrays: dict[str, dict[str, np.ndarray]],
                      reports: list[Any]) -> TokenScores:
        """Per-token base and reference NLL on the response (NaN elsewhere and at position 0) and
        their difference `el` = base - reference."""
        from mechsieve.capture.token_features import split
        from mechsieve.tokens.shared import pass_summary

        eligible = eligible_tokens(rendered, getattr(loaded.tokenizer, "all_special_ids", []) or [])
        v_base, v_ref = int(arrays["base"]["vocab"][0]), int(arrays["reference"]["vocab"][0])
        if v_base != v_ref and rendered:
            raise ConfigError(f"the reference model's vocabulary ({v_ref}) differs from the base's ({v_base}); "
                              "excess loss needs the same tokenizer and output head size (excess_loss.reference)")
        base, ref = ([np.where(r.response_mask, nll, np.nan).astype(np.float32)
                      for r, nll in zip(rendered, split(arrays[name]))] for name in ("base", "reference"))
        excess = [b - r for b, r in zip(base, ref)]
        forward = {name: pass_summary([report]) for name, report in zip(("base", "reference"), reports)}
        info = {"reference": self.reference_info, "forward": forward}
        return TokenScores({"el": excess, "loss_base": base, "loss_ref": ref}, eligible, info)

    # -- deciding (pure) ---------------------------------------------------------------------
    def decide(self, scores: TokenScores) -> TokenMasks:
        cfg = self.cfg
        excess = scores.scores["el"]
        info: dict[str, Any] = {"rule": cfg.rule}
        if cfg.rule == "keep_top":
            masks = keep_top_mask(excess, scores.eligible, cfg.keep)
            kept = np.concatenate([s[e & np.isfinite(s) & ~m] for s, e, m in zip(excess, scores.eligible, masks)]
                                  or [np.zeros(0)])
            # the lowest kept score: below it everything is masked; at it, ties split in pool order
            info |= {"keep": cfg.keep, "cut": float(kept.min()) if kept.size else None}
        else:
            masks = below_threshold_mask(excess, scores.eligible, cfg.threshold)
            info |= {"threshold": cfg.threshold, "cut": cfg.threshold}
        n_eligible = int(sum(int(e.sum()) for e in scores.eligible))
        n_masked = int(sum(int(m.sum()) for m in masks))
        info["masked_share"] = round(n_masked / n_eligible, 6) if n_eligible else 0.0
        reasons = [m.astype(np.uint8) * EL for m in masks]
        return TokenMasks(masks, reasons, info)
