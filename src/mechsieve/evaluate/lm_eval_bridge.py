"""lm-evaluation-harness tasks on the model mechsieve loaded (base, or base + adapter).

lm-eval (EleutherAI/lm-evaluation-harness, the `eval` extra) is imported here only, when a run
asks for it. What differs from `lm_eval --model hf --model_args pretrained=...,peft=...`:
- the model and tokenizer are the objects `load_model` (and `load_adapter`) made, handed to
  lm-eval's `HFLM` as they are, so a local folder or the converted embedded default needs no hub,
  and the numbers are those of exactly the weights the other mechsieve metrics saw; lm-eval's
  own loading settings (dtype, device, parallelize, peft) do not apply, mechsieve's do;
- one process: HFLM does not shard a pre-loaded model over accelerate's processes;
- the random states lm-eval seeds (python, numpy, torch) are put back afterwards, so a run
  changes nothing for the caller but its own files;
- when `include` holds every task asked for, lm-eval's ~14k built-in task files are not indexed
  (tens of seconds), only the folder; any other name indexes both, as `--include_path` does.
The results dict is lm-eval's own (`results`, `n-shot`, `configs`, `versions`, ...), made
JSON-able as lm-eval's CLI writes it, with a `mechsieve` entry naming the model and adapter.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechsieve.config import ConfigError, check_positive, did_you_mean
from mechsieve.models.loading import LoadedModel

INSTALL = "pip install 'mechsieve[eval]' (or: pip install lm-eval==0.4.13)"
# HFLM warns about a pre-loaded model on every construction; that is how this bridge works.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")
_NOT_METRICS = {"alias", "name", "sample_len"}


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks to run (section `lm_eval` of `mechsieve evaluate`)."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task, group or tag names (`arc_easy`, `hellaswag`, glob patterns like `mmlu_*`, names
    of tasks in `include`) or paths of task YAML files; empty: no lm-eval run."""
    include: str = ""
    """A folder of local task YAMLs whose tasks `tasks` may name (lm-eval's --include_path)."""
    limit: int = 0
    """Documents per task (the first ones, as lm-eval's --limit); 0: all. For quick checks only:
    lm-eval warns that limited scores are not comparable."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None: each task's own default (0 when it sets none)."""
    batch_size: int = 8
    """Requests per forward pass."""
    apply_chat_template: bool = False
    """Render prompts through the tokenizer's chat template (few-shot examples as turns)."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for the standard errors of non-mean metrics (lm-eval's default); 0: none."""
    log_samples: bool = False
    """Also write each document's requests, responses and per-document metrics to
    lm_eval_samples.jsonl."""

    def __post_init__(self) -> None:
        check_positive("lm_eval.limit", self.limit, allow_zero=True)
        check_positive("lm_eval.batch_size", self.batch_size)
        check_positive("lm_eval.bootstrap_iters", self.bootstrap_iters, allow_zero=True)
        if self.num_fewshot is not None:
            check_positive("lm_eval.num_fewshot", self.num_fewshot, allow_zero=True)
        if self.include and not Path(self.include).expanduser().is_dir():
            raise ConfigError(f"lm_eval.include={self.include!r} is not a folder; give the folder that holds "
                              "the task YAML files (--lm-eval-include)")
        if self.tasks:
            require_lm_eval()  # a missing extra fails here, before any model is loaded


def require_lm_eval() -> Any:
    """The `lm_eval` module, or a ConfigError with the install command."""
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(f"--lm-eval runs lm-evaluation-harness, which is not installed: {INSTALL}") from err
    return lm_eval


def task_manager(cfg: LmEvalConfig) -> tuple[Any, list[str]]:
    """lm-eval's TaskManager for `cfg` and the task names it will load (patterns expanded).

    Unknown names are a ConfigError listing the closest known one."""
    from lm_eval.tasks import TaskManager

    include = str(Path(cfg.include).expanduser().resolve()) if cfg.include else None
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks or Path(t).is_file() for t in cfg.tasks):
            return local, list(cfg.tasks)
    manager = TaskManager(include_path=include)
    names: list[str] = []
    for task in cfg.tasks:
        if task in manager.all_tasks or Path(task).is_file():
            names.append(task)
            continue
        matched = manager.match_tasks([task])
        if not matched:
            where = f" or in {include}" if include else " (local YAMLs: --lm-eval-include FOLDER)"
            raise ConfigError(f"lm_eval.tasks: {task!r} is no lm-eval task, group or tag, built in{where}"
                              f"{did_you_mean(task, manager.all_tasks)}")
        names.extend(m for m in matched if m not in names)
    return manager, names


