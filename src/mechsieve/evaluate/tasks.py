"""Tasks: a data set read through `read_pool` and one metric family applied to a model.

- `loss`: held-out NLL of the reference responses (per token and per example);
- `exact_match`: greedy generation, final answer vs the reference's: numeric (GSM8K `####`,
  answers.py) or, with `answer: math`, LaTeX / boxed / fractions through math-verify
  (math_answers.py);
- `multiple_choice`: option log-likelihood (MedQA, MedMCQA, PubMedQA layouts, see choice.py);
- `rouge`: greedy generation vs reference summary, ROUGE-L;
- `chrf`: greedy generation vs reference translation, chrF.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from mechsieve.config import ConfigError, check_choice, check_positive
from mechsieve.data.readers import DataConfig, DataError, read_pool
from mechsieve.data.render import RenderConfig
from mechsieve.models.loading import LoadedModel

TASKS = ("loss", "exact_match", "multiple_choice", "rouge", "chrf")
PRIMARY = {"loss": "loss_per_token", "exact_match": "accuracy", "multiple_choice": "accuracy",
           "rouge": "rougeL_f1", "chrf": "chrf"}
LOWER_IS_BETTER = {"loss_per_token", "loss_per_example"}


@dataclass
class TaskConfig:
    """One evaluation: which data, which metric."""

    task: Literal["loss", "exact_match", "multiple_choice", "rouge", "chrf"] = "loss"
    """Metric family (see the module docstring)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The evaluation set, read like any pool (path, format, field_map, limit)."""
    name: str = ""
    """Label in tables and file names; default: `<source>-<task>`."""
    max_new_tokens: int = 256
    """Generation tasks: longest answer generated."""
    max_tokens: int = 4096
    """Token budget of one batch (generation: prompt + max_new_tokens per row)."""
    choice_target: Literal["letter_text", "letter", "text"] = "letter_text"
    """multiple_choice: what each candidate answer is: `B. text`, `B`, or the option text."""
    answer: Literal["gsm8k", "math"] = "gsm8k"
    """exact_match: how final answers are read and compared. `gsm8k`: the number after the last
    `####`, else the last number, compared as numbers (`\\frac{3}{4}` reads as 4). `math`: a
    `\\boxed{}` answer, else the last LaTeX or plain expression, through math-verify (the `math`
    extra): `\\boxed{\\frac{3}{4}}` and `x = 3/4` read as 3/4, `1e3` as 1000, and answers are
    compared as math (0.75 == 3/4)."""

    def __post_init__(self) -> None:
        check_choice("eval.task", self.task, TASKS)
        check_choice("eval.choice_target", self.choice_target, ("letter_text", "letter", "text"))
        check_choice("eval.answer", self.answer, ("gsm8k", "math"))
        if self.answer == "math" and self.task == "exact_match":
            from mechsieve.evaluate.math_answers import require_math_verify

            require_math_verify()  # a missing extra fails here, before any model is loaded
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.max_tokens", self.max_tokens)
        if not self.data.path:
            raise ConfigError(f"eval.data.path is empty for task {self.task!r}; give the evaluation set")

    def label(self) -> str:
        if self.name:
            return self.name
        from mechsieve.data.readers import default_source

        return f"{default_source(self.data.path).replace('/', '_')}-{self.task}"

    @property
    def primary(self) -> str:
        return PRIMARY[self.task]


def evaluate_task(loaded: LoadedModel, task: TaskConfig, render_cfg: RenderConfig | None = None,
                  progress: bool = True, keep_outputs: bool = False) -> dict[str, Any]:
    """Run one task on `loaded.model`; returns {task, name, data, metrics, seconds[, outputs]}."""
    from mechsieve.evaluate.answers import exact_match, extract_answer
    from mechsieve.evaluate.choice import choice_accuracy
    from mechsieve.evaluate.generate import generate_greedy
    from mechsieve.evaluate.loss import heldout_loss
    from mechsieve.evaluate.text_metrics import chrf, rouge_l

    pool = read_pool(task.data)
    examples = pool.examples
    model, tok = loaded.model, loaded.tokenizer
    start = time.perf_counter()
    outputs: dict[str, Any] = {}
    if task.task == "loss":
        metrics = heldout_loss(model, tok, examples, render_cfg, task.max_tokens, progress)
    elif task.task == "multiple_choice":
        try:
            res = choice_accuracy(model, tok, examples, render_cfg, task.choice_target, task.max_tokens, progress)
        except DataError as err:
            raise DataError(f"{pool.path}: {err}") from err
        metrics = {k: res[k] for k in ("accuracy", "accuracy_norm", "chance", "examples")}
        outputs = {"predictions": res["predictions"], "gold": res["gold"], "scores": res["scores"]}
    else:
        generated = generate_greedy(model, tok, examples, render_cfg, task.max_new_tokens, task.max_tokens,
                                    progress=progress)
        refs = [ex.response for ex in examples]
        if task.task == "exact_match":
            if task.answer == "math":
                from mechsieve.evaluate.math_answers import extract_math_answer as extract_answer
                from mechsieve.evaluate.math_answers import math_match as exact_match
            hits = [exact_match(g, r) for g, r in zip(generated, refs)]
            extracted = [extract_answer(g) for g in generated]
            metrics = {"accuracy": sum(hits) / len(hits), "examples": len(hits),
                       "no_answer": sum(e is None for e in extracted)}
            outputs = {"extracted": extracted, "gold": [extract_answer(r) for r in refs]}
        elif task.task == "rouge":
            metrics = rouge_l(generated, refs)
        else:
            metrics = chrf(generated, refs)
        outputs["generated"] = generated
    result = {"task": task.task, "name": task.label(), "data": pool.path, "fingerprint": pool.fingerprint(),
              "metrics": metrics, "seconds": round(time.perf_counter() - start, 3)}
    if task.task == "exact_match":
        result["answer"] = task.answer
    if keep_outputs:
        result["outputs"] = {"ids": [ex.id for ex in examples], **outputs}
    return result
