"""XTF: explainable token-level noise filtering (reasoning importance, knowledge novelty, relevance).

Paper: Yang et al., "Explainable Token-level Noise Filtering for LLM Fine-tuning Datasets" (ICLR
2026, arXiv 2602.14536). A response token is noise when it fails any one of three tests, and
noise tokens get label -100:
- RI (reasoning importance): attention the token *receives* from later tokens, averaged over
  heads and layers (or the last layer); noise below Q1 - 1.5 IQR of the example, capped at p_RI.
- KN (knowledge novelty): teacher-forced probability of the token; noise above 0.95 (already
  known), capped at p_KN (the most probable kept).
- TR (task relevance): cosine of the token's context-free embedding (the token fed alone,
  last-layer hidden state after the final norm) with a domain vector (mean over a word list);
  Multi-Otsu over all token occurrences of the pool; noise in the second-lowest cluster (paper),
  capped at p_TR per example.

Differences from the published code (EonHao/XTF), on purpose: RI is a column statistic (what a
token receives), not the row mean of a softmax that is 1/t for every token; the TR cluster is
the one the paper names, not a threshold walked from cumulative proportions. Where the paper is
silent: RI averages over the later queries (a sum would favour early tokens, which have more of
them); domain words are embedded token by token with the same context-free embeddings as the
scored tokens; special tokens (e.g. the end-of-turn marker that teaches stopping) are never
masked; caps are floor(p * eligible tokens) per example. Everything takes one hooked forward
pass per batch (attention + logits) plus one pass over the distinct token ids, cached.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.render import Rendered, pad_id
from mechsieve.tokens.attributes import (
    above_threshold,
    cosine_to,
    in_clusters,
    iqr_low_outliers,
    received_attention,
    token_probabilities,
)
from mechsieve.tokens.base import REASON_BITS, TokenMasker, TokenMasks, TokenScores, register_masker
from mechsieve.tokens.otsu import multi_otsu

DOMAINS = ("math", "code", "medicine")
TR_CLUSTERS = {"second_lowest": [1], "lowest": [0], "two_lowest": [0, 1]}


@dataclass
class XtfConfig:
    """Settings of XTF token masking."""

    attributes: list[str] = field(default_factory=lambda: ["ri", "kn", "tr"])
    """Which tests to run: any of ri, kn, tr (the mask is their union)."""
    ri_layers: Literal["all", "last"] = "all"
    """RI from attention averaged over all layers (paper) or the last layer only."""
    ri_iqr_k: float = 1.5
    """RI noise below Q1 - k * IQR of the example's response tokens."""
    p_ri: float = 0.05
    """Most RI-masked tokens, as a fraction of an example's response tokens."""
    kn_threshold: float = 0.95
    """KN noise when the teacher-forced probability is above this."""
    p_kn: float = 0.10
    """Most KN-masked tokens, as a fraction of an example's response tokens."""
    domain: str = "math"
    """Built-in domain word list for TR: math, code, medicine (ignored when words_file is set)."""
    words_file: str | None = None
    """A user word list for TR: one word a line, # comments."""
    tr_classes: int = 5
    """Number of Multi-Otsu classes over the TR similarities (the published code uses 5)."""
    tr_cluster: Literal["second_lowest", "lowest", "two_lowest"] = "second_lowest"
    """Which low-relevance cluster is noise: second_lowest (paper), lowest, or both."""
    p_tr: float = 0.10
    """Most TR-masked tokens, as a fraction of an example's response tokens."""
    max_tokens: int = 4096
    """Token budget of one forward batch (eager attention holds [b, heads, t, t] per layer)."""
    max_batch: int = 64
    """Most examples in one forward batch."""

    def __post_init__(self) -> None:
        bad = [a for a in self.attributes if a not in REASON_BITS]
        if bad or not self.attributes:
            raise ConfigError(f"xtf.attributes={self.attributes}: choose one or more of {list(REASON_BITS)}")
        check_choice("xtf.ri_layers", self.ri_layers, ("all", "last"))
        check_choice("xtf.tr_cluster", self.tr_cluster, tuple(TR_CLUSTERS))
        if self.words_file is None:
            check_choice("xtf.domain", self.domain, DOMAINS)
        for name in ("p_ri", "p_kn", "p_tr", "kn_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"xtf.{name}={value} must lie in [0, 1]")
        if self.tr_classes < 2 or (self.tr_cluster != "lowest" and self.tr_classes < 3):
            raise ConfigError(f"xtf.tr_classes={self.tr_classes}: need >= 2 (>= 3 unless tr_cluster=lowest)")
        if self.max_tokens < 1 or self.max_batch < 1:
            raise ConfigError("xtf.max_tokens and xtf.max_batch must be positive")


def parse_word_list(text: str) -> list[str]:
    """Words of a word-list file: one a line, blank lines and # comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def bundled_words(domain: str) -> list[str]:
    """The built-in word list of `domain` (math, code, medicine)."""
    check_choice("xtf.domain", domain, DOMAINS)
    path = resources.files("mechsieve.tokens") / "wordlists" / f"{domain}.txt"
    return parse_word_list(path.read_text(encoding="utf-8"))


def context_free_embeddings(model: Any, token_ids: Sequence[int], batch: int = 512) -> torch.Tensor:
    """Last-layer hidden state (after the final norm) of each token fed alone: [n, d] float32."""
    from mechsieve.models.hooks import unwrap

    base = unwrap(model).base_model
    device = next(base.parameters()).device
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch, None]
            hidden = base(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
    d = unwrap(model).config.hidden_size
    return torch.cat(out) if out else torch.zeros(0, d)


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids of `word` as it appears mid-text (with a leading space), whitespace-only pieces
    dropped."""
    for text in (" " + word, word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if tokenizer.decode([i]).strip()]
        if ids:
            return ids
    return []


@register_masker("xtf")
class Xtf(TokenMasker):
    """XTF token masking (see the module docstring for the paper and the differences)."""

    def __init__(self, cfg: XtfConfig | None = None, words: list[str] | None = None) -> None:
        self.cfg = cfg or XtfConfig()
        self.words = words if words is not None else bundled_words(self.cfg.domain)
        if "tr" in self.cfg.attributes and not self.words:
            raise ConfigError("xtf: the TR word list is empty; give xtf.words_file with words or a domain")
        self._embed_cache: dict[int, torch.Tensor] = {}
        self._cache_owner: int | None = None

    # -- scoring (model) ---------------------------------------------------------------------
    def score(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], progress: bool = True) -> TokenScores:
        cfg = self.cfg
        start = time.perf_counter()
        eligible = eligible_tokens(rendered, getattr(tokenizer, "all_special_ids", []) or [])
        scores: dict[str, list[np.ndarray]] = {}
        info: dict[str, Any] = {}
        if "ri" in cfg.attributes or "kn" in cfg.attributes:
            ri, kn, stats = self._forward_scores(model, tokenizer, rendered, progress)
            if "ri" in cfg.attributes:
                scores["ri"] = ri
            if "kn" in cfg.attributes:
                scores["kn"] = kn
            info["forward"] = {"tokens": stats.real_tokens, "seconds": round(stats.seconds, 2),
                               "batches": stats.batches}
        if "tr" in cfg.attributes:
            scores["tr"], info["tr"] = self._relevance(model, tokenizer, rendered, eligible)
        info["seconds"] = round(time.perf_counter() - start, 2)
        return TokenScores(scores, eligible, info)

    def _forward_scores(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], progress: bool):
        from mechsieve.capture.batching import plan_batches
        from mechsieve.capture.forward import ForwardSpec, run_forward
        from mechsieve.models.hooks import hook_points

        cfg = self.cfg
        n_layers = hook_points(model).n_layers
        want_ri, want_kn = "ri" in cfg.attributes, "kn" in cfg.attributes
        layers = (list(range(n_layers)) if cfg.ri_layers == "all" else [n_layers - 1]) if want_ri else []
        ri = [np.full(len(r), np.nan, dtype=np.float32) for r in rendered]
        kn = [np.full(len(r), np.nan, dtype=np.float32) for r in rendered]
        acc: dict[str, torch.Tensor] = {}

        def on_attention(ctx, layer, probs):
            total, n_later = received_attention(probs, ctx.batch.attention_mask.bool())
            acc["total"] = acc["total"] + total if "total" in acc else total
            acc["n_later"] = n_later

        def on_logits(ctx, logits):
            acc["kn"] = token_probabilities(logits, ctx.batch.input_ids, ctx.batch.attention_mask.bool())

        def on_batch_end(number, ctx):
            b = ctx.batch
            if want_ri:
                n = acc["n_later"].float()
                value = (acc.pop("total") / len(layers)) / n.clamp_min(1.0)
                value = torch.where(n > 0, value, torch.full_like(value, float("nan"))).cpu().numpy()
            if want_kn:
                prob = acc.pop("kn").cpu().numpy()
            for row, i in enumerate(ctx.indices):
                lo, length = int(b.offsets[row]), int(b.lengths[row])
                if want_ri:
                    ri[i] = value[row, lo:lo + length].astype(np.float32)
                if want_kn:
                    kn[i] = prob[row, lo:lo + length].astype(np.float32)

        plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
        spec = ForwardSpec(attention_layers=layers, need_logits=want_kn)
        stats = run_forward(model, rendered, plan, spec, pad_id(tokenizer), on_attention=on_attention,
                            on_logits=on_logits, on_batch_end=on_batch_end, progress=progress, desc="xtf")
        return ri, kn, stats

    def _relevance(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], eligible: list[np.ndarray]):
        if self._cache_owner != id(model):
            self._embed_cache, self._cache_owner = {}, id(model)
        word_ids = {w: word_token_ids(tokenizer, w) for w in self.words}
        used = [w for w, ids in word_ids.items() if ids]
        if not used:
            raise ConfigError("xtf: none of the TR words tokenizes to a non-space token; check the word list")
        needed = {int(t) for r, e in zip(rendered, eligible) for t in r.input_ids[e]}
        needed |= {t for w in used for t in word_ids[w]}
        missing = sorted(needed - self._embed_cache.keys())
        if missing:
            emb = context_free_embeddings(model, missing)
            self._embed_cache.update({t: emb[k] for k, t in enumerate(missing)})
        domain = torch.stack([torch.stack([self._embed_cache[t] for t in word_ids[w]]).mean(0) for w in used]).mean(0)
        ids = sorted(needed)
        sims = cosine_to(torch.stack([self._embed_cache[t] for t in ids]), domain).numpy() if ids else np.zeros(0)
        lookup = dict(zip(ids, sims.tolist()))
        tr = []
        for r, e in zip(rendered, eligible):
            out = np.full(len(r), np.nan, dtype=np.float32)
            out[e] = [lookup[int(t)] for t in r.input_ids[e]]
            tr.append(out)
        return tr, {"words_used": len(used), "words_skipped": len(self.words) - len(used),
                    "distinct_tokens": len(ids), "embedded_now": len(missing)}

    # -- deciding (pure) ---------------------------------------------------------------------
    def decide(self, scores: TokenScores) -> TokenMasks:
        cfg = self.cfg
        info: dict[str, Any] = {}
        thresholds = None
        if "tr" in scores.scores:
            tr_all = np.concatenate([s[e] for s, e in zip(scores.scores["tr"], scores.eligible)] or [np.zeros(0)])
            tr_all = tr_all[np.isfinite(tr_all)]
            if tr_all.size:
                thresholds = multi_otsu(tr_all, cfg.tr_classes)
                info["tr_thresholds"] = [float(t) for t in thresholds]
                cluster = np.digitize(tr_all, thresholds)
                info["tr_cluster_shares"] = [float(np.mean(cluster == k)) for k in range(cfg.tr_classes)]
        masks, reasons = [], []
        for i, elig in enumerate(scores.eligible):
            reason = np.zeros(elig.shape, dtype=np.uint8)
            if "ri" in scores.scores:
                flag = iqr_low_outliers(scores.scores["ri"][i], elig, cfg.ri_iqr_k, cfg.p_ri)
                reason |= flag.astype(np.uint8) * REASON_BITS["ri"]
            if "kn" in scores.scores:
                flag = above_threshold(scores.scores["kn"][i], elig, cfg.kn_threshold, cfg.p_kn)
                reason |= flag.astype(np.uint8) * REASON_BITS["kn"]
            if thresholds is not None:
                flag = in_clusters(scores.scores["tr"][i], elig, thresholds, TR_CLUSTERS[cfg.tr_cluster], cfg.p_tr)
                reason |= flag.astype(np.uint8) * REASON_BITS["tr"]
            masks.append(reason > 0)
            reasons.append(reason)
        return TokenMasks(masks, reasons, info)


def eligible_tokens(rendered: Sequence[Rendered], special_ids: Sequence[int]) -> list[np.ndarray]:
    """Response tokens that may be masked: bool [t] per example (special tokens excluded)."""
    special = np.asarray(sorted(set(special_ids)), dtype=np.int64)
    return [r.response_mask & ~np.isin(r.input_ids, special) for r in rendered]
