"""The training loop: a plain torch loop under accelerate, with losses that honour -100 labels.

Loss of an optimizer step = (sum of token NLL over every label token of its micro-batches) /
(number of those tokens). Each micro-batch's summed NLL is divided by the step's total token
count before `backward`, so gradient accumulation gives exactly the gradient of the big batch
(unlike averaging per-micro-batch means, which over-weights short micro-batches).

Micro-batches are length buckets under a token budget (`capture.plan_batches`), reshuffled in
order each epoch from the seed; with `max_steps` the data is cycled as often as needed. Under N
processes (accelerate / torchrun) each takes every N-th bucket of that order, so an epoch is
1/N of the optimizer steps of one process, and only the main process shows progress. There is
no packing: sequences are right-padded side by side, never concatenated, so no example attends
to another and every label stays at its own token.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mechsieve.capture.batching import plan_batches
from mechsieve.config import ConfigError, to_dict
from mechsieve.data.readers import DataError
from mechsieve.data.render import pad_id
from mechsieve.models.loading import LoadedModel
from mechsieve.train.config import TrainConfig, TrainResult
from mechsieve.train.items import IGNORE, ItemBatch, TrainItem, collate_items
from mechsieve.train.lora import (
    PEFT_DEPRECATION,
    save_trained,
    trainable_parameters,
    wrap_for_training,
)


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over label positions, and their count.

    logits: [b, t, V] (position t predicts token t + 1); labels: [b, t] with -100 where no loss.
    Only the rows of label positions are gathered, so masked tokens take no part at all.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    picked = logits[:, :-1][keep].float()
    return F.cross_entropy(picked, targets[keep], reduction="sum"), n


def batch_nll_sum(model: Any, batch: ItemBatch) -> tuple[torch.Tensor, int]:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    return masked_nll_sum(out.logits, batch.labels)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak learning rate at optimizer step `s` (0-based)."""

    def f(s: int) -> float:
        if cfg.warmup_steps and s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((s - cfg.warmup_steps) / span, 1.0)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def is_main_process() -> bool:
    """Whether this is the process that prints: rank 0 of a torchrun / accelerate launch, or
    the only one (read from the launcher's RANK, so a command can ask before any model work)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def steps_per_epoch(items: Sequence[TrainItem], cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps of one pass over `items` by `world` processes together (each takes every
    `world`-th micro-batch; items without label tokens are not counted)."""
    lengths = [len(it) for it in items if it.n_targets > 0]
    if not lengths:
        return 0
    per_process = math.ceil(len(plan_batches(lengths, cfg.max_tokens, cfg.max_batch).batches) / world)
    return math.ceil(per_process / cfg.grad_accum)


