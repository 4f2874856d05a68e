"""The experiment loop: for each seed and method, select -> train (equal steps) -> evaluate.

Every step is a cache entry of `mechsieve.store.Cache`, keyed by (model identity, data
fingerprint, settings): a selection by the pool and the method's settings, a training run by the
selected ids and the training settings, an evaluation by the training entry, the task and the
fingerprint of the task's data (so an edited evaluation file is evaluated again). A
rerun loads finished entries instead of recomputing them; two methods that select the same ids
share one training run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mechsieve.config import to_dict
from mechsieve.data.readers import read_pool
from mechsieve.data.records import Pool
from mechsieve.evaluate.tasks import evaluate_task
from mechsieve.experiment.config import ExperimentConfig
from mechsieve.experiment.report import write_results
from mechsieve.models.loading import LoadedModel
from mechsieve.store import Cache, save_artefact
from mechsieve.train.items import TrainItem, items_from_examples


@dataclass
class ExperimentResult:
    rows: list[dict[str, Any]]
    steps: int
    steps_from: str
    cache_hits: dict[str, int]
    outputs: dict[str, Path]


def equal_steps(cfg: ExperimentConfig, lengths: list[int]) -> tuple[int, str]:
    """Optimizer steps every method trains for, and where that number comes from."""
    from mechsieve.capture.batching import plan_batches
    from mechsieve.select.budget import parse_budget

    if cfg.steps:
        return cfg.steps, "steps"
    if cfg.train.max_steps:
        return cfg.train.max_steps, "train.max_steps"
    budget = parse_budget(cfg.budget)
    if budget.kind == "threshold":
        raise ValueError("a threshold budget selects an unknown number of examples; set `steps` explicitly")
    n_budget = budget.size(len(lengths))
    per_example = len(plan_batches(lengths, cfg.train.max_tokens, cfg.train.max_batch).batches) / len(lengths)
    steps = max(1, math.ceil(cfg.train.epochs * n_budget * per_example / cfg.train.grad_accum))
    return steps, (f"train.epochs={cfg.train.epochs:g} over {n_budget} examples "
                   f"({per_example:.3f} micro-batches per example, grad_accum={cfg.train.grad_accum})")


def _digest(values: list[str]) -> str:
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


def _numeric(metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray([float(v)], dtype=np.float64) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class _Run:
    """What every step of one experiment reads: its settings, the cache, the data and the base
    model; and what the steps record as they go (cache hits, the evaluation data's fingerprints)."""

    cfg: ExperimentConfig
    cache: Cache
    pool: Pool
    target: Pool | None
    items: list[TrainItem]
    """The pool rendered for training, aligned with pool.examples."""
    base: LoadedModel
    progress: bool
    log: Callable[[str], None]
    render: dict[str, Any] = field(init=False)
    """cfg.render as a dict: part of the training and evaluation cache keys."""
    pool_fp: str = field(init=False)
    target_fp: str | None = field(init=False)
    hits: dict[str, int] = field(default_factory=lambda: {"selection": 0, "train": 0, "eval": 0})
    made: set[tuple[str, int]] = field(default_factory=set)
    """(method, seed) of the selections made by this run (not cache hits)."""
    task_fps: dict[str, str] = field(default_factory=dict)
    """Fingerprint of each evaluation set, by task label."""
    data_fps: dict[str, str] = field(default_factory=dict)
    """Fingerprint of each task's data as read now (part of its evaluation cache key), by label."""

    def __post_init__(self) -> None:
        self.render = to_dict(self.cfg.render)
        self.pool_fp = self.pool.fingerprint()
        self.target_fp = self.target.fingerprint() if self.target is not None else None

    @property
    def identity(self) -> dict[str, Any]:
        return self.base.identity


class _Trained(NamedTuple):
    """One training entry: its result, its key, and the model when it was trained just now."""

    result: dict[str, Any]
    """steps, tokens, seconds, final_loss, first_loss."""
    key: str
    """The entry's folder name, which its evaluations are keyed by."""
    adapter: Path
    model: LoadedModel | None
    """The model just trained; None when the entry came from the cache (its adapter is loaded
    when an evaluation needs it)."""


def run_experiment(cfg: ExperimentConfig, progress: bool = True, log: Callable[[str], None] = print
                   ) -> ExperimentResult:
    """Run (or resume) the whole experiment; writes results.json / .csv / .png under cfg.out."""
    from mechsieve.store.outputs import OutputFolder

    # a rerun resumes from the cache in its own folder; a folder of other files is refused
    folder = OutputFolder(cfg.out, "experiment", resumes=True, flag="out")
    pool = read_pool(cfg.pool)
    target = read_pool(cfg.target) if cfg.target.path else None
    # imported here, not at module level, so the loader is looked up when the run starts
    from mechsieve.models.loading import load_model

    base = load_model(cfg.model)
    items = items_from_examples(pool.examples, base.tokenizer, cfg.render)
    folder.claim([*([] if cfg.cache else ["cache"]), "results.json", "results.csv", "table.txt", "results.png"])
    run = _Run(cfg, Cache(cfg.cache or Path(cfg.out) / "cache"), pool, target, items, base, progress, log)
    steps, steps_from = equal_steps(cfg, [len(it) for it in items])
    log(f"pool: {len(pool)} examples from {pool.path}; budget {cfg.budget}; seeds {cfg.seeds}; "
        f"methods {cfg.methods}")
    log(f"training budget: every run trains for {steps} optimizer steps "
        f"(max_tokens={cfg.train.max_tokens} per micro-batch, grad_accum={cfg.train.grad_accum}; from {steps_from})")
    rows = [_base_row(run)] if cfg.eval_base else []
    for seed in cfg.seeds:
        _select_missing(run, seed)  # the seed's selections not cached yet, from one shared pass
        for method in cfg.methods:
            rows.append(_method_row(run, method, seed, steps))
    summary_extra = {"steps": steps, "steps_from": steps_from, "cache_hits": run.hits,
                     "pool": {"path": pool.path, "examples": len(pool), "fingerprint": run.pool_fp},
                     "eval_data": run.task_fps, "model": run.identity}
    outputs = write_results(cfg, rows, summary_extra)
    folder.finish()
    return ExperimentResult(rows, steps, steps_from, run.hits, outputs)


def _base_row(run: _Run) -> dict[str, Any]:
    """The untrained model's row: evaluated only."""
    metrics, secs = _evaluate_all(run, "base", lambda: run.base)
    run.log("base: " + _brief(metrics, run.cfg))
    return {"method": "base", "seed": None, "selected": 0, "steps": 0, "train_tokens": 0,
            "train_seconds": 0.0, "select_seconds": 0.0, "eval_seconds": round(secs, 3),
            "final_train_loss": None, **metrics}


def _method_row(run: _Run, method: str, seed: int, steps: int) -> dict[str, Any]:
    """One method under one seed: select, train for `steps`, evaluate."""
    selected, select_seconds = _select_cached(run, method, seed)
    chosen = [i for i in range(len(run.pool.examples)) if selected[i]]
    trained = _train_cached(run, method, chosen, seed, steps)
    metrics, secs = _evaluate_all(run, trained.key, partial(_trained_model, run, trained))
    tr = trained.result
    run.log(f"[seed {seed}] {method}: {len(chosen)} selected; " + _brief(metrics, run.cfg))
    return {"method": method, "seed": seed, "selected": len(chosen), "steps": tr["steps"],
            "train_tokens": tr["tokens"], "train_seconds": tr["seconds"],
            "select_seconds": round(select_seconds, 3), "eval_seconds": round(secs, 3),
            "final_train_loss": tr["final_loss"], **metrics}


def _selection_entry(run: _Run, method: str, seed: int) -> Any:
    cfg = run.cfg
    return run.cache.entry("selection", run.identity, run.pool_fp,
                           {"method": method, "budget": cfg.budget, "seed": seed,
                            "method_settings": cfg.method_settings.get(method), "target": run.target_fp},
                           name="selection")


def _select_missing(run: _Run, seed: int) -> None:
    """Make and cache every selection of `seed` that the cache lacks, in one `select_many`: the
    forward-only methods read the pool in one shared pass, their features kept in the experiment's
    cache (so the next seed, whose directions and features are the same, runs no pool pass)."""
    from mechsieve.select.pipeline import select_many
    from mechsieve.store.features import FeatureCache

    missing = [m for m in run.cfg.methods if not _selection_entry(run, m, seed).exists()]
    if not missing:
        return
    settings = {m: run.cfg.method_settings.get(m) for m in missing}
    selections, _ = select_many(settings, run.pool, run.cfg.budget, target=run.target, loaded=run.base, seed=seed,
                                cache=FeatureCache(run.cache.root), progress=run.progress)
    for method, sel in selections.items():
        entry = _selection_entry(run, method, seed)
        run.made.add((method, seed))
        seconds = float(sel.timings.get("score_total", 0.0)) + float(sel.timings.get("select", 0.0))
        save_artefact(entry.folder, entry.name,
                      {"scores": np.asarray(sel.scores, np.float64), "ranks": np.asarray(sel.ranks, np.int64),
                       "selected": np.asarray(sel.selected, dtype=bool).astype(np.uint8)}, entry.key,
                      extra={"ids": sel.ids, "seconds": seconds, "timings": sel.timings,
                             "settings_recorded": sel.settings})


def _select_cached(run: _Run, method: str, seed: int) -> tuple[np.ndarray, float]:
    """The selection of `method` under `seed` (cached by pool, method settings, budget and target)
    -> (selected: [n] bool, seconds the selection took when it was made)."""
    entry = _selection_entry(run, method, seed)
    if not entry.exists():
        _select_missing(run, seed)
    elif (method, seed) not in run.made:
        run.hits["selection"] += 1
    tensors, meta = entry.load()
    return tensors["selected"].astype(bool), float(meta["seconds"])


def _train_cached(run: _Run, method: str, chosen: list[int], seed: int, steps: int) -> _Trained:
    """A LoRA run on the pool examples `chosen` for `steps` optimizer steps (cached by the chosen
    ids and the training settings, so two methods that choose the same ids share it)."""
    # looked up at call time: a test replaces it to prove that a rerun never trains
    from mechsieve.train import train

    train_cfg = dataclasses.replace(run.cfg.train, seed=seed, max_steps=steps)
    ids = [run.pool.examples[i].id for i in chosen]
    entry = run.cache.entry("train", run.identity, _digest([run.pool_fp, *ids]),
                            {"train": to_dict(train_cfg), "render": run.render}, name="train")
    adapter = entry.folder / "adapter"
    if entry.exists():
        _, meta = entry.load()
        run.hits["train"] += 1
        return _Trained(meta["result"], entry.folder.name, adapter, None)
    loaded = _fresh_model(run)
    run.log(f"[seed {seed}] {method}: training on {len(chosen)} examples for {steps} steps")
    res = train(loaded, [run.items[i] for i in chosen], train_cfg, out_dir=adapter, progress=run.progress)
    result = {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 3),
              "final_loss": res.loss_curve[-1], "first_loss": res.loss_curve[0]}
    save_artefact(entry.folder, entry.name, {"loss_curve": np.asarray(res.loss_curve, np.float64)}, entry.key,
                  extra={"result": result})
    return _Trained(result, entry.folder.name, adapter, loaded)