@contextmanager
def _quiet_expected_warnings() -> Iterator[None]:
    """Drop HFLM's warnings about a pre-loaded model (expected here); other records pass."""
    log = logging.getLogger("lm_eval.models.huggingface")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_EXPECTED_WARNINGS)

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def make_lm(loaded: LoadedModel, cfg: LmEvalConfig, progress: bool = True) -> Any:
    """lm-eval's HFLM around `loaded.model` (a transformers model, or a peft model over one) and
    `loaded.tokenizer`, without loading anything again."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    with _quiet_expected_warnings():
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", batch_size=cfg.batch_size)
    if not progress:  # evaluate() calls these without disable_tqdm; an instance attribute wins
        for request in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, request, functools.partial(getattr(lm, request), disable_tqdm=True))
    return lm


def jsonable(data: Any) -> Any:
    """`data` as lm-eval's CLI writes it (numpy scalars as numbers, dtypes and others as strings)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(data, default=handle_non_serializable))


@dataclass
class LmEvalRun:
    """One lm-eval run: its results dict (JSON-able) and, with log_samples, the per-document logs."""

    results: dict[str, Any]
    """lm-eval's results dict (`results`, `groups`, `n-shot`, `n-samples`, `configs`, ...)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """One JSON-able record per document, with its `task` (empty unless cfg.log_samples)."""


def run_lm_eval(loaded: LoadedModel, cfg: LmEvalConfig, progress: bool = True, adapter: str = "",
                tasks: tuple[Any, list[str]] | None = None) -> LmEvalRun:
    """Run `cfg.tasks` through lm-eval's `simple_evaluate` on `loaded` (with its adapter applied
    already, if any; `adapter` only names it in the results). `tasks`: `task_manager(cfg)`'s
    answer when the caller checked the names already (before loading the model)."""
    lm_eval = require_lm_eval()
    if not cfg.tasks:
        raise ConfigError("lm_eval.tasks is empty; name lm-eval tasks (--lm-eval arc_easy,piqa)")
    manager, names = tasks or task_manager(cfg)
    lm = make_lm(loaded, cfg, progress)
    from mechsieve.progress import progress_bars_off

    with progress_bars_off("datasets") if not progress else nullcontext(), _random_states_kept():
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=cfg.num_fewshot, limit=cfg.limit or None,
            batch_size=cfg.batch_size, bootstrap_iters=cfg.bootstrap_iters, log_samples=cfg.log_samples,
            apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=cfg.apply_chat_template,
            task_manager=manager)
    samples_by_task = raw.pop("samples", None) or {}
    results = jsonable(raw)
    results["mechsieve"] = {"model": loaded.identity, "adapter": str(Path(adapter).resolve()) if adapter else None,
                            "tasks": names, "include": cfg.include or None}
    samples = [{"task": task, **s} for task, rows in jsonable(samples_by_task).items() for s in rows]
    return LmEvalRun(results, samples)


@contextmanager
def _random_states_kept() -> Iterator[None]:
    """simple_evaluate seeds python's, numpy's and torch's global generators; put them back."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per task and group of lm-eval's results dict: its metrics (`acc=0.5000 ± 0.2887`;
    a filter other than `none` is shown as `metric/filter`), documents and shots."""
    lines = []
    entries = {**results.get("results", {}), **results.get("groups", {})}
    for name, metrics in entries.items():
        shown = []
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key in _NOT_METRICS or "_stderr" in metric or not filt:
                continue
            label = metric if filt == "none" else f"{metric}/{filt}"
            text = f"{label}={value:.4f}" if isinstance(value, (int, float)) else f"{label}={value}"
            err = metrics.get(f"{metric}_stderr,{filt}")
            if isinstance(err, (int, float)):
                text += f" ± {err:.4f}"
            shown.append(text)
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        shots = results.get("n-shot", {}).get(name)
        extra = ", ".join(x for x in (f"{n} docs" if n is not None else "",
                                      f"{shots}-shot" if shots is not None else "") if x)
        lines.append(f"lm-eval {name}: {', '.join(shown) or 'no metrics'}" + (f"  [{extra}]" if extra else ""))
    return lines
