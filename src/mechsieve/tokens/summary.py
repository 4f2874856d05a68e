"""Explanations of token masks: shares per attribute, overlaps, the most-masked examples, and an
example's response with its masked tokens marked."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from mechsieve.data.render import Rendered
from mechsieve.tokens.base import REASON_BITS, TokenMasks, TokenScores

LETTERS = {"ri": "R", "kn": "K", "tr": "T", "el": "E"}


def reason_names(code: int) -> list[str]:
    """Attribute names whose bit is set in a reason code, e.g. 5 -> ['ri', 'tr']."""
    return [name for name, bit in REASON_BITS.items() if code & bit]


def mask_counts(scores: TokenScores, masks: TokenMasks) -> dict[str, Any]:
    """Counts over the pool: eligible tokens, masked per attribute, union, pairwise overlaps
    and tokens flagged by all attributes; shares are of the eligible (response) tokens."""
    attrs = [a for a in REASON_BITS if a in scores.scores]
    reasons = np.concatenate(masks.reasons) if masks.reasons else np.zeros(0, dtype=np.uint8)
    eligible = int(sum(int(e.sum()) for e in scores.eligible))

    def share(n: int) -> float:
        return round(n / eligible, 6) if eligible else 0.0

    per = {a: int(((reasons & REASON_BITS[a]) > 0).sum()) for a in attrs}
    union = int((reasons > 0).sum())
    overlaps = {}
    for a, b in combinations(attrs, 2):
        both = int((((reasons & REASON_BITS[a]) > 0) & ((reasons & REASON_BITS[b]) > 0)).sum())
        overlaps[f"{a}&{b}"] = {"tokens": both, "jaccard": round(both / max(per[a] + per[b] - both, 1), 6)}
    all_bits = sum(REASON_BITS[a] for a in attrs)
    return {
        "examples": len(masks.masks),
        "eligible_tokens": eligible,
        "masked_tokens": {a: per[a] for a in attrs} | {"union": union},
        "masked_share": {a: share(per[a]) for a in attrs} | {"union": share(union)},
        "overlaps": overlaps,
        "all_attributes": int(((reasons & all_bits) == all_bits).sum()) if len(attrs) > 1 else per.get(attrs[0], 0),
    }


def marked_response(tokenizer: Any, r: Rendered, reasons: np.ndarray, eligible_only: bool = True) -> str:
    """The response text with each masked token shown as [[token]]^LETTERS (R=RI, K=KN, T=TR,
    E=excess loss)."""
    parts = []
    for pos in np.flatnonzero(r.response_mask) if eligible_only else range(len(r)):
        text = tokenizer.decode([int(r.input_ids[pos])])
        code = int(reasons[pos])
        if code:
            letters = "".join(LETTERS[n] for n in reason_names(code))
            parts.append(f"[[{text}]]^{letters}")
        else:
            parts.append(text)
    return "".join(parts)


def most_masked(ids: Sequence[str], scores: TokenScores, masks: TokenMasks, rendered: Sequence[Rendered],
                tokenizer: Any, top: int = 5) -> list[dict[str, Any]]:
    """The `top` examples with the most masked tokens, with the masked tokens and why."""
    counts = np.array([int(m.sum()) for m in masks.masks])
    order = np.argsort(-counts, kind="stable")[:top]
    out = []
    for i in order:
        r, reason = rendered[i], masks.reasons[i]
        n_elig = int(scores.eligible[i].sum())
        tokens = [{"position": int(p), "token": tokenizer.decode([int(r.input_ids[p])]),
                   "reasons": reason_names(int(reason[p])),
                   **{a: _num(scores.scores[a][i][p]) for a in scores.scores}}
                  for p in np.flatnonzero(masks.masks[i])]
        out.append({"id": ids[i], "masked": int(counts[i]), "eligible": n_elig,
                    "share": round(int(counts[i]) / n_elig, 4) if n_elig else 0.0,
                    "marked": marked_response(tokenizer, r, reason), "tokens": tokens})
    return out


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)
