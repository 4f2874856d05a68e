"""The removal experiment of Concept Influence (arXiv 2602.14869; METHODS.md section 3.7) on a
real model: retrain the same LoRA from the base model on the pool without its top fraction (by an
attribution method's scores) and, as controls, without seeded random fractions of the same size,
and measure every retrained model. The bookkeeping (which ids each run keeps, means and spreads)
is `evaluate.attribution.removal_experiment`; this module passes it the real trainer and measure.

Two measures per retrained model:

- `concept`: the behaviour. The model answers the held-out prompts itself (greedy by default,
  or seeded sampling); each (prompt, own response) gets the concept score
  `f_v = mean over response tokens of h_l . v/|v|` at the concept layer, and the measure is the
  mean over prompts (prompts whose response came out empty are left out and counted).
- `task_loss`: teacher-forced loss per answer token on held-out in-domain answers
  (`evaluate.loss.heldout_loss`), so that a removal which merely breaks the model shows.

Whose activations `h_l` are (`activations`): by default the **base model's**, reading the
retrained model's text. The concept `v` is a direction of the base model's residual stream,
fitted there; a LoRA moves that stream, and its projection on `v` can shift with no change in
what the model says (an offset along `v` moves every score, a rotation makes `v` mean something
else). With one fixed reader the only difference between runs is the text each model produces,
so the score measures behaviour, as behaviour evaluations do (emergent misalignment is judged on
the generated answers), and it sits on the same scale as the Vector Filter scores of the pool.
`activations: retrained` reads each retrained model's own stream instead (a "finetuning shift"
reading), for a concept one expects to carry over to the fine-tuned model.

Every run trains with the same `train` settings and seed, so runs differ only in their data.
With `train.max_steps` = 0 the step count follows `train.epochs`: equal for the top and random
removals of one fraction (same size), more for the full-pool baseline.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice, check_positive
from mechsieve.data.readers import DataConfig
from mechsieve.data.records import Example, Pool
from mechsieve.data.render import RenderConfig
from mechsieve.evaluate.attribution import RemovalResult
from mechsieve.models.loading import LoadedModel
from mechsieve.train.config import TrainConfig


@dataclass
class RemovalConfig:
    """Settings of the removal experiment (`mechsieve attribute --remove-top F --retrain`)."""

    prompts: DataConfig = field(default_factory=DataConfig)
    """Held-out prompts (a data file; only the prompts are used): each retrained model answers them,
    and the concept score of its answers is the behaviour (CLI: --heldout-prompts)."""
    answers: DataConfig = field(default_factory=DataConfig)
    """Held-out in-domain examples (prompt + answer): the task loss per answer token of each
    retrained model (CLI: --heldout-answers)."""
    random_repeats: int = 3
    """Random removals of the same size per fraction (the control; CLI: --random-repeats)."""
    baseline: bool = False
    """Also retrain on the whole pool (CLI: --full-baseline)."""
    generation: Literal["greedy", "sample"] = "greedy"
    """How a retrained model answers the held-out prompts: greedy, or seeded sampling."""
    temperature: float = 1.0
    """Sampling temperature (generation=sample)."""
    max_new_tokens: int = 64
    """Longest answer generated per held-out prompt."""
    activations: Literal["base", "retrained"] = "base"
    """Whose residual stream reads the concept score of the answers: the base model's (default; the
    text is all that differs between runs) or the retrained model's own."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """How the pool is rendered for retraining, and the held-out examples for loss and generation."""
    max_tokens: int = 4096
    """Token budget of one batch when generating and when computing the held-out loss."""

    def __post_init__(self) -> None:
        check_positive("removal.random_repeats", self.random_repeats)
        check_choice("removal.generation", self.generation, ("greedy", "sample"))
        check_choice("removal.activations", self.activations, ("base", "retrained"))
        check_positive("removal.max_new_tokens", self.max_new_tokens)
        check_positive("removal.max_tokens", self.max_tokens)
        if self.generation == "sample" and self.temperature <= 0:
            raise ConfigError(f"removal.temperature={self.temperature} must be > 0 with generation=sample "
                              "(or use generation=greedy)")

    def check_data(self) -> None:
        """Both held-out files are given (checked before a model is loaded)."""
        missing = [flag for flag, data in (("--heldout-prompts (removal.prompts.path)", self.prompts),
                                           ("--heldout-answers (removal.answers.path)", self.answers))
                   if not data.path]
        if missing:
            raise ConfigError(f"--retrain measures every retrained model on held-out data; give {' and '.join(missing)}: "
                              "prompts whose answers show the behaviour, and in-domain examples for the task loss")


@dataclass
class Measurement:
    """What one retrained model gave on the held-out data."""

    concept: float
    """Mean concept score of its own answers to the held-out prompts (NaN: every answer empty)."""
    task_loss: float
    """Held-out loss per answer token."""
    empty: int = 0
    """Held-out prompts it answered with nothing (left out of `concept`)."""
    responses: list[str] = field(default_factory=list)

    def measures(self) -> dict[str, float]:
        return {"concept": self.concept, "task_loss": self.task_loss}


def answer_prompts(loaded: LoadedModel, prompts: Sequence[Example], cfg: RemovalConfig, seed: int = 0,
                   progress: bool = True) -> list[str]:
    """The model's own answer to each prompt: greedy (`generate_greedy`) or seeded sampling
    (`scorers.concept.sample_responses`, the sampler of projection-diff)."""
    if cfg.generation == "greedy":
        from mechsieve.evaluate.generate import generate_greedy

        return generate_greedy(loaded.model, loaded.tokenizer, list(prompts), cfg.render, cfg.max_new_tokens,
                               cfg.max_tokens, progress=progress)
    from mechsieve.scorers.concept import sample_responses

    return sample_responses(loaded, list(prompts), cfg.max_new_tokens, cfg.temperature, seed,
                            max_len=cfg.render.max_len, progress=progress)


