"""Shared pieces of the scorers that read a model: batching settings, rendering, the key of the
shared feature pass (capture.shared) their pool features are computed in, and `layer_pass`, the
plain per-layer pass of their target-side work (NAIT's target drifts, IGDS recall).

Passes run through `mechsieve.capture.run_forward`, batched by length; nothing per-token outlives
its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def pass_key(cfg: ModelScorerConfig, inputs: str = "example", site: str = "resid") -> Any:
    """The shared-pass key of a scorer with these settings (capture.shared.PassKey): scorers whose
    render and batching settings agree read their features from one pass."""
    from mechsieve.capture.shared import PassKey

    return PassKey(cfg.render, cfg.max_tokens, cfg.max_batch, inputs, site)


def render(examples: Sequence[Example], loaded: Any, cfg: ModelScorerConfig) -> list[Rendered]:
    rendered, _ = render_pool(list(examples), loaded.tokenizer, cfg.render)
    return rendered


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