def _evaluate_all(run: _Run, train_key: str, model_of: Callable[[], LoadedModel]
                  ) -> tuple[dict[str, float], float]:
    """Every task of cfg.eval on the model of `train_key` (cached per task) -> ({label/metric:
    value}, evaluation seconds). `model_of` is called only if some task is not cached."""
    metrics: dict[str, float] = {}
    seconds = 0.0
    loaded = None
    for task in run.cfg.eval:
        entry = run.cache.entry("eval", run.identity, train_key,
                                {"task": to_dict(task), "render": run.render, "data": _data_fingerprint(run, task)},
                                name="metrics")
        if entry.exists():
            _, meta = entry.load()
            result = meta["result"]
            run.hits["eval"] += 1
        else:
            loaded = loaded or model_of()
            result = evaluate_task(loaded, task, run.cfg.render, progress=run.progress)
            save_artefact(entry.folder, entry.name, _numeric(result["metrics"]), entry.key,
                          extra={"result": result})
        run.task_fps[task.label()] = result["fingerprint"]
        seconds += result["seconds"]
        for key, value in result["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task.label()}/{key}"] = float(value)
    return metrics, seconds


def _data_fingerprint(run: _Run, task: Any) -> str:
    """The fingerprint of the task's data, read once per experiment."""
    label = task.label()
    if label not in run.data_fps:
        run.data_fps[label] = read_pool(task.data).fingerprint()
    return run.data_fps[label]


def _fresh_model(run: _Run) -> LoadedModel:
    """A copy of the base model to train (the base itself stays untouched for the next run)."""
    base = run.base
    if hasattr(base.model, "peft_config"):
        raise RuntimeError("the base model was wrapped in place by a selection method; it cannot be reused")
    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.identity, base.config)


def _trained_model(run: _Run, trained: _Trained) -> LoadedModel:
    """The model of a training entry: the one just trained, else its adapter on a fresh base copy."""
    from mechsieve.train import load_adapter

    if trained.model is not None:
        return trained.model
    return load_adapter(_fresh_model(run), trained.adapter)


def _brief(metrics: dict[str, float], cfg: ExperimentConfig) -> str:
    parts = []
    for task in cfg.eval:
        key = f"{task.label()}/{task.primary}"
        if key in metrics:
            parts.append(f"{key}={metrics[key]:.4f}")
    return ", ".join(parts) or json.dumps(metrics)
