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

Around the loop, as Hugging Face users expect of a trainer: checkpoints every `save_steps` that a
resumed run continues exactly (train/checkpoints.py), loss lines every `logging_steps` and
optional trackers (train/logs.py), gradient checkpointing, and bf16 autocast. The Accelerator is
always made with this run's `mixed_precision`: accelerate keeps its state per process, and a TRL
(or any Trainer) run before it in the same process would otherwise hand its bf16 setting on;
that state is set aside for the run and put back after.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
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
from mechsieve.train.logs import LOG, TrainLog
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
          on_epoch_end: Callable[[EpochEnd], None] | None = None,
          resume: bool | str | Path | None = None) -> TrainResult:
    """Fine-tune `loaded.model` in place on `items` (LoRA unless cfg.full_finetune).

    `loaded.model` becomes the peft model for LoRA. With `out_dir`, the adapter (or full model)
    is saved there with `train.json` (settings, loss curve), written last as a completion mark,
    beside `train_log.jsonl` (the loss lines) and the checkpoints of `cfg.save_steps`.
    `on_epoch_end`, if given, is called with an `EpochEnd` at the end of every epoch (on every
    process), e.g. to keep per-epoch checkpoints with their optimizer state (LESS).
    `resume`: True (or "latest") continues from the newest checkpoint in `out_dir` (from step 0,
    with a warning, when there is none); a path continues from that checkpoint folder (or the
    newest one in that run folder). The result equals that of the run never stopped.
    """
    from mechsieve.train.checkpoints import remove_checkpoints

    usable = [it for it in items if it.n_targets > 0]
    if not usable:
        raise DataError(f"none of the {len(items)} items has a label token to train on: prompt-only records, "
                        "every response token masked, or answers cut off by truncation (raise render.max_len, "
                        "--max-len)")
    out = Path(out_dir) if out_dir is not None else None
    if cfg.save_steps and out is None:
        raise ConfigError(f"train.save_steps={cfg.save_steps} writes checkpoints into the output folder: give "
                          "out_dir (--out), or set train.save_steps=0")
    log = TrainLog(cfg, out, main=is_main_process())  # a missing tracker package fails here, before model work
    checkpoint = resume_checkpoint(resume, out)
    if out is not None:
        # train.json marks a finished run: a stale one must not vouch for this run's files.
        (out / "train.json").unlink(missing_ok=True)
        if checkpoint is None and is_main_process():
            remove_checkpoints(out)  # an earlier run's: a later --resume must not continue them
    torch.manual_seed(cfg.seed)
    if loaded.device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:
        torch.cuda.set_device(loaded.device)  # one process trains where it was loaded (--device cuda:1)
    check_precision(cfg, loaded.device)
    with own_accelerator_state(cfg.mixed_precision):
        return _train(loaded, items, usable, cfg, out, progress, on_epoch_end, checkpoint, log)


def resume_checkpoint(resume: bool | str | Path | None, out: Path | None) -> Path | None:
    """The checkpoint folder `resume` names (see `train`), or None to start at step 0."""
    from mechsieve.train.checkpoints import STATE, latest_checkpoint, read_state

    if resume is None or resume is False or resume == "":
        return None
    if resume is True or resume == "latest":
        if out is None:
            raise ConfigError("resume=latest looks for checkpoints in the output folder: give out_dir (--out), "
                              "or the checkpoint folder to resume from")
        found = latest_checkpoint(out)
        if found is None and is_main_process():
            LOG.warning(f"--resume: no checkpoint in {out} yet; training from step 0")
        return found
    path = Path(resume)
    if not (path / STATE).is_file() and latest_checkpoint(path) is not None:
        path = latest_checkpoint(path)  # a run folder: its newest checkpoint
    read_state(path)  # not a checkpoint: refused here, before any model work
    return path


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """bf16 where the device has it: refused on a GPU without bf16, allowed (with a warning) on CPU."""
    if cfg.mixed_precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.mixed_precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support (it needs an Ampere or newer GPU); set train.mixed_precision=no")
    if device.type == "cpu" and is_main_process():
        LOG.warning("train.mixed_precision=bf16 on CPU: runs under torch's CPU autocast, which is usually slower "
                    "than float32 unless the CPU has native bf16 (AMX, AVX512-BF16); bf16 is meant for GPUs")


