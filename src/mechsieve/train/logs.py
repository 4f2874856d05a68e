"""Loss lines every `logging_steps`: the `mechsieve.train` logger, OUT/train_log.jsonl, and trackers.

A line carries the mean loss of the optimizer steps since the previous line (as the Hugging Face
Trainer logs it), the learning rate of the last of them, the epoch as a fraction, label tokens so
far and seconds. The CLI prints the logger's INFO lines even under `--quiet`, so a log file shows a
run's progress where a progress bar leaves only carriage returns.

Trackers (`report_to`) go through accelerate's `log_with`; their packages are optional and
imported by accelerate only when asked for. A missing one fails when the `TrainLog` is made,
before any model work, with the command that installs it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechsieve.config import ConfigError
from mechsieve.train.config import TrainConfig

LOG = logging.getLogger("mechsieve.train")
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROJECT = "mechsieve-train"
TRACKERS = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
"""report_to: the command that installs its package."""


def require_tracker(report_to: str) -> None:
    """Refuse a `report_to` whose package is not installed, naming the install command. Asked of
    accelerate itself: it would otherwise drop a tracker it cannot find with only a warning."""
    if report_to == "none":
        return
    from accelerate.tracking import get_available_trackers

    if report_to not in {getattr(t, "value", t) for t in get_available_trackers()}:
        raise ConfigError(f"train.report_to={report_to} needs the {report_to} package, which is not installed "
                          f"(accelerate finds no {report_to} tracker): {TRACKERS[report_to]} (or set "
                          "train.report_to=none)")


def interval_mean(losses: Sequence[float], step: int, every: int) -> float:
    """Mean loss of the steps since the previous line: steps ((step - 1) // every) * every + 1 .. step
    (1-based), i.e. the last full interval, or the shorter one that ends the run."""
    window = losses[((step - 1) // every) * every: step]
    return float(sum(window) / len(window))


def is_due(step: int, total: int, every: int) -> bool:
    """Whether optimizer step `step` (1-based) of `total` gets a line."""
    return every > 0 and (step % every == 0 or step == total)


class TrainLog:
    """Where the loss lines of one run go; see the module docstring."""

    def __init__(self, cfg: TrainConfig, out_dir: Path | None, main: bool = True) -> None:
        require_tracker(cfg.report_to)
        if cfg.report_to == "tensorboard" and out_dir is None:
            raise ConfigError("train.report_to=tensorboard writes its event files into the output folder: give "
                              "out_dir (--out), or set train.report_to=none")
        self.cfg = cfg
        self.out = out_dir
        self.main = main
        self.path = out_dir / TRAIN_LOG if out_dir is not None and cfg.logging_steps else None

    def accelerator_kwargs(self) -> dict[str, Any]:
        """`log_with` and the project folders for the run's Accelerator."""
        if self.cfg.report_to == "none":
            return {}
        from accelerate.utils import ProjectConfiguration

        kwargs: dict[str, Any] = {"log_with": self.cfg.report_to}
        if self.out is not None:
            kwargs["project_config"] = ProjectConfiguration(project_dir=str(self.out),
                                                            logging_dir=str(self.out / TENSORBOARD_DIR))
        return kwargs

    def start(self, accelerator: Any, settings: dict[str, Any], resumed_step: int) -> None:
        """Start the trackers; keep the lines of train_log.jsonl up to `resumed_step` (none on a fresh run)."""
        if self.main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            keep = []
            if resumed_step and (self.out / TRAIN_LOG).is_file():
                lines = (self.out / TRAIN_LOG).read_text(encoding="utf-8").splitlines()
                keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resumed_step]
            if keep:
                from mechsieve.store.atomic import write_text

                write_text(self.out / TRAIN_LOG, "".join(ln + "\n" for ln in keep))
            else:
                (self.out / TRAIN_LOG).unlink(missing_ok=True)
        if self.cfg.report_to != "none":
            init = {"wandb": {"name": self.out.name}} if self.cfg.report_to == "wandb" and self.out is not None else {}
            accelerator.init_trackers(PROJECT, config=tracker_config(settings), init_kwargs=init)

    def step(self, accelerator: Any, step: int, total: int, losses: Sequence[float], learning_rate: float,
             epoch: float, tokens: int, seconds: float) -> dict[str, Any] | None:
        """After optimizer step `step` (1-based): the line, when one is due (None otherwise)."""
        if not is_due(step, total, self.cfg.logging_steps):
            return None
        record = {"step": step, "loss": interval_mean(losses, step, self.cfg.logging_steps),
                  "learning_rate": learning_rate, "epoch": round(epoch, 4), "tokens": tokens,
                  "seconds": round(seconds, 3)}
        if self.main:
            LOG.info(f"step {step}/{total}  loss {record['loss']:.4f}  lr {learning_rate:.3g}  "
                     f"epoch {record['epoch']:.2f}  {tokens} tokens  {seconds:.1f} s")
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
        if self.cfg.report_to != "none":
            accelerator.log({"train/loss": record["loss"], "train/learning_rate": learning_rate,
                             "train/epoch": epoch, "train/tokens": tokens}, step=step)
        return record

    def end(self, accelerator: Any) -> None:
        """Close the trackers (not `accelerator.end_training`, which also ends the process group)."""
        if self.cfg.report_to != "none":
            for tracker in accelerator.trackers:
                tracker.finish()


def tracker_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The run's settings flattened (`train.lora_r`) into the scalars trackers take as hparams."""
    from mechsieve.store.artefacts import flatten

    out = {}
    for key, value in flatten(settings).items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)
    return out
