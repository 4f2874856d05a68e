"""One hooked forward pass per batch: the engine under capture, token scores and scorers.

Callbacks receive each layer's activations *inside* the hook, so a consumer reduces them at
once and nothing per-token outlives its layer. The pass stops after the deepest layer needed
(`StopForward` from a hook) unless logits are wanted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mechsieve.capture.batching import BatchPlan, Collated, collate
from mechsieve.data.render import Rendered
from mechsieve.models.hooks import StopForward, block_output, eager_attention, hook_points


@dataclass
class ForwardSpec:
    """What one pass needs from the model."""

    layers: list[int] = field(default_factory=list)
    """Block indices whose activations are handed to `on_layer` (normalised, non-negative)."""
    site: Literal["resid", "mlp"] = "resid"
    """Residual stream after the block, or MLP neurons (input of the down projection)."""
    attention_layers: list[int] = field(default_factory=list)
    """Blocks whose attention probabilities [b, heads, t, t] go to `on_attention` (eager attention)."""
    need_logits: bool = False
    """Run to the end and hand the logits [b, t, vocab] to `on_logits`."""

    def deepest(self) -> int:
        return max([*self.layers, *self.attention_layers, -1])


@dataclass
class BatchContext:
    """The batch being processed: which examples (`indices` into the pool) and their padding."""

    indices: list[int]
    batch: Collated


LayerFn = Callable[[BatchContext, int, torch.Tensor], None]
LogitsFn = Callable[[BatchContext, torch.Tensor], None]


@dataclass
class ForwardStats:
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else 0.0


def run_forward(
    model: Any,
    rendered: Sequence[Rendered],
    plan: BatchPlan,
    spec: ForwardSpec,
    pad_id: int,
    padding_side: str = "right",
    on_layer: LayerFn | None = None,
    on_attention: LayerFn | None = None,
    on_logits: LogitsFn | None = None,
    batches: Sequence[int] | None = None,
    on_batch_end: Callable[[int, BatchContext], None] | None = None,
    progress: bool = True,
    desc: str = "forward",
) -> ForwardStats:
    """Run the batches of `plan` (or only those numbered in `batches`) through `model` with hooks.

    on_layer(ctx, layer, acts[b, t, d]) for each layer in spec.layers; on_attention(ctx, layer,
    probs[b, h, t, t]); on_logits(ctx, logits[b, t, V]); on_batch_end(batch_number, ctx).
    """
    from tqdm.auto import tqdm

    hp = hook_points(model)
    device = next(model.parameters()).device
    current: dict[str, BatchContext] = {}
    handles = []
    stop_at = None if spec.need_logits else spec.deepest()

    def layer_hook(layer: int, from_input: bool):
        def hook(module, args, output=None):
            acts = args[0] if from_input else block_output(output)
            if on_layer is not None:
                on_layer(current["ctx"], layer, acts)
        return hook

    def attention_hook(layer: int):
        def hook(module, args, output):
            if on_attention is not None:
                probs = output[1] if isinstance(output, tuple) else None
                if probs is None:
                    raise RuntimeError("attention probabilities were not returned; eager attention is required")
                on_attention(current["ctx"], layer, probs)
        return hook

    def stop_hook(module, args, output):
        raise StopForward

    for layer in spec.layers:
        if spec.site == "resid":
            handles.append(hp.block(layer).register_forward_hook(layer_hook(layer, False)))
        else:
            handles.append(hp.mlp_down(layer).register_forward_pre_hook(layer_hook(layer, True)))
    for layer in spec.attention_layers:
        handles.append(hp.attention(layer).register_forward_hook(attention_hook(layer)))
    if stop_at is not None and stop_at >= 0:
        # Registered last, so it runs after the capture hooks of the same block. Stopping after
        # the last block too skips the final norm and the output head, whose [b, t, vocab]
        # logits would be the largest tensor of the pass.
        handles.append(hp.block(stop_at).register_forward_hook(stop_hook))
    numbers = list(range(len(plan.batches))) if batches is None else list(batches)
    lengths = {i: len(rendered[i]) for b in numbers for i in plan.batches[b]}
    stats = ForwardStats()
    bar = tqdm(total=sum(lengths.values()), unit="tok", desc=desc, disable=not progress,
               mininterval=1.0, leave=False)
    attention_ctx = eager_attention(model) if spec.attention_layers else nullcontext()
    start = time.perf_counter()
    try:
        with attention_ctx, torch.no_grad():
            for number in numbers:
                idx = plan.batches[number]
                batch = collate([rendered[i] for i in idx], pad_id, padding_side).to(device)
                ctx = BatchContext(list(idx), batch)
                current["ctx"] = ctx
                try:
                    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False)
                except StopForward:
                    out = None
                if spec.need_logits and on_logits is not None and out is not None:
                    on_logits(ctx, out.logits)
                if on_batch_end is not None:
                    on_batch_end(number, ctx)
                stats.batches += 1
                stats.real_tokens += int(batch.lengths.sum())
                stats.padded_tokens += int(batch.input_ids.numel())
                bar.update(int(batch.lengths.sum()))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