@contextmanager
def own_accelerator_state(mixed_precision: str) -> Iterator[None]:
    """Inside: accelerate's process-wide state is this run's, with `mixed_precision` (another run's
    state, e.g. TRL's bf16, is set aside first); on exit it is put back as it was found, not set
    up at all if it was not, with the gradient-accumulation state."""
    from accelerate.state import AcceleratorState, GradientState

    shared = AcceleratorState._shared_state
    saved, saved_grad = dict(shared), dict(GradientState._shared_state)
    if "_mixed_precision" in shared and shared["_mixed_precision"] != mixed_precision:
        AcceleratorState._reset_state()  # PartialState (devices, the process group) stays as it is
    try:
        yield
    finally:
        shared.clear()
        shared.update(saved)
        GradientState._shared_state.clear()
        GradientState._shared_state.update(saved_grad)


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing (it needs no input that requires grad, so frozen embeddings under
    LoRA are fine); refused for a model that does not support it."""
    # transformers 5 names it activation checkpointing (gradient_checkpointing_* are deprecated aliases)
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as err:
        raise ConfigError(f"train.gradient_checkpointing=true: {err}; set it false for this model") from None


def _train(loaded: LoadedModel, items: Sequence[TrainItem], usable: list[TrainItem], cfg: TrainConfig,
           out: Path | None, progress: bool, on_epoch_end: Callable[[EpochEnd], None] | None,
           checkpoint: Path | None, log: TrainLog) -> TrainResult:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from mechsieve.models.hooks import unwrap
    from mechsieve.train import checkpoints as ckpt

    accelerator = Accelerator(cpu=loaded.device.type == "cpu", mixed_precision=cfg.mixed_precision,
                              **log.accelerator_kwargs())
    # Each process trains on its own device (cuda:LOCAL_RANK under N processes), not on the one
    # the model was loaded to, before the optimizer is made from its parameters.
    loaded.model.to(accelerator.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
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
    identity = ckpt.run_identity(cfg, loaded.identity, items, world) if (cfg.save_steps or checkpoint) else {}

    losses: list[float] = []
    lrs: list[float] = []
    tokens = input_tokens = padded_tokens = 0
    seconds_before = 0.0
    epochs_reported = 0
    epoch_lrs: list[float] = []
    start = 0
    rng = None
    if checkpoint is not None:
        state = ckpt.read_state(checkpoint)
        ckpt.check_resumable(checkpoint, state, identity)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
            rng = ckpt.load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler,
                                       cfg.full_finetune, accelerator.process_index)
        start, losses, lrs = state["step"], list(state["loss_curve"]), list(state["learning_rates"])
        tokens, input_tokens, padded_tokens = state["tokens"], state["input_tokens"], state["padded_tokens"]
        seconds_before, epochs_reported, epoch_lrs = state["seconds"], state["epochs_reported"], state["epoch_lrs"]
        if accelerator.is_main_process:
            LOG.info(f"resumed from {checkpoint} at step {start}/{total_steps}")

    stream = micro_batches(items, cfg, accelerator.process_index, world)
    pending = next(stream)  # one micro-batch ahead: its epoch tells when an epoch has ended
    epoch = pending[0]
    for _ in range(start * cfg.grad_accum):  # replay the order up to the checkpoint (indices only)
        (epoch, _idx), pending = pending, next(stream)
    settings_flat = {"train": to_dict(cfg), "model": loaded.identity, "items": len(items)}
    log.start(accelerator, settings_flat, start)

    model.train()
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step",
               disable=not progress or not accelerator.is_main_process)
    if rng is not None:
        ckpt.set_rng_state(rng)  # last: model wrapping above draws from the generators
    t0 = time.perf_counter()
    for _step in range(start, total_steps):
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
        done = _step + 1
        seconds = seconds_before + time.perf_counter() - t0
        log.step(accelerator, done, total_steps, losses, lrs[-1], done / per_epoch if per_epoch else 0.0, tokens,
                 seconds)
        if cfg.save_steps and done % cfg.save_steps == 0 and out is not None:
            from accelerate.utils import gather_object

            rngs = gather_object([ckpt.rng_state()]) if world > 1 else [ckpt.rng_state()]
            if accelerator.is_main_process:
                state = {"identity": identity, "total_steps": total_steps, "loss_curve": losses,
                         "learning_rates": lrs, "tokens": tokens, "input_tokens": input_tokens,
                         "padded_tokens": padded_tokens, "seconds": round(seconds, 3),
                         "epochs_reported": epochs_reported, "epoch_lrs": epoch_lrs}
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
                    ckpt.save_checkpoint(out, done, accelerator.unwrap_model(model), loaded.tokenizer, optimizer,
                                         scheduler, cfg.full_finetune, rngs, state)
                ckpt.rotate(out, cfg.save_total_limit)
            accelerator.wait_for_everyone()
    seconds = seconds_before + time.perf_counter() - t0
    bar.close()
    log.end(accelerator)
    model.eval()
    # keep_fp32_wrapper=False: the bf16 autocast put around forward for training comes off again
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if cfg.gradient_checkpointing:
        base = unwrap(model)
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    loaded.model = model
    n_train, n_total = trainable_parameters(model)
    settings = {
        "train": to_dict(cfg), "model": loaded.identity, "items": len(items),
        "items_without_labels": len(items) - len(usable), "steps": total_steps,
        "steps_per_epoch": per_epoch, "epochs_seen": round(total_steps / per_epoch, 4) if per_epoch else None,
        "trainable_parameters": n_train, "parameters": n_total, "processes": world,
        "input_tokens": input_tokens, "padded_tokens": padded_tokens,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": {"checkpoint": str(checkpoint), "step": start} if checkpoint is not None else None,
    }
    result = TrainResult(None, losses, total_steps, tokens, seconds, settings, resumed_from=checkpoint)
    if out is not None and accelerator.is_main_process:
        from mechsieve.store.atomic import write_json

        result.adapter_dir = save_trained(model, loaded.tokenizer, out, cfg.full_finetune,
                                          identity=loaded.identity)
        write_json(out / "train.json", {
            "settings": settings, "loss_curve": losses, "learning_rates": lrs, "steps": total_steps,
            "tokens": tokens, "input_tokens": input_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(result.tokens_per_s, 2),
            "seconds_per_step": round(seconds / total_steps, 4)})
    return result
