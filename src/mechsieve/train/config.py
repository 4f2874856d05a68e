"""Settings of a fine-tuning run, and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechsieve.config import ConfigError, check_choice, check_positive


@dataclass
class TrainConfig:
    """LoRA (default) or full supervised fine-tuning on items with -100 labels where no loss."""

    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is (alpha / r) * B A."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch input (training only)."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (every linear / GPT-2 Conv1D layer of the blocks, not the output head) or a
    list of module names such as [q_proj, v_proj]."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up: none, linear to 0, or cosine to 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to the peak learning rate."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed); used when max_steps is 0."""
    max_steps: int = 0
    """Optimizer steps to run (0 = from epochs). The data is cycled, reshuffled, as needed."""
    max_tokens: int = 4096
    """Token budget of one micro-batch: batch size x longest sequence (padding included)."""
    max_batch: int = 64
    """At most this many sequences in one micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the mean over all label tokens of the step."""
    seed: int = 0
    """Seeds LoRA initialisation, dropout and the batch order."""
    full_finetune: bool = False
    """Train every weight instead of a LoRA adapter."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    save_steps: int = 0
    """Every this many optimizer steps, write a checkpoint to OUT/checkpoint-STEP (the adapter as
    peft saves it, the optimizer, scheduler and RNG states, the step), atomically, so that a run
    stopped later resumes from it (`--resume`) to the same result (0 = no checkpoints)."""
    save_total_limit: int = 3
    """Keep only the newest this many checkpoints (0 = keep all)."""
    logging_steps: int = 10
    """Every this many optimizer steps (and at the last), log the mean loss since the previous
    line: a line on the `mechsieve.train` logger (printed by the CLI even under --quiet), a record
    in OUT/train_log.jsonl, and the trackers of `report_to` (0 = only the progress bar)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also send the logged values to an experiment tracker through accelerate: TensorBoard event
    files under OUT/tensorboard (pip install tensorboard), or Weights & Biases (pip install wandb;
    configured by its WANDB_* environment variables)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less
    memory for longer sequences or bigger micro-batches, about a third more compute."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """`bf16`: run forward and backward under bfloat16 autocast (weights, optimizer state and the
    loss stay float32). Meant for GPUs with bf16 (Ampere or newer; refused on older ones); on CPU it
    runs through torch's CPU autocast, usually slower than float32 unless the CPU has native bf16."""

    def __post_init__(self) -> None:
        check_positive("train.lora_r", self.lora_r)
        check_positive("train.lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"train.lora_dropout={self.lora_dropout} must be in [0, 1)")
        check_positive("train.learning_rate", self.learning_rate)
        check_choice("train.schedule", self.schedule, ("constant", "linear", "cosine"))
        check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("train.max_steps", self.max_steps, allow_zero=True)
        if self.max_steps == 0:
            check_positive("train.epochs", self.epochs)
        check_positive("train.max_tokens", self.max_tokens)
        check_positive("train.max_batch", self.max_batch)
        check_positive("train.grad_accum", self.grad_accum)
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        check_positive("train.save_steps", self.save_steps, allow_zero=True)
        check_positive("train.save_total_limit", self.save_total_limit, allow_zero=True)
        check_positive("train.logging_steps", self.logging_steps, allow_zero=True)
        check_choice("train.report_to", self.report_to, ("none", "tensorboard", "wandb"))
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16"))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if not self.target_modules:
            raise ConfigError("train.target_modules is empty; use all-linear or a list like [q_proj, v_proj]")


@dataclass
class TrainResult:
    """What `train` did: where the adapter went, the loss per optimizer step, and its cost."""

    adapter_dir: Path | None
    loss_curve: list[float]
    steps: int
    tokens: int
    """Label tokens trained on (summed over steps; a token seen twice counts twice)."""
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    resumed_from: Path | None = None
    """The checkpoint the run continued from (None: it started at step 0)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
