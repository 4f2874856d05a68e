"""Hook points per architecture: decoder blocks (residual stream), MLP neurons, attention.

- residual stream after block `l`: the block's output (transformers 5 blocks return a tensor;
  older ones a tuple whose first item is it); equals `hidden_states[l + 1]` for all but the last
  block, whose `hidden_states` entry is taken after the final norm;
- MLP neuron activations: the *input* of the down projection (`down_proj`, GPT-2's `mlp.c_proj`,
  GPT-NeoX's `mlp.dense_4h_to_h`), shape [b, t, d_mlp];
- attention probabilities: the second output of the attention module under eager attention,
  shape [b, heads, t, t].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mechsieve.config import ConfigError

# model_type -> (path of the block list, MLP down projection in a block, attention in a block)
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "mlp.down_proj", "self_attn"),
    "mistral": ("model.layers", "mlp.down_proj", "self_attn"),
    "mixtral": ("model.layers", "block_sparse_moe", "self_attn"),
    "qwen2": ("model.layers", "mlp.down_proj", "self_attn"),
    "qwen3": ("model.layers", "mlp.down_proj", "self_attn"),
    "gemma": ("model.layers", "mlp.down_proj", "self_attn"),
    "gemma2": ("model.layers", "mlp.down_proj", "self_attn"),
    "gemma3_text": ("model.layers", "mlp.down_proj", "self_attn"),
    "phi3": ("model.layers", "mlp.down_proj", "self_attn"),
    "olmo2": ("model.layers", "mlp.down_proj", "self_attn"),
    "gpt2": ("transformer.h", "mlp.c_proj", "attn"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "attention"),
}


class StopForward(Exception):
    """Raised from a hook once the deepest layer needed has run (early stop)."""


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def unwrap(model: Any) -> Any:
    """The plain transformers model under a peft wrapper, if any."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


@dataclass
class HookPoints:
    """Where to hook one model."""

    model_type: str
    blocks: Any  # nn.ModuleList
    mlp_path: str
    attn_path: str

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def block(self, layer: int) -> Any:
        return self.blocks[layer]

    def mlp_down(self, layer: int) -> Any:
        return _get(self.blocks[layer], self.mlp_path)

    def attention(self, layer: int) -> Any:
        return _get(self.blocks[layer], self.attn_path)

    def normalize_layers(self, layers: Any) -> list[int]:
        """'all' or a list with negatives allowed -> sorted unique non-negative indices."""
        n = self.n_layers
        if layers == "all" or layers is None:
            return list(range(n))
        out = set()
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise ConfigError(f"layer {layer} is out of range: this model has {n} blocks (0..{n - 1}, or "
                                  f"-1..-{n} from the end); change the layer setting (--layers / --layer)")
            out.add(idx)
        if not out:
            raise ConfigError("no layers chosen; give 'all' or a list like [0, 5, -1]")
        return sorted(out)


def hook_points(model: Any) -> HookPoints:
    """Hook points of `model`, by its `config.model_type`; unknown ones are refused with the list."""
    base = unwrap(model)
    model_type = getattr(base.config, "model_type", "")
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"architecture {model_type!r} has no hook points here; supported: "
                         f"{sorted(ARCHITECTURES)} (add a row to mechsieve.models.hooks.ARCHITECTURES)")
    blocks_path, mlp_path, attn_path = ARCHITECTURES[model_type]
    return HookPoints(model_type, _get(base, blocks_path), mlp_path, attn_path)


def block_output(output: Any) -> Any:
    """The hidden states from a block's return value (tensor in transformers 5, else a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch to eager attention (probabilities are only materialised there), then switch back."""
    base = unwrap(model)
    before = getattr(base.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before or "sdpa")


def describe(model: Any) -> dict[str, Any]:
    """A summary of the hook points for `mechsieve info`."""
    hp = hook_points(model)
    cfg = unwrap(model).config
    mlp0 = hp.mlp_down(0)
    d_mlp = getattr(mlp0, "in_features", None) or getattr(getattr(mlp0, "weight", None), "shape", [None])[0]
    return {
        "model_type": hp.model_type,
        "n_layers": hp.n_layers,
        "d_model": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "d_mlp": d_mlp,
        "n_heads": getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None),
        "residual": f"{type(hp.blocks).__name__}[l] output ({type(hp.block(0)).__name__})",
        "mlp_neurons": f"input of {hp.mlp_path} ({type(mlp0).__name__})",
        "attention": f"{hp.attn_path} (eager) second output",
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