def concept_of_answers(reader: LoadedModel, concept: Any, prompts: Sequence[Example], answers: Sequence[str],
                       src: Any, progress: bool = True) -> tuple[float, int]:
    """Mean f_v over the non-empty (prompt, answer) pairs, activations read by `reader` at the
    concept's layer and rendered as `src` (the ConceptSource the concept was fitted under)
    -> (mean, number of empty answers left out); NaN when every answer is empty."""
    from mechsieve.scorers.concept import mean_response_acts

    pairs = [Example(p.id, p.source, p.prompt, a, dict(p.meta)) for p, a in zip(prompts, answers) if a.strip()]
    empty = len(prompts) - len(pairs)
    if not pairs:
        return float("nan"), empty
    acts, _ = mean_response_acts(reader, pairs, int(concept.layer), src, progress=progress)
    return float(np.mean(concept.score(acts))), empty


def measure_model(model: LoadedModel, base: LoadedModel, concept: Any, prompts: Sequence[Example],
                  answers: Sequence[Example], cfg: RemovalConfig, src: Any, seed: int = 0,
                  progress: bool = True) -> Measurement:
    """Both measures of one (retrained) `model`; `base` reads the concept unless
    cfg.activations=retrained."""
    from mechsieve.evaluate.loss import heldout_loss

    own = answer_prompts(model, prompts, cfg, seed, progress)
    reader = base if cfg.activations == "base" else model
    score, empty = concept_of_answers(reader, concept, prompts, own, src, progress)
    loss = heldout_loss(model.model, model.tokenizer, list(answers), cfg.render, cfg.max_tokens, progress=progress)
    return Measurement(score, float(loss["loss_per_token"]), empty, own)


def fresh_copy(base: LoadedModel) -> LoadedModel:
    """A copy of the base model to train (the base stays untouched: the next run and the
    concept reader need it as it was)."""
    if hasattr(base.model, "peft_config"):
        raise RuntimeError("the base model carries a peft adapter (a scorer wrapped it in place); the removal "
                           "experiment retrains from the plain base model")
    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.identity, base.config)


@dataclass
class RemovalRun:
    """The experiment's result with the per-run details the table and removal.json show."""

    result: RemovalResult
    empty_answers: list[int]
    """Per run, in run order: held-out prompts answered with nothing."""
    train_steps: list[int]
    """Per run, in run order: optimizer steps trained."""

    def summary(self) -> dict[str, Any]:
        return {**self.result.summary(), "empty_answers": self.empty_answers, "train_steps": self.train_steps}


def run_removal(base: LoadedModel, pool: Pool, scores: np.ndarray, concept: Any, src: Any, fractions: Sequence[float],
                cfg: RemovalConfig, train_cfg: TrainConfig, prompts: Pool, answers: Pool, seed: int = 0,
                labels: np.ndarray | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> RemovalRun:
    """Retrain from `base` without the top / random fractions of `pool` (ranked by `scores`),
    measure each model (see the module docstring) and return the runs. `seed` draws the random
    removals and seeds sampling; `train_cfg.seed` seeds every retrain alike."""
    from mechsieve.train import items_from_examples, train

    items = dict(zip((ex.id for ex in pool.examples), items_from_examples(pool.examples, base.tokenizer, cfg.render)))
    empty: list[int] = []
    steps: list[int] = []

    def retrain(kept: list[str]) -> LoadedModel:
        model = fresh_copy(base)
        res = train(model, [items[i] for i in kept], train_cfg, out_dir=None, progress=progress)
        steps.append(res.steps)
        return model

    def measure(model: LoadedModel) -> dict[str, float]:
        m = measure_model(model, base, concept, prompts.examples, answers.examples, cfg, src, seed, progress)
        empty.append(m.empty)
        if m.empty:
            log(f"  {m.empty} of {len(prompts)} held-out prompts got an empty answer (left out of the concept score)")
        return m.measures()

    from mechsieve.evaluate.attribution import removal_experiment

    result = removal_experiment([ex.id for ex in pool.examples], scores, fractions, retrain, measure,
                                random_repeats=cfg.random_repeats, seed=seed, labels=labels,
                                with_baseline=cfg.baseline, primary="concept", log=log)
    return RemovalRun(result, empty, steps)


def _fmt(value: float | None, spread: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")


def removal_table(summary: dict[str, Any]) -> str:
    """The printed table of a removal summary: fraction | top concept score | random mean ± std |
    top task loss | random task loss (mean ± std), with the full-pool row when it was run."""
    head = ["fraction", "top concept", "random concept", "top task loss", "random task loss"]
    rows = []
    if summary.get("full_data") is not None:
        rows.append(["full pool", _fmt(summary["full_data"]), "", _fmt(summary.get("task_loss_full_data")), ""])
    for i, f in enumerate(summary["fractions"]):
        at = {key: (summary.get(key) or [None] * (i + 1))[i] for key in (
            "concept_after_top_removal", "concept_after_random_removal", "concept_random_std",
            "task_loss_after_top_removal", "task_loss_after_random_removal", "task_loss_random_std")}
        rows.append([f"{f:g}", _fmt(at["concept_after_top_removal"]),
                     _fmt(at["concept_after_random_removal"], at["concept_random_std"]),
                     _fmt(at["task_loss_after_top_removal"]),
                     _fmt(at["task_loss_after_random_removal"], at["task_loss_random_std"])])
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    lines = [" | ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
