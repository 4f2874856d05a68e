"""The experiment loop: for each seed and method, select -> train (equal steps) -> evaluate.

Every step is a cache entry of `mechsieve.store.Cache`, keyed by (model identity, data
fingerprint, settings): a selection by the pool and the method's settings, a training run by the
selected ids and the training settings, an evaluation by the training entry and the task. A
rerun loads finished entries instead of recomputing them; two methods that select the same ids
share one training run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.config import to_dict
from mechsieve.experiment.config import ExperimentConfig
from mechsieve.store import Cache, CacheEntry, save_artefact


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


def run_experiment(cfg: ExperimentConfig, progress: bool = True, log: Callable[[str], None] = print
                   ) -> ExperimentResult:
    """Run (or resume) the whole experiment; writes results.json / .csv / .png under cfg.out."""
    from mechsieve.data.readers import read_pool
    from mechsieve.evaluate.tasks import evaluate_task
    from mechsieve.experiment.report import write_results
    from mechsieve.models.loading import LoadedModel, load_model
    from mechsieve.select.pipeline import select_examples
    from mechsieve.train import TrainResult, items_from_examples, load_adapter, train

    out = Path(cfg.out)
    cache = Cache(cfg.cache or out / "cache")
    pool = read_pool(cfg.pool)
    target = read_pool(cfg.target) if cfg.target.path else None
    base = load_model(cfg.model)
    identity = base.identity
    render = to_dict(cfg.render)
    items = items_from_examples(pool.examples, base.tokenizer, cfg.render)
    steps, steps_from = equal_steps(cfg, [len(it) for it in items])
    log(f"pool: {len(pool)} examples from {pool.path}; budget {cfg.budget}; seeds {cfg.seeds}; "
        f"methods {cfg.methods}")
    log(f"training budget: every run trains for {steps} optimizer steps "
        f"(max_tokens={cfg.train.max_tokens} per micro-batch, grad_accum={cfg.train.grad_accum}; from {steps_from})")
    hits = {"selection": 0, "train": 0, "eval": 0}
    pool_fp = pool.fingerprint()
    target_fp = target.fingerprint() if target is not None else None
    task_fps: dict[str, str] = {}

    def fresh() -> LoadedModel:
        if hasattr(base.model, "peft_config"):
            raise RuntimeError("the base model was wrapped in place by a selection method; it cannot be reused")
        return LoadedModel(copy.deepcopy(base.model), base.tokenizer, identity, base.config)

    def evaluate_all(train_key: str, model_of: Callable[[], LoadedModel]) -> tuple[dict[str, float], float]:
        metrics: dict[str, float] = {}
        seconds = 0.0
        loaded = None
        for task in cfg.eval:
            entry = cache.entry("eval", identity, train_key,
                                {"task": to_dict(task), "render": render}, name="metrics")
            if entry.exists():
                _, meta = entry.load()
                result = meta["result"]
                hits["eval"] += 1
            else:
                loaded = loaded or model_of()
                result = evaluate_task(loaded, task, cfg.render, progress=progress)
                save_artefact(entry.folder, entry.name, _numeric(result["metrics"]), entry.key,
                              extra={"result": result})
            task_fps[task.label()] = result["fingerprint"]
            seconds += result["seconds"]
            for key, value in result["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"{task.label()}/{key}"] = float(value)
        return metrics, seconds

    rows: list[dict[str, Any]] = []
    if cfg.eval_base:
        metrics, secs = evaluate_all("base", lambda: base)
        rows.append({"method": "base", "seed": None, "selected": 0, "steps": 0, "train_tokens": 0,
                     "train_seconds": 0.0, "select_seconds": 0.0, "eval_seconds": round(secs, 3),
                     "final_train_loss": None, **metrics})
        log("base: " + _brief(metrics, cfg))
    ids = [ex.id for ex in pool.examples]
    for seed in cfg.seeds:
        for method in cfg.methods:
            settings = cfg.method_settings.get(method)
            sel_entry = cache.entry("selection", identity, pool_fp,
                                    {"method": method, "budget": cfg.budget, "seed": seed,
                                     "method_settings": settings, "target": target_fp}, name="selection")
            if sel_entry.exists():
                tensors, meta = sel_entry.load()
                selected = tensors["selected"].astype(bool)
                select_seconds = float(meta["seconds"])
                hits["selection"] += 1
            else:
                t0 = time.perf_counter()
                sel = select_examples(method, pool, cfg.budget, target=target, loaded=base, seed=seed,
                                      settings=settings, progress=progress)
                select_seconds = time.perf_counter() - t0
                selected = np.asarray(sel.selected, dtype=bool)
                save_artefact(sel_entry.folder, sel_entry.name,
                              {"scores": np.asarray(sel.scores, np.float64), "ranks": np.asarray(sel.ranks, np.int64),
                               "selected": selected.astype(np.uint8)}, sel_entry.key,
                              extra={"ids": sel.ids, "seconds": select_seconds, "timings": sel.timings,
                                     "settings_recorded": sel.settings})
            chosen = [i for i in range(len(ids)) if selected[i]]
            train_cfg = dataclasses.replace(cfg.train, seed=seed, max_steps=steps)
            train_entry = cache.entry("train", identity, _digest([pool_fp, *[ids[i] for i in chosen]]),
                                      {"train": to_dict(train_cfg), "render": render}, name="train")
            model_holder: dict[str, LoadedModel] = {}
            if train_entry.exists():
                tensors, meta = train_entry.load()
                tr = meta["result"]
                hits["train"] += 1
            else:
                loaded = fresh()
                log(f"[seed {seed}] {method}: training on {len(chosen)} examples for {steps} steps")
                res: TrainResult = train(loaded, [items[i] for i in chosen], train_cfg,
                                         out_dir=train_entry.folder / "adapter", progress=progress)
                tr = {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 3),
                      "final_loss": res.loss_curve[-1], "first_loss": res.loss_curve[0]}
                save_artefact(train_entry.folder, train_entry.name,
                              {"loss_curve": np.asarray(res.loss_curve, np.float64)}, train_entry.key,
                              extra={"result": tr})
                model_holder["m"] = loaded

            def trained_model(entry: CacheEntry = train_entry, holder: dict = model_holder) -> LoadedModel:
                if "m" not in holder:
                    holder["m"] = load_adapter(fresh(), entry.folder / "adapter")
                return holder["m"]

            train_key = train_entry.folder.name
            metrics, secs = evaluate_all(train_key, trained_model)
            row = {"method": method, "seed": seed, "selected": len(chosen), "steps": tr["steps"],
                   "train_tokens": tr["tokens"], "train_seconds": tr["seconds"],
                   "select_seconds": round(select_seconds, 3), "eval_seconds": round(secs, 3),
                   "final_train_loss": tr["final_loss"], **metrics}
            rows.append(row)
            log(f"[seed {seed}] {method}: {len(chosen)} selected; " + _brief(metrics, cfg))
    summary_extra = {"steps": steps, "steps_from": steps_from, "cache_hits": hits,
                     "pool": {"path": pool.path, "examples": len(pool), "fingerprint": pool_fp},
                     "eval_data": task_fps, "model": identity}
    outputs = write_results(cfg, rows, summary_extra)
    return ExperimentResult(rows, steps, steps_from, hits, outputs)


def _brief(metrics: dict[str, float], cfg: ExperimentConfig) -> str:
    parts = []
    for task in cfg.eval:
        key = f"{task.label()}/{task.primary}"
        if key in metrics:
            parts.append(f"{key}={metrics[key]:.4f}")
    return ", ".join(parts) or json.dumps(metrics)
