"""IGDS recall helpers: the template check, the pool reference, and the FRS read positions.

- Template check: a latent whose strongest activations sit on the chat template's own tokens
  (role headers, special tokens, the newline after `assistant`, an automatic system prompt: every
  token outside a message's `content`, `Rendered.content_mask`) reads the format, not the task.
  `template_share` is the share of a latent's top-`n` activations over a set of tokens that land
  on template tokens; `TopActivations` computes the same thing batch by batch.
- Pool reference: `reference_sample` draws the pool examples that recall contrasts against when
  no general-text file is given.
- FRS positions: `position_mask` (which tokens a `mean_*` position averages over) and
  `frs_scale` (the length factor of `frs_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

POSITIONS = ("last_prompt", "mean_prompt", "mean_response", "mean_all")
"""Where IGDS reads latents: the last prompt token, or the mean over the prompt, the response or
all real tokens."""
FRS_NORMS = ("length", "sqrt", "none")


def template_share(acts: np.ndarray, is_template: np.ndarray, n_top: int) -> np.ndarray:
    """Per latent, the share of its top-`n_top` activations that sit on template tokens.

    `acts: [m, d]` latents of `m` tokens, `is_template: [m]` bool. Only positive activations
    count (a latent firing on fewer than `n_top` tokens is judged on those it fires on); a latent
    that never fires gets 0. [d] float64. The reference for `TopActivations` (ties at the n-th
    value may be broken either way there).
    """
    acts = np.asarray(acts, dtype=np.float64)
    flags = np.asarray(is_template, dtype=bool)
    order = np.argsort(-acts, axis=0, kind="stable")[:n_top]  # [n_top, d]
    top = np.take_along_axis(acts, order, axis=0)
    positive = top > 0
    on_template = positive & flags[order]
    return on_template.sum(0) / np.maximum(positive.sum(0), 1)


class TopActivations:
    """Streaming `template_share`: keeps each latent's `n` largest activations seen so far and
    whether each sat on a template token. Memory: [n, d] values and flags."""

    def __init__(self, d: int, n: int) -> None:
        self.d, self.n = d, n
        self.vals: torch.Tensor | None = None  # [<= n, d] float32
        self.flags: torch.Tensor | None = None  # [<= n, d] bool
        self.tokens = 0

    def update(self, acts: torch.Tensor, is_template: torch.Tensor) -> None:
        """Add `acts: [m, d]` (latents of m real tokens) with `is_template: [m]` bool."""
        acts = acts.detach().float()
        flags = is_template.to(acts.device, torch.bool)[:, None].expand(-1, self.d)
        if self.vals is not None:
            acts, flags = torch.cat([self.vals, acts]), torch.cat([self.flags, flags])
        k = min(self.n, acts.shape[0])
        self.vals, idx = acts.topk(k, dim=0)
        self.flags = flags.gather(0, idx)
        self.tokens += int(is_template.shape[0])

    def share(self) -> np.ndarray:
        """[d] float64, as `template_share` over every token seen."""
        if self.vals is None:
            return np.zeros(self.d)
        positive = self.vals > 0
        hits = (positive & self.flags).sum(0).double()
        return (hits / positive.sum(0).clamp(min=1)).cpu().numpy()


def template_rows(content_masks: Sequence[np.ndarray | None], indices: Sequence[int], offsets: torch.Tensor,
                  t: int) -> torch.Tensor:
    """[b, t] bool: True on the template tokens (real tokens outside every message's content) of
    the batch rows `indices`, placed at each row's `offsets`; padding is False. A row without a
    content mask (built by hand) counts as all content."""
    out = torch.zeros(len(indices), t, dtype=torch.bool)
    for r, i in enumerate(indices):
        mask = content_masks[i]
        if mask is not None:
            start = int(offsets[r])
            out[r, start:start + len(mask)] = torch.from_numpy(~np.asarray(mask, dtype=bool))
    return out.to(offsets.device)


def reference_sample(n_pool: int, size: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the pool examples recall contrasts against: a seeded draw of `size`
    without replacement; the whole pool when `size` is 0 or at least the pool's size."""
    if size <= 0 or size >= n_pool:
        return np.arange(n_pool, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_pool, size, replace=False)).astype(np.int64)


def position_mask(batch, position: str, t: int) -> torch.Tensor:
    """[b, t] bool: the tokens a `mean_*` position averages over (prompt, response, all real)."""
    if position == "mean_response":
        return batch.response_mask.bool()
    if position == "mean_all":
        return batch.attention_mask.bool()
    cols = torch.arange(t, device=batch.input_ids.device)[None, :]
    start = batch.offsets[:, None]
    return (cols >= start) & (cols < start + batch.prompt_len[:, None])


def frs_scale(batch, position: str, norm: str) -> torch.Tensor:
    """[b] float64: what a position's mean is multiplied by under `frs_norm`: 1 (`length`: the
    mean, sum / |T|), sqrt|T| (`sqrt`: sum / sqrt|T|) or |T| (`none`: the sum), where |T| is the
    number of tokens the position averages over (1 at `last_prompt`, where all three agree).
    An example with no such token scores 0 under all three."""
    if position == "last_prompt" or norm == "length":
        return torch.ones(batch.input_ids.shape[0], dtype=torch.float64, device=batch.input_ids.device)
    count = position_mask(batch, position, batch.input_ids.shape[1]).sum(1).double()
    return count if norm == "none" else count.sqrt()
