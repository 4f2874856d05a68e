"""Training checkpoints: written atomically every `save_steps`, found and loaded back by `--resume`.

A checkpoint is a folder `OUT/checkpoint-STEP`, laid out as the Hugging Face Trainer lays out its
own (so the adapter inside loads with `PeftModel.from_pretrained` like any other):

    adapter_config.json, adapter_model.safetensors   the LoRA adapter, as peft saves it
                                                     (a full fine-tune: the whole model folder)
    optimizer.pt        AdamW state (moments, step counts) and param groups
    scheduler.pt        the learning-rate scheduler's state
    rng_state.pth       python, numpy, torch CPU (and CUDA) generator states, one entry per process
    trainer_state.json  the step, loss curve and counters so far, and what the run was started
                        with (settings, model, data fingerprint); written last

The folder is assembled under a temporary name and renamed into place whole (`atomic_dir`), so a
run killed while saving leaves no `checkpoint-STEP` that a resume would read; only folders with a
trainer_state.json count. A resumed run replays the data order to the checkpoint's step and puts
every generator back, so it goes on exactly as the uninterrupted run would have.

Differences from the Trainer: the micro-batch order is not stored, it is recomputed from the seed
(`micro_batches` is a pure function of the items, settings and epoch); a resume refuses a
checkpoint of other settings, data or model, where the Trainer would carry on.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechsieve.config import ConfigError, to_dict
from mechsieve.train.config import TrainConfig
from mechsieve.train.items import TrainItem

STATE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RUN_SETTINGS = ("save_steps", "save_total_limit", "logging_steps", "report_to")
"""Settings that do not change what is trained: a resumed run may change them."""


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """The finished checkpoints under `out_dir` as (step, folder), oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT.match(p.name)
        if m and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest finished checkpoint under `out_dir`, or None."""
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_checkpoints(out_dir: str | Path) -> None:
    """Delete the checkpoints of an earlier run in `out_dir` (and the temporary folders a killed
    save left), so a fresh run's folder holds only its own and `--resume` never picks up a stale one."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for p in out.iterdir():
        ours = CHECKPOINT.match(p.name) and (p / STATE).is_file()
        leftover = p.name.startswith(".checkpoint-") and p.name.endswith((".tmp", ".old"))
        if p.is_dir() and (ours or leftover):
            shutil.rmtree(p, ignore_errors=True)


def rotate(out_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all)."""
    if keep <= 0:
        return
    for _, path in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def items_fingerprint(items: Sequence[TrainItem]) -> str:
    """sha256 over every item's input_ids and labels, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(len(it).to_bytes(8, "little"))
        h.update(it.input_ids.tobytes())
        h.update(it.labels.tobytes())
    return h.hexdigest()


def run_identity(cfg: TrainConfig, model_identity: Any, items: Sequence[TrainItem], world: int) -> dict[str, Any]:
    """What a checkpoint must have been started with for a resume to continue it exactly."""
    train = {k: v for k, v in to_dict(cfg).items() if k not in RUN_SETTINGS}
    return {"train": train, "model": model_identity, "items": items_fingerprint(items), "processes": world}


def check_resumable(path: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run of other settings, model, data or process count."""
    from mechsieve.store.artefacts import diff_settings

    differences = diff_settings(state.get("identity", {}), identity)
    if differences:
        shown = "\n  ".join(differences[:12])
        raise ConfigError(
            f"--resume {path}: the checkpoint was written by a run under other settings (there, here):\n  {shown}\n"
            f"Resume with the settings, data and model it was started with (only {', '.join(RUN_SETTINGS)} may "
            "change), or drop --resume to start over")


def read_state(path: str | Path) -> dict[str, Any]:
    """The trainer_state.json of checkpoint folder `path`; a folder without one is not a checkpoint."""
    import json

    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"--resume {path}: not a finished checkpoint (no {STATE}); pass a checkpoint-STEP "
                                "folder that `mechsieve train --save-steps` wrote, or the run's --out folder")
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def rng_state() -> dict[str, Any]:
    """This process's generator states (python, numpy, torch CPU, every CUDA device)."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].copy()),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` read."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy(), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    full: bool, rng_states: list[dict[str, Any]], state: dict[str, Any]) -> Path:
    """Write OUT/checkpoint-STEP whole or not at all (see the module docstring); returns it.

    model: the unwrapped (peft) model; optimizer: the torch optimizer; rng_states: one per process."""
    from mechsieve.store.atomic import atomic_dir, write_json
    from mechsieve.train.lora import save_trained

    target = Path(out_dir) / f"checkpoint-{step}"
    with atomic_dir(target) as tmp:
        save_trained(model, tokenizer, tmp, full)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_state.pth")
        write_json(tmp / STATE, {**state, "step": step})
    return target


def load_weights(path: Path, model: Any, full: bool) -> None:
    """Put the checkpoint's trained weights (adapter or full model) into `model` (unwrapped)."""
    from safetensors.torch import load_file

    from mechsieve.models.hooks import unwrap

    if full:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
        missing = [k for k in missing if "lm_head" not in k]  # tied output embeddings are saved once
    else:
        from peft import set_peft_model_state_dict

        if not (path / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"--resume {path}: no adapter_model.safetensors (a full fine-tuning checkpoint? "
                                    "then set train.full_finetune=true)")
        result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        missing, unexpected = [], list(result.unexpected_keys)
    if missing or unexpected:
        raise ConfigError(f"--resume {path}: the checkpoint's weights do not fit this model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, full: bool, rank: int
                    ) -> dict[str, Any]:
    """Load weights, optimizer and scheduler state from checkpoint `path`; returns this process's
    generator states, to be put back (`set_rng_state`) just before the first resumed step."""
    load_weights(path, model, full)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    states = torch.load(path / "rng_state.pth", weights_only=True)
    return states[rank] if rank < len(states) else states[0]