def micro_batches(items: Sequence[TrainItem], cfg: TrainConfig, rank: int = 0, world: int = 1
                  ) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, item indices) micro-batches: fixed length buckets, order reshuffled per epoch."""
    usable = [i for i, it in enumerate(items) if it.n_targets > 0]
    plan = plan_batches([len(items[i]) for i in usable], cfg.max_tokens, cfg.max_batch)
    buckets = [[usable[j] for j in b] for b in plan.batches]
    if len(buckets) < world:
        raise ConfigError(f"{len(buckets)} micro-batches for {world} processes: each process needs at least one; "
                          "lower train.max_tokens (or train.max_batch), give more data, or use fewer processes")
    epoch = 0
    while True:
        order = list(range(len(buckets)))
        random.Random(cfg.seed * 100_003 + epoch).shuffle(order)
        for k in order[rank::world]:
            yield epoch, buckets[k]
        epoch += 1


@dataclass
class EpochEnd:
    """What `train` hands its `on_epoch_end` hook after the optimizer step that ends an epoch
    (the step after which the next micro-batch belongs to the next epoch), and after the last
    step when the run ends inside an epoch (fractional `epochs`, or `max_steps`)."""

    epoch: int
    """0-based index of the epoch that ended."""
    steps: int
    """Optimizer steps done so far."""
    model: Any
    """The model being trained (the peft model for LoRA), in training mode."""
    optimizer: torch.optim.Optimizer
    """The AdamW; `optimizer.state[param]` holds exp_avg, exp_avg_sq and step."""
    learning_rates: list[float]
    """The learning rate of each optimizer step of this epoch."""


def train(loaded: LoadedModel, items: Sequence[TrainItem], cfg: TrainConfig,
          out_dir: str | Path | None = None, progress: bool = True,
          on_epoch_end: Callable[[EpochEnd], None] | None = None) -> TrainResult:
    """Fine-tune `loaded.model` in place on `items` (LoRA unless cfg.full_finetune).

    `loaded.model` becomes the peft model for LoRA. With `out_dir`, the adapter (or full model)
    is saved there with `train.json` (settings, loss curve), written last as a completion mark.
    `on_epoch_end`, if given, is called with an `EpochEnd` at the end of every epoch (on every
    process), e.g. to keep per-epoch checkpoints with their optimizer state (LESS).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    usable = [it for it in items if it.n_targets > 0]
    if not usable:
        raise DataError(f"none of the {len(items)} items has a label token to train on: prompt-only records, "
                        "every response token masked, or answers cut off by truncation (raise render.max_len, "
                        "--max-len)")
    if out_dir is not None:
        # train.json marks a finished run: a stale one must not vouch for this run's files.
        (Path(out_dir) / "train.json").unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    if loaded.device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:
        torch.cuda.set_device(loaded.device)  # one process trains where it was loaded (--device cuda:1)
    accelerator = Accelerator(cpu=loaded.device.type == "cpu")
    # Each process trains on its own device (cuda:LOCAL_RANK under N processes), not on the one
    # the model was loaded to, before the optimizer is made from its parameters.
    loaded.model.to(accelerator.device)
    with warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing through a deprecated name.
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        model = wrap_for_training(loaded.model, cfg)
        loaded.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
    world = accelerator.num_processes
    per_epoch = steps_per_epoch(items, cfg, world)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    pad = pad_id(loaded.tokenizer)
    stream = micro_batches(items, cfg, accelerator.process_index, world)
    pending = next(stream)  # one micro-batch ahead: its epoch tells when an epoch has ended

    model.train()
    losses: list[float] = []
    lrs: list[float] = []
    tokens = 0
    input_tokens = 0
    padded_tokens = 0
    epoch = 0
    epochs_reported = 0
    epoch_lrs: list[float] = []
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress or not accelerator.is_main_process)
    start = time.perf_counter()
    for _step in range(total_steps):
        group = []
        for _ in range(cfg.grad_accum):
            (epoch, idx), pending = pending, next(stream)
            group.append(collate_items(items, idx, pad).to(accelerator.device))
        local = sum(b.n_targets for b in group)
        input_tokens += sum(int(b.attention_mask.sum()) for b in group)
        padded_tokens += sum(int(b.input_ids.numel()) for b in group)
        step_tokens = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum")) \
            if world > 1 else local
        total = 0.0
        for k, batch in enumerate(group):
            sync = k == len(group) - 1
            ctx = accelerator.no_sync(model) if (world > 1 and not sync) else nullcontext()
            with ctx:
                nll, _n = batch_nll_sum(model, batch)
                # DDP averages gradients over processes; scaling by `world` makes it a sum.
                accelerator.backward(nll * world / step_tokens)
            total += float(nll.detach())
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        epoch_lrs.append(lrs[-1])
        if on_epoch_end is not None and (pending[0] > epochs_reported or _step == total_steps - 1):
            on_epoch_end(EpochEnd(epochs_reported, _step + 1, model, getattr(optimizer, "optimizer", optimizer),
                                  epoch_lrs))
            epochs_reported, epoch_lrs = max(pending[0], epochs_reported + 1), []
        if world > 1:
            total = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), "sum"))
        losses.append(total / step_tokens)
        tokens += step_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch)
    seconds = time.perf_counter() - start
    bar.close()
    model.eval()
    model = accelerator.unwrap_model(model)
    loaded.model = model
    n_train, n_total = trainable_parameters(model)
    settings = {
        "train": to_dict(cfg), "model": loaded.identity, "items": len(items),
        "items_without_labels": len(items) - len(usable), "steps": total_steps,
        "steps_per_epoch": per_epoch, "epochs_seen": round(total_steps / per_epoch, 4) if per_epoch else None,
        "trainable_parameters": n_train, "parameters": n_total, "processes": world,
        "input_tokens": input_tokens, "padded_tokens": padded_tokens,
    }
    result = TrainResult(None, losses, total_steps, tokens, seconds, settings)
    if out_dir is not None and accelerator.is_main_process:
        from mechsieve.store.atomic import write_json

        result.adapter_dir = save_trained(model, loaded.tokenizer, out_dir, cfg.full_finetune)
        write_json(Path(out_dir) / "train.json", {
            "settings": settings, "loss_curve": losses, "learning_rates": lrs, "steps": total_steps,
            "tokens": tokens, "input_tokens": input_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(result.tokens_per_s, 2),
            "seconds_per_step": round(seconds / total_steps, 4)})
    return result
