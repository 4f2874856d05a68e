"""The three XTF token attributes as pure functions on tensors, and the per-example noise rules.

Paper: Yang et al., "Explainable Token-level Noise Filtering for LLM Fine-tuning Datasets"
(ICLR 2026, arXiv 2602.14536). See `mechsieve.tokens.xtf` for how they are combined and where
this project departs from the paper and from its published code.
"""

from __future__ import annotations

import numpy as np
import torch


def received_attention(probs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each key token receives from *later* real tokens, averaged over heads.

    probs: [b, h, t, t] attention probabilities (query i, key j); valid: [b, t] bool (real
    tokens). Returns (total [b, t], n_later [b, t]): total[b, j] = sum over valid queries i > j of
    mean_h probs[b, h, i, j]; n_later[b, j] the number of those queries. RI of a token is
    total / n_later (averaged over layers by the caller); it is a *column* statistic. The
    published code took the row mean of the softmax, which is 1/t for every token.
    """
    t = probs.shape[-1]
    mean_heads = probs.float().mean(1)  # [b, t(query), t(key)]
    later = torch.ones(t, t, dtype=torch.bool, device=probs.device).tril(-1)  # [i, j]: i > j
    weight = later[None] & valid[:, :, None] & valid[:, None, :]
    total = (mean_heads * weight).sum(1)
    n_later = weight.sum(1)
    return total, n_later


def token_probabilities(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Teacher-forced probability of each token given its prefix (XTF's knowledge novelty, p_k).

    logits: [b, t, V]; input_ids: [b, t]; valid: [b, t] bool. Returns [b, t] float32 with
    out[b, j] = softmax(logits[b, j - 1])[input_ids[b, j]], NaN where token j or j - 1 is padding
    and at j = 0. One row at a time, so the extra memory is one [t, V] log-softmax.
    """
    b, t = input_ids.shape
    out = torch.full((b, t), float("nan"), dtype=torch.float32, device=logits.device)
    for r in range(b):
        lp = torch.log_softmax(logits[r, :-1].float(), dim=-1)
        tok = lp.gather(-1, input_ids[r, 1:, None]).squeeze(-1).exp()
        ok = valid[r, 1:] & valid[r, :-1]
        out[r, 1:] = torch.where(ok, tok, out[r, 1:])
    return out


def cosine_to(vectors: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of vectors [n, d] with direction [d] -> [n]."""
    v = vectors.float()
    d = direction.float()
    return (v @ d) / (v.norm(dim=-1) * d.norm()).clamp_min(1e-12)


def cap_count(n_eligible: int, fraction: float) -> int:
    """Most tokens one attribute may mask in an example with `n_eligible` response tokens."""
    return int(np.floor(fraction * n_eligible + 1e-9))


def keep_extreme(flagged: np.ndarray, scores: np.ndarray, cap: int, lowest: bool) -> np.ndarray:
    """Limit a flag vector [t] to at most `cap` tokens: the lowest (or highest) scores win;
    ties go to the earlier position."""
    idx = np.flatnonzero(flagged)
    if idx.size <= cap:
        return flagged.copy()
    key = scores[idx] if lowest else -scores[idx]
    chosen = idx[np.argsort(key, kind="stable")[:cap]]
    out = np.zeros_like(flagged)
    out[chosen] = True
    return out


def iqr_low_outliers(scores: np.ndarray, eligible: np.ndarray, k: float, cap_fraction: float) -> np.ndarray:
    """RI rule: eligible tokens with score < Q1 - k * IQR of the example's eligible scores,
    capped at `cap_fraction` of its eligible tokens (the lowest kept). scores/eligible: [t]."""
    ok = eligible & np.isfinite(scores)
    out = np.zeros(scores.shape, dtype=bool)
    if ok.sum() < 4:
        return out
    q1, q3 = np.percentile(scores[ok], [25, 75])
    out[ok] = scores[ok] < q1 - k * (q3 - q1)
    return keep_extreme(out, scores, cap_count(int(eligible.sum()), cap_fraction), lowest=True)


def above_threshold(scores: np.ndarray, eligible: np.ndarray, threshold: float, cap_fraction: float) -> np.ndarray:
    """KN rule: eligible tokens with p_k > threshold, capped (the most probable kept)."""
    ok = eligible & np.isfinite(scores)
    out = np.zeros(scores.shape, dtype=bool)
    out[ok] = scores[ok] > threshold
    return keep_extreme(out, scores, cap_count(int(eligible.sum()), cap_fraction), lowest=False)


def in_clusters(scores: np.ndarray, eligible: np.ndarray, thresholds: np.ndarray, clusters: list[int],
                cap_fraction: float) -> np.ndarray:
    """TR rule: eligible tokens whose Multi-Otsu cluster (np.digitize on thresholds) is one of
    `clusters`, capped (the least relevant kept)."""
    ok = eligible & np.isfinite(scores)
    out = np.zeros(scores.shape, dtype=bool)
    out[ok] = np.isin(np.digitize(scores[ok], thresholds), clusters)
    return keep_extreme(out, scores, cap_count(int(eligible.sum()), cap_fraction), lowest=True)
