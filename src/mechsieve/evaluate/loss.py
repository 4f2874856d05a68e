"""Teacher-forced log-probabilities of label tokens, and the held-out loss built on them.

One batched forward pass per length bucket (`plan_batches` + `run_forward`); only the logits of
label positions are turned into log-probabilities, so a large vocabulary never costs a full
[b, t, V] log-softmax copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mechsieve.capture.batching import plan_batches
from mechsieve.capture.forward import ForwardSpec, run_forward
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, Rendered, pad_id
from mechsieve.train.items import IGNORE, TrainItem, items_from_examples


def as_items(items_or_examples: Sequence[TrainItem | Example], tokenizer: Any,
             render_cfg: RenderConfig | None = None) -> list[TrainItem]:
    """TrainItems as given, or rendered from Examples (labels on response tokens)."""
    items = list(items_or_examples)
    if items and isinstance(items[0], Example):
        return items_from_examples(items, tokenizer, render_cfg)
    return items


def label_logprobs(model: Any, tokenizer: Any, items: Sequence[TrainItem], max_tokens: int = 4096,
                   progress: bool = True, desc: str = "log-probs") -> list[np.ndarray]:
    """Per item: log p(labels[t] | tokens < t) for each label position t >= 1, float64 [n_labels]."""
    rendered = [Rendered(it.input_ids, it.labels != IGNORE, 0, 0) for it in items]
    plan = plan_batches([len(r) for r in rendered], max_tokens)
    out: list[np.ndarray] = [np.zeros(0)] * len(items)

    def on_logits(ctx, logits: torch.Tensor) -> None:
        for row, i in enumerate(ctx.indices):
            labels = torch.from_numpy(items[i].labels[1:]).to(logits.device)
            keep = labels != IGNORE
            n = len(items[i])
            picked = logits[row, : n - 1][keep].float()
            lp = torch.log_softmax(picked, dim=-1).gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
            out[i] = lp.double().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        run_forward(model, rendered, plan, ForwardSpec(need_logits=True), pad_id(tokenizer), on_logits=on_logits,
                    progress=progress, desc=desc)
    finally:
        model.train(was_training)
    return out


def heldout_loss(model: Any, tokenizer: Any, items_or_examples: Sequence[TrainItem | Example],
                 render_cfg: RenderConfig | None = None, max_tokens: int = 4096, progress: bool = True
                 ) -> dict[str, Any]:
    """Teacher-forced NLL on response (label) tokens.

    loss_per_token: total NLL / total label tokens (long answers weigh more);
    loss_per_example: mean over examples of each example's mean NLL (every example weighs the
    same). Examples without a label token are counted in `skipped` and left out of both.
    """
    items = as_items(items_or_examples, tokenizer, render_cfg)
    logprobs = label_logprobs(model, tokenizer, items, max_tokens, progress, desc="held-out loss")
    per_example = [float(-lp.mean()) for lp in logprobs if lp.size]
    tokens = int(sum(lp.size for lp in logprobs))
    total = float(-sum(lp.sum() for lp in logprobs))
    return {
        "loss_per_token": total / tokens if tokens else float("nan"),
        "loss_per_example": float(np.mean(per_example)) if per_example else float("nan"),
        "tokens": tokens,
        "examples": len(per_example),
        "skipped": len(items) - len(per_example),
    }
