"""`mechsieve train`: LoRA (or full) fine-tuning on a pool or on tokenized items with masks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_model_flags,
    add_overwrite_flag,
    build_config,
    data_flags,
    model_flags,
    print_outputs,
)
from mechsieve.data.readers import DataConfig
from mechsieve.data.render import RenderConfig
from mechsieve.models.loading import ModelConfig
from mechsieve.train.config import TrainConfig

NAME = "train"
HELP = "fine-tune (LoRA by default) on a pool or on tokenized items whose labels carry token masks"


@dataclass
class TrainCommand:
    """Settings of `mechsieve train`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """A pool any reader accepts, or tokenized items (a save_to_disk folder, .parquet or .jsonl):
    input_ids + labels, as `mechsieve mask-tokens` writes, used as they are; or TRL-style input_ids
    + completion_mask (no labels), whose labels are the ids where completion_mask is 1."""
    render: RenderConfig = field(default_factory=RenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/train"
    """Output folder: the adapter (or full model), train.json (settings, loss curve), train_log.jsonl
    (the loss lines), checkpoint-STEP folders (train.save_steps) and tensorboard/ (train.report_to)."""
    resume: str = ""
    """Continue a stopped run: `latest` (the newest checkpoint in `out`; from step 0 if there is
    none yet) or a checkpoint-STEP folder; the result equals that of the run never stopped. Empty:
    start at step 0 (an earlier run's checkpoints in `out` are removed)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--out", "--output_dir", help="output folder (default runs/train)")
    add_overwrite_flag(p)
    p.add_argument("--steps", "--max_steps", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    p.add_argument("--lr", "--learning_rate", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--max-tokens", type=int, help="token budget of one micro-batch (default 4096)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seed", type=int, help="seed of LoRA init, dropout and batch order (default 0)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--max-len", "--max_length", type=int, help="longest rendered example (tokens)")
    p.add_argument("--save-steps", "--save_steps", type=int,
                   help="write a checkpoint every N optimizer steps to OUT/checkpoint-N (default 0: none)")
    p.add_argument("--save-total-limit", "--save_total_limit", type=int,
                   help="keep the newest N checkpoints (default 3; 0: all)")
    p.add_argument("--resume", "--resume_from_checkpoint", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in OUT, or from the checkpoint folder given")
    p.add_argument("--logging-steps", "--logging_steps", type=int,
                   help="a loss line every N steps, printed even under --quiet and kept in OUT/train_log.jsonl "
                   "(default 10; 0: none)")
    p.add_argument("--report-to", "--report_to", choices=["none", "tensorboard", "wandb"],
                   help="also log to TensorBoard (OUT/tensorboard) or Weights & Biases (default none)")
    p.add_argument("--gradient-checkpointing", "--gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass: less memory, more compute")
    p.add_argument("--mixed-precision", "--mixed_precision", choices=["no", "bf16"],
                   help="bf16: bfloat16 autocast (for GPUs with bf16; default no)")
    p.add_argument("--bf16", dest="mixed_precision", action="store_const", const="bf16",
                   help="the same as --mixed-precision bf16")
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    from mechsieve.data.readers import read_pool
    from mechsieve.models.loading import load_model
    from mechsieve.store.outputs import OutputFolder
    from mechsieve.train import is_tokenized, items_from_examples, load_tokenized, train
    from mechsieve.train.loop import is_main_process

    # Under torchrun / accelerate launch every process runs this; only the main one speaks.
    say = print if is_main_process() else (lambda *a, **k: None)

    flags = {**model_flags(args), **data_flags(args), "out": args.out,
             "train.max_steps": args.steps, "train.epochs": args.epochs, "train.learning_rate": args.lr,
             "train.lora_r": args.lora_r, "train.max_tokens": args.max_tokens, "train.grad_accum": args.grad_accum,
             "train.seed": args.seed, "train.full_finetune": True if args.full else None,
             "render.max_len": args.max_len, "resume": args.resume,
             "train.save_steps": args.save_steps, "train.save_total_limit": args.save_total_limit,
             "train.logging_steps": args.logging_steps, "train.report_to": args.report_to,
             "train.gradient_checkpointing": args.gradient_checkpointing,
             "train.mixed_precision": args.mixed_precision}
    cfg = build_config(TrainCommand, args, flags)
    from mechsieve.train.logs import require_tracker

    require_tracker(cfg.train.report_to)  # before the model loads
    from mechsieve.train.checkpoints import latest_checkpoint

    # a run resumed from a checkpoint continues its own folder, finished or not: no --overwrite
    # needed (--resume over finished output with no checkpoint to continue would train it anew)
    continues = bool(cfg.resume) and (cfg.resume != "latest" or latest_checkpoint(cfg.out) is not None)
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite, resumes=continues)
    loaded = load_model(cfg.model)
    if cfg.data.path and is_tokenized(cfg.data.path):
        items = load_tokenized(cfg.data.path)
        if cfg.data.limit:
            items = items[: cfg.data.limit]
        say(f"read {len(items)} tokenized items (labels as given, masks included) from {cfg.data.path}")
    else:
        pool = read_pool(cfg.data)
        if pool.skipped:
            say(f"skipped {len(pool.skipped)} invalid record(s); first: {pool.skipped[0]}")
        items = items_from_examples(pool.examples, loaded.tokenizer, cfg.render)
        say(f"read {len(pool)} examples ({pool.format}) from {pool.path}; labels on response tokens")
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    top = max(int(it.input_ids.max()) for it in items if len(it))
    if top >= vocab:
        from mechsieve.config import ConfigError

        raise ConfigError(f"token id {top} is outside this model's vocabulary ({vocab}); the items were "
                          "tokenized for another model: pass that --model")
    if is_main_process():  # the adapter's files (named by peft) are recorded as they appear
        folder.claim(["train.json", "train_log.jsonl", "tensorboard"])
    result = train(loaded, items, cfg.train, out_dir=cfg.out, progress=not args.quiet, resume=cfg.resume or None)
    if is_main_process():
        folder.finish()
    kind = "full fine-tuning" if cfg.train.full_finetune else f"LoRA r={cfg.train.lora_r}"
    if not is_main_process():
        return 0
    resumed = f" (resumed at step {result.settings['resumed_from']['step']})" if result.resumed_from else ""
    print(f"{kind}: {result.steps} steps{resumed}, {result.tokens} label tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_s:.1f} tok/s); loss {result.loss_curve[0]:.4f} -> {result.loss_curve[-1]:.4f}")
    out = Path(cfg.out)
    paths: dict[str, Path] = {"adapter" if not cfg.train.full_finetune else "model": out,
                              "settings": out / "train.json"}
    if (out / "train_log.jsonl").exists():
        paths["loss log"] = out / "train_log.jsonl"
    if cfg.train.save_steps:
        paths["checkpoints"] = out / "checkpoint-*"
    if cfg.train.report_to == "tensorboard":
        paths["tensorboard"] = out / "tensorboard"
    print_outputs(paths)
    return 0
