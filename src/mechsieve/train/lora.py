"""Wrapping a model for training (peft LoRA, or all weights), saving it and loading it back.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685):
W x + (alpha / r) B A x with A random, B zero at the start, only A and B trained; through peft.

`all-linear` is resolved here rather than by peft's string, so that the choice is visible in the
saved settings and GPT-2's Conv1D layers are covered (with `fan_in_fan_out`, as peft requires).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from mechsieve.config import ConfigError
from mechsieve.models.hooks import unwrap
from mechsieve.models.loading import LoadedModel
from mechsieve.train.config import TrainConfig

ADAPTER_CONFIG = "adapter_config.json"
# peft 0.21 asks transformers 5 about gradient checkpointing through a deprecated name; harmless.
PEFT_DEPRECATION = ".*is_gradient_checkpointing.*"


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear / Conv1D layers inside the blocks (the output head excluded)."""
    from transformers.pytorch_utils import Conv1D

    base = unwrap(model)
    head = base.get_output_embeddings()
    names = set()
    for name, module in base.named_modules():
        if module is head or not isinstance(module, (torch.nn.Linear, Conv1D)) or ".lora_" in name:
            continue
        if name.endswith(".base_layer"):  # already wrapped by peft: name the wrapped layer
            name = name[: -len(".base_layer")]
        names.add(name.split(".")[-1])
    return sorted(names)


def wrap_for_training(model: Any, cfg: TrainConfig) -> Any:
    """A peft LoRA model around `model` (which is modified in place), or `model` itself with every
    weight trainable when `cfg.full_finetune`."""
    if cfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if hasattr(model, "peft_config"):
        raise ValueError("the model already carries a peft adapter; start from a fresh base model "
                         "(load_model again) or merge the adapter first")
    targets = linear_module_names(model) if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    if not targets:
        raise ConfigError("no linear layers found to put LoRA on; set train.target_modules to this model's "
                          "module names, or train.full_finetune=true")
    chosen = [m for n, m in model.named_modules() if n.split(".")[-1] in targets]
    if not chosen:
        raise ConfigError(f"train.target_modules={targets} match no module of this model; "
                          f"its linear layers are {linear_module_names(model)} (or use all-linear)")
    conv1d = any(isinstance(m, Conv1D) for m in chosen)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=conv1d, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora)


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_trained(model: Any, tokenizer: Any, out_dir: str | Path, full: bool,
                 identity: dict[str, Any] | None = None) -> Path:
    """LoRA: adapter_config.json + adapter_model.safetensors; full: a whole model folder. Either
    way with mechsieve_base.json, the base model as other tools name it (adapter_meta.py; from
    `identity`, the LoadedModel's, else guessed from the model)."""
    from mechsieve.train.adapter_meta import record_base_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if full:
        unwrap(model).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
            model.save_pretrained(out_dir)
    record_base_model(out_dir, model, identity)
    return out_dir


def load_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> LoadedModel:
    """Apply a saved LoRA adapter (or load saved full weights) onto `loaded`'s fresh base model.

    `loaded.model` is replaced by the adapted model, put in eval mode; returns `loaded`.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_CONFIG).exists():
        from peft import PeftModel

        if hasattr(loaded.model, "peft_config"):
            raise ValueError("the model already carries an adapter; load a fresh base model first")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
            loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=False)
    elif (adapter_dir / "config.json").exists():
        from safetensors.torch import load_file

        files = sorted(adapter_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{adapter_dir}: a model folder without .safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = unwrap(loaded.model).load_state_dict(state, strict=False)
        # Tied output embeddings are saved once; anything else missing is a different model.
        missing = [k for k in missing if "lm_head" not in k]
        if missing or unexpected:
            raise ConfigError(f"{adapter_dir}: weights do not fit this base model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); pass the --model "
                              "they were trained from")
    else:
        raise FileNotFoundError(f"{adapter_dir}: neither a LoRA adapter ({ADAPTER_CONFIG}) nor a saved "
                                "model (config.json); pass the folder `mechsieve train --out` wrote")
    loaded.model.eval()
    return loaded
