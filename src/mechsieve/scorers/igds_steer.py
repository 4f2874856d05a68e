"""IGDS helpers: SAE latents at a position, steering one latent with the SAE error re-added, and
the dev-set metrics of interventional filtering (teacher-forced loss, generation accuracy).

Steering (IGDS step 4) multiplies latent `j` by `alpha` and decodes, re-adding the SAE error so
that only that latent's contribution changes:
`h' = decode(a') + (h - decode(a)) = h + (alpha - 1) a_j W_dec[j]`. The right-hand form is what
runs: it is exact for alpha = 1 (the model's output is bit-for-bit unchanged) and needs no
decode of the whole latent vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from mechsieve.capture.reductions import REDUCTIONS


def steer(h: torch.Tensor, sae: Any, feature: int, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`h: [..., d]` with latent `feature` scaled by `alpha` where `mask: [...]` (bool) is set."""
    a = sae.encode(h)[..., feature]
    scale = (alpha - 1.0) * a
    if mask is not None:
        scale = scale * mask.to(scale.dtype)
    return h + scale[..., None].to(h.dtype) * sae.W_dec[feature].to(h.dtype)


@contextmanager
def steering(model: Any, sae: Any, layer: int, feature: int, alpha: float,
             mask_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> Iterator[None]:
    """Steer `feature` by `alpha` in block `layer`'s output during every forward inside the block;
    `mask_fn(h) -> [b, t] bool` picks the positions (None: all)."""
    from mechsieve.models.hooks import block_output, hook_points

    def hook(module, args, output):
        h = block_output(output)
        new = steer(h, sae, feature, alpha, mask_fn(h) if mask_fn is not None else None)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = hook_points(model).block(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prompt_mask(batch: Any, t: int) -> torch.Tensor:
    cols = torch.arange(t, device=batch.input_ids.device)[None, :]
    start = batch.offsets[:, None]
    return (cols >= start) & (cols < start + batch.prompt_len[:, None])


def latents_at(sae: Any, acts: torch.Tensor, batch: Any, position: str, cols: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Latents `[b, d_sae]` (or `[b, len(cols)]`) of `acts: [b, t, d]` at `position`: `last_prompt`,
    `mean_prompt` / `mean_response` (per-token latents averaged), or `argmax_prompt` (the prompt
    position, relative to the row's first real token, where each latent is largest; long)."""
    if position == "last_prompt":
        a = sae.encode(REDUCTIONS["last_prompt"](acts, batch))
        return a if cols is None else a[:, cols]
    a = sae.encode(acts)
    if cols is not None:
        a = a[..., cols]
    if position == "argmax_prompt":
        masked = a.masked_fill(~prompt_mask(batch, a.shape[1])[..., None], -1.0)
        return masked.argmax(dim=1) - batch.offsets[:, None]
    return REDUCTIONS[position](a, batch)


def steer_mask_fn(state: dict, where: str, position: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Positions to steer in the current batch (`state["batch"]`): all, prompt, or the recall position."""
    def fn(h: torch.Tensor) -> torch.Tensor:
        batch = state["batch"]
        if where == "all":
            return batch.attention_mask.bool()
        if where == "prompt" or position != "last_prompt":
            return prompt_mask(batch, h.shape[1])
        cols = torch.arange(h.shape[1], device=h.device)[None, :]
        return cols == (batch.offsets + (batch.prompt_len - 1).clamp(min=0))[:, None]
    return fn


def dev_loss(loaded: Any, rendered: Sequence[Any], sae: Any, feature: int | None, alpha: float, cfg: Any) -> float:
    """Token-weighted mean next-token NLL of the dev responses, steering `feature` (None: plain)."""
    from mechsieve.capture.batching import collate, plan_batches
    from mechsieve.data.render import pad_id

    model = loaded.model
    device = next(model.parameters()).device
    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    state: dict = {}
    total, count = 0.0, 0
    ctx = (steering(model, sae, sae.layer, feature, alpha, steer_mask_fn(state, cfg.steer_positions, cfg.position))
           if feature is not None else nullcontext())
    with ctx, torch.no_grad():
        for idx in plan.batches:
            batch = collate([rendered[i] for i in idx], pad_id(loaded.tokenizer), "right").to(device)
            state["batch"] = batch
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
            mask = batch.response_mask[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), batch.input_ids[:, 1:][mask],
                                                    reduction="sum")
            total += float(nll)
            count += int(mask.sum())
    return total / max(count, 1)


def dev_accuracy(loaded: Any, dev: Sequence[Any], sae: Any, feature: int | None, alpha: float, cfg: Any) -> float:
    """Exact-match accuracy (final numbers) of greedy generations, steering `feature` at every token."""
    from mechsieve.evaluate.answers import exact_match
    from mechsieve.evaluate.generate import generate_greedy

    ctx = steering(loaded.model, sae, sae.layer, feature, alpha) if feature is not None else nullcontext()
    with ctx:
        preds = generate_greedy(loaded.model, loaded.tokenizer, dev, cfg.render, cfg.max_new_tokens,
                                cfg.max_tokens, cfg.max_batch, progress=False)
    return float(np.mean([exact_match(p, ex.response) for p, ex in zip(preds, dev)]))


def snippet_text(tokenizer: Any, rendered: Any, pos: int, before: int = 24, after: int = 3) -> str:
    """The tokens around `pos` of a rendered example, the token at `pos` in [[ ]] (special tokens
    of the chat template left out of the context, so the question's end shows)."""
    ids = [int(x) for x in rendered.input_ids]
    pos = max(0, min(pos, len(ids) - 1))
    left = tokenizer.decode(ids[max(0, pos - before):pos], skip_special_tokens=True)
    mid = tokenizer.decode(ids[pos:pos + 1])
    right = tokenizer.decode(ids[pos + 1:pos + 1 + after], skip_special_tokens=True)
    return f"{left}[[{mid}]]{right}".replace("\n", "\\n")
