"""Shared pieces of the scorers that read a model: batching settings, rendering, and the two
forward passes they need (per-example response loss from logits; per-layer reductions).

Both passes run through `mechsieve.capture.run_forward`, batched by length; nothing per-token
outlives its batch (logits are reduced to per-example sums inside `on_logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mechsieve.capture.batching import plan_batches
from mechsieve.capture.forward import BatchContext, ForwardSpec, run_forward
from mechsieve.config import ConfigError
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, Rendered, render_pool


@dataclass
class ModelScorerConfig:
    """Settings every model-reading scorer shares."""

    render: RenderConfig = field(default_factory=RenderConfig)
    """How examples become tokens (max_len, template)."""
    max_tokens: int = 2048
    """Token budget of one batch (batch size x longest sequence)."""
    max_batch: int = 32
    """At most this many examples in one batch."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_batch < 1:
            raise ConfigError("max_tokens and max_batch must be >= 1")


def render(examples: Sequence[Example], loaded: Any, cfg: ModelScorerConfig) -> list[Rendered]:
    rendered, _ = render_pool(list(examples), loaded.tokenizer, cfg.render)
    return rendered


def response_only(ex: Example) -> Example:
    """The example's response with no prompt (IFD's ppl(y)): rendered as plain text + EOS."""
    return Example(ex.id, ex.source, [], ex.response, {})


def response_nll(model: Any, rendered: Sequence[Rendered], cfg: ModelScorerConfig, pad: int,
                 progress: bool = True, desc: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL over response tokens, and their count, per example: ([n], [n]).

    Token t is scored from the logits at t-1, so a response token at position 0 has no loss.
    """
    n = len(rendered)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)

    def on_logits(ctx: BatchContext, logits: torch.Tensor) -> None:
        batch = ctx.batch
        mask = batch.response_mask[:, 1:]
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        picked = logits[:, :-1][mask].float()  # [m, V]: only response positions, never the whole pool
        nll = torch.nn.functional.cross_entropy(picked, batch.input_ids[:, 1:][mask], reduction="none")
        total = torch.zeros(mask.shape[0], dtype=torch.float64, device=nll.device)
        total.index_add_(0, rows, nll.double())
        sums[ctx.indices] = total.cpu().numpy()
        counts[ctx.indices] = mask.sum(1).cpu().numpy()

    run_forward(model, rendered, plan, ForwardSpec(need_logits=True), pad,
                on_logits=on_logits, progress=progress, desc=desc)
    return sums, counts


LayerReducer = Callable[[BatchContext, int, torch.Tensor], None]


def layer_pass(model: Any, rendered: Sequence[Rendered], layers: list[int], site: str,
               cfg: ModelScorerConfig, pad: int, on_layer: LayerReducer, progress: bool = True,
               desc: str = "forward") -> float:
    """One pass handing each chosen layer's activations [b, t, d] to `on_layer`; returns seconds.

    The pass stops after the deepest chosen layer (run_forward's early stop; the output head
    never runs).
    """
    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    stats = run_forward(model, rendered, plan, ForwardSpec(layers=layers, site=site), pad,
                        on_layer=on_layer, progress=progress, desc=desc)
    return stats.seconds


def final_norm(model: Any) -> torch.nn.Module | None:
    """The norm applied after the last block (Hugging Face `hidden_states[-1]` is taken after it)."""
    from mechsieve.models.hooks import unwrap

    base = unwrap(model)
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    return None
