"""The pure parts of XTF's robust preset (tokens/xtf.py): relative reasoning importance, span
smoothing, pool-level outlier rules, centred relevance, numeric tokens.

Why each exists is in xtf.py's module docstring; all take arrays or tensors and return them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from mechsieve.tokens.attributes import cap_count, keep_extreme

BOUNDARY = re.compile(r"[!?\n]|\.(?!\d)")
"""A token whose text holds one of these ends a span (a sentence or a line); a decimal point
(followed by a digit, in the token or the next one) does not."""
NUMERIC = re.compile(r"^[\s\d.,+\-*/=%$()<>^×÷:]*\d[\s\d.,+\-*/=%$()<>^×÷:]*$|^\s*[+\-*/=%<>^×÷]+\s*$")
"""Digits, numbers and arithmetic operators (with spaces and punctuation): never off-task for math."""


def relative_received_attention(probs: torch.Tensor, valid: torch.Tensor, first: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each key receives from later queries, relative to a uniform baseline, heads averaged.

    probs: [b, h, t, t] (query i, key j); valid: [b, t] bool; first: [b] column of each row's first
    real token (the attention sink). For query i the keys it could see are the real tokens before
    it but the sink (the diagonal excluded): K_i = {j: first < j < i}. Its attention is renormalised
    over K_i and multiplied by |K_i|, so 1 means "as much as a uniform reader would give":
    rel[i, j] = a[i, j] * |K_i| / sum_{k in K_i} a[i, k]. Returns (total [b, t], n_later [b, t]):
    total[b, j] = sum over queries i with j in K_i of rel[b, i, j], and the number of them;
    RI = total / n_later, averaged over layers by the caller (the sink and the first key of a row
    get no later query that counts and stay NaN there).
    """
    b, _, t, _ = probs.shape
    a = probs.float().mean(1)  # [b, q, k]
    cols = torch.arange(t, device=probs.device)
    keys = valid & (cols[None, :] > first[:, None])  # [b, k]: real tokens after the sink
    before = torch.ones(t, t, dtype=torch.bool, device=probs.device).tril(-1)  # [q, k]: k < q
    w = before[None] & valid[:, :, None] & keys[:, None, :]  # [b, q, k]
    wf = w.to(a.dtype)
    mass = (a * wf).sum(-1, keepdim=True)  # [b, q, 1]
    count = wf.sum(-1, keepdim=True)
    rel = a * count / mass.clamp_min(1e-12)
    return (rel * wf).sum(1), w.sum(1)


def span_ids(pieces: Sequence[str]) -> np.ndarray:
    """[t] int64 span number of each token: a span ends with a token whose text has . ! ? or a newline."""
    out = np.zeros(len(pieces), dtype=np.int64)
    span = 0
    for k, piece in enumerate(pieces):
        out[k] = span
        following = pieces[k + 1] if k + 1 < len(pieces) else ""
        decimal = piece.rstrip().endswith(".") and following[:1].isdigit() and not BOUNDARY.search(piece[:-1])
        if BOUNDARY.search(piece) and not decimal:
            span += 1
    return out


def smooth_over_spans(scores: np.ndarray, eligible: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Each eligible token's score replaced by the mean finite score of the eligible tokens of its
    span (noise comes in spans: a sentence inserted, not a token); others unchanged. [t] float32."""
    out = scores.astype(np.float32).copy()
    ok = eligible & np.isfinite(scores)
    for span in np.unique(spans[ok]):
        members = ok & (spans == span)
        out[members] = scores[members].mean()
    return out


def pool_values(scores: Sequence[np.ndarray], eligible: Sequence[np.ndarray]) -> np.ndarray:
    """Every finite eligible score of the pool, concatenated: [m] float64."""
    parts = [s[e & np.isfinite(s)] for s, e in zip(scores, eligible)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def low_cut(values: np.ndarray, rule: str, z: float, share: float) -> float:
    """The score below which a token is flagged, from the pool's eligible scores `values`.

    `mad`: median - z * 1.4826 * MAD (a robust z-score outlier: fires only where the pool has
    outliers); `share`: the `share` quantile (the lowest `share` of the pool's tokens). NaN when
    nothing can be cut (no scores, or no spread)."""
    if values.size == 0:
        return float("nan")
    if rule == "share":
        return float(np.quantile(values, share)) if share > 0 else float("-inf")
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med - z * mad if mad > 0 else float("nan")


def below_cut(scores: np.ndarray, eligible: np.ndarray, cut: float, cap_fraction: float, inclusive: bool
              ) -> np.ndarray:
    """Eligible tokens scoring below `cut` (at or below with `inclusive`), capped at `cap_fraction`
    of the example's eligible tokens (the lowest kept). [t] bool."""
    ok = eligible & np.isfinite(scores)
    out = np.zeros(scores.shape, dtype=bool)
    if np.isnan(cut) or cut == float("-inf"):
        return out
    out[ok] = scores[ok] <= cut if inclusive else scores[ok] < cut
    return keep_extreme(out, scores, cap_count(int(eligible.sum()), cap_fraction), lowest=True)


def example_percentile(scores: np.ndarray, eligible: np.ndarray, share: float, cap_fraction: float) -> np.ndarray:
    """The within-example rule: eligible tokens at or below the example's own `share` quantile."""
    ok = eligible & np.isfinite(scores)
    if not ok.any() or share <= 0:
        return np.zeros(scores.shape, dtype=bool)
    return below_cut(scores, eligible, float(np.quantile(scores[ok], share)), cap_fraction, inclusive=True)


def centred_cosine(vectors: torch.Tensor, direction: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """cos(v - centre, direction - centre) per row of vectors [n, d] -> [n] float32: relevance measured
    from the pool's mean, where raw last-layer states are nearly collinear (cos 0.95-0.99)."""
    v = vectors.float() - centre.float()
    d = direction.float() - centre.float()
    return (v @ d) / (v.norm(dim=-1) * d.norm()).clamp_min(1e-12)


def numeric_tokens(pieces: Sequence[str]) -> np.ndarray:
    """[t] bool: tokens that are digits, numbers or arithmetic operators (NUMERIC)."""
    return np.array([bool(piece.strip()) and bool(NUMERIC.match(piece)) for piece in pieces], dtype=bool)
