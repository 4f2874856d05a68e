"""Running work through the engine: scoring (and selection), activation capture, XTF token scores.

Each function plans the shards, opens the shard folder (resuming a run that was stopped), runs
the step with the chosen executor and puts the shards' outputs back together on the driver:
- `score_pool`: sharded scorers (`ShardedScorer`: nait, rds, loss, ifd, vector-filter, igds,
  grad-sim) run `prepare` on the driver, `score_shard` per shard, `combine` on the driver.
  Scorers that need the whole pool (k-center, influence, concept-influence, projection-diff)
  run in process under `local`, and are refused under `ray`; scorers without a model (random,
  full) always run on the driver: they cost nothing.
- `select_pool`: `score_pool`, then the global selection on the driver from the score table.
- `capture_sharded` / `token_scores_sharded`: capture with reductions / XTF token scores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mechsieve.data.stream import ExampleRefs, ids_of, is_streamed
from mechsieve.engine.base import (
    EngineConfig,
    EngineError,
    Executor,
    Shard,
    ShardOutput,
    Step,
    plan_shards,
)
from mechsieve.engine.shards import ShardStore


def streamed_engine(pool: Any, engine: EngineConfig) -> EngineConfig:
    """`engine` for `pool`: a streamed pool (data.stream) always goes through shards."""
    from dataclasses import replace

    return replace(engine, stream="on") if is_streamed(pool) and not engine.sharded else engine


def refuse_whole_pool(scorer: Any, pool: Any) -> None:
    """A method that needs every example at once cannot score a streamed pool (the driver holds ids)."""
    if is_streamed(pool) and scorer.needs_model and not scorer.shardable:
        raise EngineError(f"{scorer.name} needs the whole pool in memory at once, but the pool is streamed "
                          f"(engine.stream); methods that stream: {', '.join(shardable_methods())}. Set "
                          "engine.stream=off (--no-stream) for it")


def make_executor(cfg: EngineConfig) -> Executor:
    if cfg.executor == "ray":
        from mechsieve.engine.ray_executor import RayExecutor, require_ray

        require_ray()  # fail before any model work when Ray is missing
        return RayExecutor(cfg.ray_address, cfg.actors, cfg.gpus_per_actor, cfg.cpus_per_actor)
    from mechsieve.engine.local import LocalExecutor

    return LocalExecutor()


def shard_key(shards: list[Shard], engine: EngineConfig) -> dict[str, Any]:
    """The shard plan's part of a shard folder's settings (beside the pool's fingerprint, which
    hashes its ids in order): a rerun under another shard size is refused, even one that gives as
    many shards, whose shards would cover other examples."""
    return {"shard_size": engine.effective_shard_size(), "shards": len(shards)}


def run_step(step: Step, shards: list[Shard], store: ShardStore, executor: Executor, progress: bool = True
             ) -> dict[str, Any]:
    """Run `step` on the shards `store` has no marker for (or a marker naming other ids than the
    plan's); return a report of the run. A shard's rows are checked against its ids before it is
    written."""
    done = store.done(shards)
    todo = [s for s in shards if s.index not in done]

    def save(shard: Shard, output: ShardOutput, seconds: float) -> None:
        step.check_output(shard, output)
        store.write(shard.index, output, seconds, ids=shard.ids)

    start = time.perf_counter()
    executor.execute(step, todo, save, progress)
    missing = sorted({s.index for s in shards} - store.done(shards))
    if missing:
        raise EngineError(f"shards {missing[:10]} produced no output; rerun to resume")
    return {**executor.describe(), "shards": len(shards), "shard_size": shards[0].size if shards else 0,
            "resumed": len(shards) - len(todo), "ran": len(todo), "seconds": round(time.perf_counter() - start, 3),
            **{k: round(v, 3) for k, v in getattr(executor, "timings", {}).items()}}


def read_outputs(store: ShardStore, shards: list[Shard], step: Step) -> list[ShardOutput]:
    """The shards' outputs in plan order, each checked against the ids and rows of its shard."""
    outputs = []
    for s in shards:
        output = store.read(s.index, s.ids)
        step.check_output(s, output)
        outputs.append(output)
    return outputs


def check_rows(what: str, arrays: dict[str, Any], shards: list[Shard], examples: list[Any]) -> None:
    """Refuse a combined result whose shards do not cover `examples`' ids in order, or an array
    without one row per example (checked before anything is saved)."""
    ids = ids_of(examples)
    at = 0  # shard by shard, so that no second list of the pool's ids is made
    for s in shards:
        mine = s.ids
        if ids[at:at + len(mine)] != mine:
            at += next((k for k, (a, b) in enumerate(zip(mine, ids[at:at + len(mine)])) if a != b),
                       min(len(mine), len(ids) - at))
            break
        at += len(mine)
    covered = sum(s.size for s in shards)
    if at != len(ids) or covered != len(ids):
        raise EngineError(f"{what}: the shards cover {covered} ids, the pool has {len(ids)}, first difference "
                          f"at position {at}; an engine bug, please report")
    for name, values in arrays.items():
        if values is not None and len(values) != len(ids):
            raise EngineError(f"{what}: {name} has {len(values)} rows for the pool's {len(ids)} ids; rerun with "
                              "engine.overwrite=true / --overwrite-shards")


def _loaded_model(model: Any) -> Any:
    """`model` as a LoadedModel (loading a ModelConfig here, on the driver)."""
    from mechsieve.models.loading import LoadedModel, load_model

    if model is None or isinstance(model, LoadedModel):
        return model
    return load_model(model)


# --- scoring -----------------------------------------------------------------------------------

def score_pool(scorer: Any, pool: Any, *, target: Any = None, model: Any = None, seed: int = 0,
               engine: EngineConfig | None = None, folder: str | Path | None = None, progress: bool = True
               ) -> tuple[Any, dict[str, Any]]:
    """Score `pool` with `scorer` (a Scorer, or a registered name) through the engine.

    model: a LoadedModel, or a ModelConfig (loaded on the driver only when `prepare` must run;
    Ray actors always load their own from its config). folder: the shard folder (needed when
    the engine shards). Returns (ScoreResult, report of the engine run).
    """
    from mechsieve.engine.steps import ScoreStep, decode_result
    from mechsieve.scorers.registry import make_scorer

    scorer = make_scorer(scorer) if isinstance(scorer, str) else scorer
    refuse_whole_pool(scorer, pool)
    engine = streamed_engine(pool, engine or EngineConfig())
    if not engine.sharded or not scorer.needs_model or not scorer.shardable:
        if engine.executor == "ray" and scorer.needs_model and not scorer.shardable:
            raise EngineError(f"{scorer.name} needs the whole pool at once and cannot run on Ray shards; "
                              f"methods that can: {', '.join(shardable_methods())}. Use engine.executor=local "
                              "(--engine local) for it")
        start = time.perf_counter()
        loaded = _loaded_model(model) if scorer.needs_model else None
        result = scorer.score(pool, target=target, loaded=loaded, seed=seed, progress=progress)
        return result, {"executor": "in-process", "seconds": round(time.perf_counter() - start, 3)}
    if folder is None:
        raise EngineError("a sharded run needs a folder for its shards (the command's --out)")
    scorer.check_inputs(pool, target, model)
    shards = plan_shards(pool.examples, engine.effective_shard_size())
    executor = make_executor(engine)
    step = ScoreStep(scorer, {}, model)
    settings = {**step.settings(), "seed": seed, "pool": pool.fingerprint(), **shard_key(shards, engine),
                "target": target.fingerprint() if target is not None else None}
    store = ShardStore(folder, settings, overwrite=engine.overwrite)
    state = store.load_state()
    t_prepare = 0.0
    if state is None:
        start = time.perf_counter()
        loaded = _loaded_model(model)
        state = store.save_state(scorer.prepare(pool, target=target, loaded=loaded, seed=seed, progress=progress))
        t_prepare = time.perf_counter() - start
        if step._loaded is None and executor.name == "local":
            step._loaded = loaded  # the driver's model serves the local shards too
    step.state = state
    report = run_step(step, shards, store, executor, progress)
    report["prepare_seconds"] = round(t_prepare, 3)
    result = scorer.combine([decode_result(out) for out in read_outputs(store, shards, step)], state)
    check_rows(f"{scorer.name} scores", {"scores": result.scores, "per_target": result.per_target,
                                         **{f"arrays.{k}": v for k, v in result.arrays.items()}},
               shards, pool.examples)
    if not engine.keep_shards:
        store.remove()
    return result, report


def shardable_methods() -> list[str]:
    """Registered methods that the ray engine can run (sharded, or cheap on the driver)."""
    from mechsieve.scorers.registry import available, get_scorer_class

    return [name for name in available()
            if get_scorer_class(name).shardable or not get_scorer_class(name).needs_model]


def select_pool(method: str, pool: Any, budget: Any, *, target: Any = None, model: Any = None, seed: int = 0,
                settings: dict[str, Any] | None = None, order: str | None = None,
                engine: EngineConfig | None = None, folder: str | Path | None = None, progress: bool = True) -> Any:
    """`select.select_examples` through the engine: the scores come from `score_pool`, the global
    selection is made here, on the driver, from the score table."""
    from mechsieve.scorers.registry import make_scorer
    from mechsieve.select.budget import SelectionError, parse_budget
    from mechsieve.select.pipeline import selection_from_result

    engine = engine or EngineConfig()
    if len(pool.examples) == 0:
        raise SelectionError("the pool is empty: nothing to select (check the path and --limit)")
    parse_budget("full" if method == "full" else budget).size(len(pool.examples))  # before any model work
    scorer = make_scorer(method, settings)
    t0 = time.perf_counter()
    result, report = score_pool(scorer, pool, target=target, model=model, seed=seed, engine=engine, folder=folder,
                                progress=progress)
    return selection_from_result(method, scorer, result, pool, budget, seed=seed, order=order,
                                 score_seconds=time.perf_counter() - t0, recorded={"engine": report})


def score_pool_many(scorers: dict[str, Any], pool: Any, *, target: Any = None, model: Any = None, seed: int = 0,
                    engine: EngineConfig | None = None, folder: str | Path | None = None, progress: bool = True
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`score_pool` for several scorers (label -> Scorer): the forward-only ones run `prepare` on
    the driver and share one feature pass per shard (a ScoreManyStep under `folder/shared`); each
    other scorer goes through `score_pool` alone (its shards under `folder/LABEL`). Returns
    (label -> ScoreResult, report)."""
    from mechsieve.engine.steps import ScoreManyStep, decode_many
    from mechsieve.scorers.base import ForwardScorer

    for scorer in scorers.values():
        refuse_whole_pool(scorer, pool)
    engine = streamed_engine(pool, engine or EngineConfig())
    forward = {label: s for label, s in scorers.items() if isinstance(s, ForwardScorer)}
    results: dict[str, Any] = {}
    report: dict[str, Any] = {"shared": sorted(forward), "methods": {}}
    if forward and not engine.sharded:
        from mechsieve.scorers.many import score_many

        shared, report = score_many(forward, pool, target=target, loaded=_loaded_model(model), seed=seed,
                                    progress=progress)
        results.update(shared)
    elif forward:
        if folder is None:
            raise EngineError("a sharded run needs a folder for its shards (the command's --out)")
        for scorer in forward.values():
            scorer.check_inputs(pool, target, model)
        shards = plan_shards(pool.examples, engine.effective_shard_size())
        executor = make_executor(engine)
        step = ScoreManyStep(forward, {}, model)
        settings = {**step.settings(), "seed": seed, "pool": pool.fingerprint(), **shard_key(shards, engine),
                    "target": target.fingerprint() if target is not None else None}
        store = ShardStore(Path(folder) / "shared", settings, overwrite=engine.overwrite)
        state = store.load_state()
        start = time.perf_counter()
        if state is None:
            loaded = _loaded_model(model)
            state = store.save_state({f"{label}/{k}": v for label, s in forward.items()
                                      for k, v in s.prepare(pool, target=target, loaded=loaded, seed=seed,
                                                            progress=progress).items()})
            if step._loaded is None and executor.name == "local":
                step._loaded = loaded
        step.states = {label: {k[len(label) + 1:]: v for k, v in state.items() if k.startswith(f"{label}/")}
                       for label in forward}
        t_prepare = time.perf_counter() - start
        report["engine"] = {**run_step(step, shards, store, executor, progress), "prepare_seconds": round(t_prepare, 3)}
        outputs = read_outputs(store, shards, step)
        for label, scorer in forward.items():
            result = scorer.combine([decode_many(out, label) for out in outputs], step.states[label])
            check_rows(f"{label} scores", {"scores": result.scores, "per_target": result.per_target}, shards,
                       pool.examples)
            results[label] = result
        if not engine.keep_shards:
            store.remove()
    for label, scorer in scorers.items():
        if label in forward:
            continue
        start = time.perf_counter()
        results[label], own = score_pool(scorer, pool, target=target, model=model, seed=seed, engine=engine,
                                         folder=Path(folder) / label if folder is not None else None,
                                         progress=progress)
        report["methods"][label] = {"own_seconds": round(time.perf_counter() - start, 4), "engine": own}
    return {label: results[label] for label in scorers}, report


def select_pool_many(settings: dict[str, dict[str, Any] | None], pool: Any, budget: Any, *, target: Any = None,
                     model: Any = None, seed: int = 0, order: str | None = None, engine: EngineConfig | None = None,
                     folder: str | Path | None = None, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """`select.select_many` through the engine (method -> settings): scores from `score_pool_many`,
    each method's global selection made here, on the driver."""
    from mechsieve.scorers.registry import make_scorer
    from mechsieve.select.budget import SelectionError, parse_budget
    from mechsieve.select.pipeline import selection_from_result

    if len(pool.examples) == 0:
        raise SelectionError("the pool is empty: nothing to select (check the path and --limit)")
    for method in settings:
        parse_budget("full" if method == "full" else budget).size(len(pool.examples))  # before any model work
    scorers = {method: make_scorer(method, s) for method, s in settings.items()}
    t0 = time.perf_counter()
    results, report = score_pool_many(scorers, pool, target=target, model=model, seed=seed, engine=engine,
                                      folder=folder, progress=progress)
    seconds = time.perf_counter() - t0
    selections = {}
    for method, scorer in scorers.items():
        engine_report = report["methods"].get(method, {}).get("engine") or report.get("engine", {})
        selections[method] = selection_from_result(method, scorer, results[method], pool, budget, seed=seed,
                                                   order=order, score_seconds=seconds,
                                                   recorded={"engine": engine_report})
    return selections, report


# --- capture and token scores ------------------------------------------------------------------

def capture_sharded(model: Any, pool: Any, cfg: Any, render_cfg: Any, out_dir: str | Path,
                    engine: EngineConfig, progress: bool = True, overwrite: bool = False
                    ) -> tuple[Any, dict[str, Any]]:
    """`capture.capture_pool` through the engine: the same activations artefact in `out_dir`,
    shards under `out_dir/shards` while it runs. A finished capture made under the same settings
    is reused (under others: refused) unless `overwrite`. Returns (CaptureResult, report)."""
    import numpy as np

    from mechsieve.capture.activations import CaptureResult, capture_settings, save_capture
    from mechsieve.capture.batching import BatchPlan
    from mechsieve.capture.forward import ForwardStats
    from mechsieve.data.render import RenderStats
    from mechsieve.engine.steps import CaptureStep
    from mechsieve.store.artefacts import artefact_exists, load_artefact

    if len(pool.examples) == 0:
        raise ValueError("nothing to capture: the pool is empty")
    step = CaptureStep(cfg, render_cfg, model)
    # a LoadedModel's identity names its dtype; Ray actors pick theirs by device, so a capture
    # made from a ModelConfig is keyed without it
    identity = step.identity if step._loaded is None else step._loaded.identity
    settings = capture_settings(identity, pool.fingerprint(), cfg, render_cfg)
    if artefact_exists(out_dir, "activations") and not overwrite:
        tensors, meta = load_artefact(out_dir, "activations", expected=settings)
        arrays = {k: v for k, v in tensors.items() if k != "n_response_tokens"}
        result = CaptureResult(arrays, meta["layers"], tensors["n_response_tokens"], BatchPlan([], 0, 0),
                               ForwardStats(), resumed_examples=len(pool.examples))
        return result, {"render": "reused", "truncated": 0, "cached": True, "engine": {"executor": engine.executor}}
    shards = plan_shards(pool.examples, engine.effective_shard_size())
    executor = make_executor(engine)
    store = ShardStore(Path(out_dir) / "shards",
                       {**step.settings(), "pool": pool.fingerprint(), **shard_key(shards, engine)}, engine.overwrite)
    report = run_step(step, shards, store, executor, progress)
    outputs = read_outputs(store, shards, step)
    names = list(cfg.reductions)
    arrays = {name: np.concatenate([o.arrays[name] for o in outputs]) for name in names}
    n_resp = np.concatenate([o.arrays["n_response_tokens"] for o in outputs])
    check_rows("capture", {**arrays, "n_response_tokens": n_resp}, shards, pool.examples)
    stats = ForwardStats()
    rstats = RenderStats()
    for o in outputs:
        f, r = o.meta["forward"], o.meta["render"]
        stats.batches += f["batches"]
        stats.real_tokens += f["real_tokens"]
        stats.padded_tokens += f["padded_tokens"]
        stats.seconds += f["seconds"]
        for key in ("examples", "tokens", "response_tokens", "truncated", "no_response_left", "plain_fallback"):
            setattr(rstats, key, getattr(rstats, key) + r.get(key, 0))  # shards of an older run lack the last
        rstats.truncated_ids.extend(r["truncated_ids"])
        rstats.fallback_ids.extend(r.get("fallback_ids", []))
    plan = BatchPlan([[] for _ in range(stats.batches)], stats.real_tokens, stats.padded_tokens)
    result = CaptureResult(arrays, outputs[0].meta["layers"], n_resp, plan, stats)
    save_capture(out_dir, result, settings, list(ids_of(pool.examples)))
    if not engine.keep_shards:
        store.remove()
    return result, {"render": rstats.summary(), "truncated": rstats.truncated, "cached": False, "engine": report}


def token_scores_sharded(model: Any, examples: list[Any], xtf_cfg: Any, words: list[str], render_cfg: Any,
                         folder: str | Path, engine: EngineConfig, progress: bool = True,
                         target: list[Any] | None = None) -> Any:
    """XTF per-token scores of `examples` through the engine (shards under `folder`); the masks are
    then decided on the driver (`Xtf.decide`: TR's Multi-Otsu thresholds need every token)."""
    from mechsieve.data.records import Pool
    from mechsieve.engine.steps import TokenScoreStep, decode_token_scores

    shards = plan_shards(examples, engine.effective_shard_size())
    executor = make_executor(engine)
    step = TokenScoreStep(xtf_cfg, words, render_cfg, model, target=target)
    # a streamed pool's examples (ExampleRefs) keep their pool: its fingerprint, without reading them
    pool = examples.pool if isinstance(examples, ExampleRefs) else Pool(list(examples), "", "memory", "memory")
    store = ShardStore(folder, {**step.settings(), "pool": pool.fingerprint(), **shard_key(shards, engine)},
                       engine.overwrite)
    report = run_step(step, shards, store, executor, progress)
    scores = decode_token_scores(read_outputs(store, shards, step))
    check_rows("token scores", {"eligible": scores.eligible, **{f"score.{k}": v for k, v in scores.scores.items()}},
               shards, examples)
    scores.info["engine"] = report
    if not engine.keep_shards:
        store.remove()
    return scores
