"""Reductions of per-token activations to one vector per example, computed batch by batch.

All take `acts: [b, t, d]` of a padded batch and its `Collated` index data, and return `[b, d]`.
Positions are relative to each row's first real token, so left and right padding agree.
- `last_prompt`: the last token before the final response (NAIT/IGDS "last prompt token");
- `mean_response`: mean over response tokens (zeros where an example has none; see counts);
- `mean_prompt`: mean over the prompt tokens (before the final response);
- `mean_all`: mean over all real tokens;
- `weighted_mean_all`: position-weighted mean over all real tokens, weights proportional to the
  position 1..T (SGPT, arXiv 2202.08904; RDS+'s pooling, Ivison et al. 2025, arXiv 2503.01807);
- `last`: the last real token;
- `drift`: last real token minus the first content (non-special) token (NAIT, eq. 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mechsieve.capture.batching import Collated

Reduction = Callable[[torch.Tensor, Collated], torch.Tensor]


def _at(acts: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return acts[torch.arange(acts.shape[0], device=acts.device), cols]


def _masked_mean(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(acts.dtype)
    total = torch.einsum("btd,bt->bd", acts, mask)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    return total / count


def last_prompt(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    return _at(acts, batch.column((batch.prompt_len - 1).clamp(min=0)))


def last(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    return _at(acts, batch.column(batch.lengths - 1))


def drift(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    return last(acts, batch) - _at(acts, batch.column(batch.content_start))


def mean_response(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    return _masked_mean(acts, batch.response_mask)


def mean_all(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    return _masked_mean(acts, batch.attention_mask.bool())


def weighted_mean_all(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    """sum_i w_i h_i with w_i = i / sum_j j over the row's real tokens i = 1..T (SGPT's weighted
    mean): later tokens, which have read more of the text under causal attention, weigh more.
    Positions count real tokens only (`position_ids`), so left and right padding agree."""
    weights = (batch.position_ids + 1).to(acts.dtype) * batch.attention_mask.to(acts.dtype)
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
    return torch.einsum("btd,bt->bd", acts, weights)


def mean_prompt(acts: torch.Tensor, batch: Collated) -> torch.Tensor:
    t = acts.shape[1]
    cols = torch.arange(t, device=acts.device)[None, :]
    start = batch.offsets[:, None]
    mask = (cols >= start) & (cols < start + batch.prompt_len[:, None])
    return _masked_mean(acts, mask)


REDUCTIONS: dict[str, Reduction] = {
    "last_prompt": last_prompt,
    "mean_response": mean_response,
    "mean_prompt": mean_prompt,
    "mean_all": mean_all,
    "weighted_mean_all": weighted_mean_all,
    "last": last,
    "drift": drift,
}
