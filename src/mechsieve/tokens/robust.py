"""The pure parts of XTF's robust preset (tokens/xtf.py): relative reasoning importance, span
smoothing, pool-level outlier rules, centred relevance, numeric tokens.

Why each exists is in xtf.py's module docstring; all take arrays or tensors and return them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

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


class Mixture(NamedTuple):
    """A two-component 1-D Gaussian mixture; component 0 has the lower mean."""

    weight: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    log_likelihood: float


def fit_two_gaussians(values: np.ndarray, iterations: int = 200, tol: float = 1e-9) -> Mixture:
    """EM for a two-component Gaussian mixture on `values: [m]`, started from the lowest and the
    highest half split at the 10th percentile (deterministic; no seed). Variances are floored at
    1e-6 of the pool's so a component cannot collapse onto one repeated value."""
    x = values.astype(np.float64)
    floor = max(float(x.var()) * 1e-6, 1e-12)
    low = x <= np.quantile(x, 0.1)
    if low.all() or not low.any():
        low = x <= np.median(x)
    resp = np.stack([low, ~low]).astype(np.float64)
    prev = -np.inf
    ll = prev
    for _ in range(iterations):
        nk = resp.sum(1) + 1e-300
        w = nk / x.size
        mu = resp @ x / nk
        var = np.maximum((resp * (x[None] - mu[:, None]) ** 2).sum(1) / nk, floor)
        logp = (np.log(w)[:, None] - 0.5 * np.log(2 * np.pi * var)[:, None]
                - 0.5 * (x[None] - mu[:, None]) ** 2 / var[:, None])
        top = logp.max(0)
        norm = top + np.log(np.exp(logp - top).sum(0))
        ll = float(norm.sum())
        resp = np.exp(logp - norm)
        if ll - prev < tol * abs(ll):
            break
        prev = ll
    order = np.argsort(mu)
    return Mixture(w[order], mu[order], np.sqrt(var[order]), ll)


def mixture_cut(values: np.ndarray, min_separation: float = 2.0, max_weight: float = 0.5
                ) -> tuple[float, dict[str, Any]]:
    """The cut of `rule=mixture`: where a low mode of the pool's scores is a population of its own.

    A two-Gaussian mixture is fitted; the low component counts as noise only if it is the smaller
    one (weight below `max_weight`), the two are separated (Ashman's D = sqrt(2) |mu1 - mu0| /
    sqrt(s0^2 + s1^2) above `min_separation`; D > 2 is the usual test of a clean split) and two
    components explain the pool better than one (BIC). The cut is the point between the means where
    the posterior of the low component falls to 1/2. When any test fails, the cut is NaN: the rule
    found no noise population (the caller then falls back to the outlier rule)."""
    info: dict[str, Any] = {}
    if values.size < 10 or float(values.std()) == 0.0:
        return float("nan"), {"mixture": "too few or constant scores"}
    m = fit_two_gaussians(values)
    one = -0.5 * values.size * (np.log(2 * np.pi * float(values.var())) + 1.0)
    bic_gain = 2 * (m.log_likelihood - one) - 3 * np.log(values.size)
    d = float(np.sqrt(2) * abs(m.mean[1] - m.mean[0]) / np.sqrt(m.std[0] ** 2 + m.std[1] ** 2))
    info.update({"weights": m.weight.round(4).tolist(), "means": m.mean.round(4).tolist(),
                 "stds": m.std.round(4).tolist(), "ashman_d": round(d, 3), "bic_gain": round(float(bic_gain), 1)})
    if not (m.weight[0] < max_weight and d > min_separation and bic_gain > 0):
        info["mixture"] = "no separate low population"
        return float("nan"), info
    # log w0 N(x; mu0, s0) = log w1 N(x; mu1, s1): a quadratic a x^2 + b x + c = 0
    (w0, w1), (m0, m1), (s0, s1) = m.weight, m.mean, m.std
    a = 1 / (2 * s1 ** 2) - 1 / (2 * s0 ** 2)
    b = m0 / s0 ** 2 - m1 / s1 ** 2
    c = (m1 ** 2 / (2 * s1 ** 2) - m0 ** 2 / (2 * s0 ** 2)) + np.log(w0 / s0) - np.log(w1 / s1)
    roots = [-c / b] if abs(a) < 1e-12 else np.roots([a, b, c]).tolist()
    between = [float(r.real) for r in np.atleast_1d(roots) if abs(np.imag(r)) < 1e-12 and m0 <= r.real <= m1]
    if not between:
        info["mixture"] = "no crossing between the means"
        return float("nan"), info
    info["mixture"] = "low population found"
    return between[0], info


def low_cut(values: np.ndarray, rule: str, z: float, share: float) -> float:
    """The score below which a token is flagged, from the pool's eligible scores `values`.

    `mad`: median - z * 1.4826 * MAD (a robust z-score outlier: fires only where the pool has
    outliers); `share`: the `share` quantile (the lowest `share` of the pool's tokens); `mixture`:
    `mixture_cut`, or the `mad` cut where the pool has no separate low population. NaN when
    nothing can be cut (no scores, or no spread)."""
    if values.size == 0:
        return float("nan")
    if rule == "share":
        return float(np.quantile(values, share)) if share > 0 else float("-inf")
    if rule == "mixture":
        cut, _ = mixture_cut(values)
        if not np.isnan(cut):
            return cut
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
