"""Fresh model -> fine-tune -> held-out evaluation: the one implementation every benchmark uses.

`finetune_and_eval(data, train_cfg, heldout, ...)` loads a fresh copy of the base model, trains it
with the library's trainer (`mechsieve.train.train`, LoRA by default) on the examples (rendered
with `render`) or on ready TrainItems (token masks applied), and evaluates it with the library's
evaluators: teacher-forced loss per answer token on the held-out examples and, when asked,
greedy exact match. No data (or `train_cfg=None`) evaluates the base model itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EvalSettings:
    """How a fine-tuned model is evaluated on the held-out examples."""

    max_len: int = 512
    """Render length of the held-out examples (complete answers, not cut at a pool's limit)."""
    max_tokens: int = 4096
    """Token budget of one evaluation batch."""
    exact_match: bool = False
    """Also greedy generation and exact match of the final answer (slow on CPU)."""
    max_new_tokens: int = 256


@dataclass
class FinetuneResult:
    """What one fine-tune and its evaluation gave; `record()` is the dict the JSON keeps."""

    examples: int
    heldout: dict[str, Any]
    eval_s: float
    steps: int = 0
    train_s: float = 0.0
    train_tokens: int = 0
    loss_curve: list[float] = field(default_factory=list)
    train_settings: dict[str, Any] = field(default_factory=dict)
    exact_match: float | None = None

    @property
    def loss(self) -> float:
        return float(self.heldout["loss_per_token"])

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"examples": self.examples, "heldout_loss": self.loss, "eval_s": self.eval_s}
        if self.steps:
            out.update(steps=self.steps, train_s=self.train_s, train_tokens=self.train_tokens,
                       final_train_loss=round(self.loss_curve[-1], 5))
        if self.exact_match is not None:
            out["exact_match"] = self.exact_match
        out["heldout"] = self.heldout
        return out


def finetune_and_eval(data: Sequence[Any], train_cfg: Any, heldout: Sequence[Any], render: Any = None,
                      evaluation: EvalSettings = EvalSettings(), model: str = MODEL, progress: bool = True,
                      label: str = "") -> FinetuneResult:
    """Fine-tune a freshly loaded `model` on `data` (Examples rendered with `render`, or
    TrainItems) under `train_cfg` (a `mechsieve.train.TrainConfig`), then evaluate it on
    `heldout` (Examples). Empty `data` or `train_cfg=None`: the base model, untrained."""
    from mechsieve.data import RenderConfig
    from mechsieve.models import load_model
    from mechsieve.train import TrainItem, items_from_examples, train

    loaded = load_model(model)  # a fresh base model for every run
    result = FinetuneResult(examples=len(data), heldout={}, eval_s=0.0)
    if len(data) and train_cfg is not None:
        items = (list(data) if isinstance(data[0], TrainItem)
                 else items_from_examples(data, loaded.tokenizer, render or RenderConfig()))
        tr = train(loaded, items, train_cfg, out_dir=None, progress=progress)
        result.steps, result.train_s, result.train_tokens = tr.steps, round(tr.seconds, 1), tr.tokens
        result.loss_curve, result.train_settings = list(tr.loss_curve), dict(tr.settings)
    evaluate(loaded, heldout, evaluation, result, progress)
    if label:
        print(f"  [{label}] {len(data)} examples, {result.steps} steps: held-out loss {result.loss:.4f}"
              + (f", exact match {result.exact_match:.3f}" if result.exact_match is not None else "")
              + f" (train {result.train_s:.0f} s, eval {result.eval_s:.0f} s)", flush=True)
    return result


def evaluate(loaded: Any, heldout: Sequence[Any], evaluation: EvalSettings, result: FinetuneResult,
             progress: bool = True) -> FinetuneResult:
    """Held-out loss per answer token (and exact match when asked) of `loaded`, into `result`."""
    from mechsieve.data import RenderConfig
    from mechsieve.evaluate import heldout_loss

    cfg = RenderConfig(max_len=evaluation.max_len)
    t0 = time.perf_counter()
    result.heldout = heldout_loss(loaded.model, loaded.tokenizer, heldout, cfg, evaluation.max_tokens,
                                  progress=progress)
    if evaluation.exact_match:
        from mechsieve.evaluate.answers import exact_match
        from mechsieve.evaluate.generate import generate_greedy

        preds = generate_greedy(loaded.model, loaded.tokenizer, heldout, cfg,
                                max_new_tokens=evaluation.max_new_tokens, progress=progress)
        result.exact_match = float(np.mean([exact_match(p, ex.response) for p, ex in zip(preds, heldout)]))
    result.eval_s = round(time.perf_counter() - t0, 1)
    return result
