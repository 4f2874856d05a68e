"""The token-masking extension point: a TokenMasker scores tokens, then decides which to mask.

Scoring runs the model (slow, done once); deciding is pure arithmetic on the kept scores (fast,
re-run freely with other thresholds). Both results keep one array per example, aligned with the
example's rendered `input_ids` [t].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechsieve.data.render import Rendered

# Bit flags of TokenMasks.reasons: why a token was masked (EL: below the excess-loss cut).
RI, KN, TR, EL = 1, 2, 4, 8
REASON_BITS = {"ri": RI, "kn": KN, "tr": TR, "el": EL}


@dataclass
class TokenScores:
    """Per-token attribute scores of a pool.

    scores[name][i]: float32 [t_i] for example i (NaN where not scored); eligible[i]: bool [t_i],
    the response tokens a masker may mask; info: anything global (e.g. a domain vector's words).
    """

    scores: dict[str, list[np.ndarray]]
    eligible: list[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.eligible)


@dataclass
class TokenMasks:
    """Which tokens to leave out of the loss, and why.

    masks[i]: bool [t_i] (True = masked); reasons[i]: uint8 [t_i], OR of the REASON_BITS of
    every attribute that flagged the token; info: thresholds and settings used.
    """

    masks: list[np.ndarray]
    reasons: list[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def labels(self, rendered: Sequence[Rendered]) -> list[np.ndarray]:
        """Training labels [t_i] int64: the token id on unmasked response tokens, -100 elsewhere."""
        out = []
        for r, m in zip(rendered, self.masks):
            lab = np.where(r.response_mask & ~m, r.input_ids, -100).astype(np.int64)
            out.append(lab)
        return out


class TokenMasker(ABC):
    """Contract of a token-level noise filter.

    score(model, tokenizer, rendered) -> TokenScores, one float32 [t_i] array per attribute and
    example; decide(scores) -> TokenMasks, pure (no model); mask = decide(score(...)).
    """

    name: str = ""

    @abstractmethod
    def score(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], progress: bool = True) -> TokenScores:
        """Run the model over `rendered` and return per-token scores."""

    @abstractmethod
    def decide(self, scores: TokenScores) -> TokenMasks:
        """Turn scores into masks (no model calls)."""

    def mask(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], progress: bool = True
             ) -> tuple[TokenScores, TokenMasks]:
        scores = self.score(model, tokenizer, rendered, progress=progress)
        return scores, self.decide(scores)


MASKERS: dict[str, type[TokenMasker]] = {}


def register_masker(key: str):
    """Class decorator: make a TokenMasker available under `key` (duplicates are refused)."""
    def wrap(cls: type[TokenMasker]) -> type[TokenMasker]:
        if key in MASKERS:
            raise ValueError(f"token masker {key!r} is already registered ({MASKERS[key].__name__})")
        MASKERS[key] = cls
        cls.name = key
        return cls
    return wrap
