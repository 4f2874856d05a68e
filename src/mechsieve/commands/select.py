"""`mechsieve select`: score a pool with a method and write the selected subset, scores and summary."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_engine_flags,
    add_model_flags,
    add_overwrite_flag,
    build_config,
    check_budget,
    check_engine,
    data_flags,
    engine_flags,
    model_flags,
    print_outputs,
    read_data,
    resolve_stream,
    scorer_class,
)
from mechsieve.data.readers import DataConfig
from mechsieve.engine.base import EngineConfig
from mechsieve.models.loading import ModelConfig

NAME = "select"
HELP = "select a subset of a pool for a target capability (nait, rds, loss, ifd, kcenter, random, full, ...)"


@dataclass
class SelectCommand:
    """Settings of `mechsieve select`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """The pool to select from."""
    target: DataConfig = field(default_factory=DataConfig)
    """In-domain examples of the target capability; several files separated by commas (each file
    is a capability, selection takes the union)."""
    method: str = "nait"
    """A registered scorer: `mechsieve methods` lists them, `mechsieve methods NAME` shows its
    settings. Several, separated by commas (nait,rds,loss): the forward-only ones share one pass
    over the pool, and each gets its own folder under `out`."""
    budget: str = "0.1"
    """A fraction (0.1), a count (70), a threshold (score>=0.5) or full."""
    order: Literal["auto", "top", "bottom"] = "auto"
    """Which end of the scores to select; auto: the method's own (loss: its direction)."""
    seed: int = 0
    """Seed of random selection (and of any method that samples)."""
    scorer: dict[str, Any] = field(default_factory=dict)
    """The method's settings, e.g. --set scorer.site=mlp --set scorer.render.max_len=256. With
    several methods, scorer.METHOD.KEY is one method's and scorer.KEY every method's that has KEY."""
    feature_cache: bool = True
    """Keep the pool features of forward-only methods (drift projections, pooled states, response
    losses, ...) in the mechsieve cache ($MECHSIEVE_CACHE/features), keyed by model, pool and
    settings, so a later run with one more method computes only what is missing."""
    out: str = "runs/select"
    """Output folder: the subset in the pool's format, scores.parquet, summary.json (and
    shards/ while a sharded run is under way)."""
    write_rejected: bool = False
    """Also write the examples not selected, in the same format as the subset: rejected.jsonl
    (.parquet, ..., or a `rejected` dataset folder) beside selected.jsonl; with several methods, in
    each method's folder."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Where scoring runs: in process (default) or on Ray actors; shard size for resumable runs."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mechsieve.scorers.registry import available

    p.add_argument("--method", help=f"one of: {', '.join(available())} (default nait); several separated by "
                   "commas share one forward pass and write one folder each")
    add_data_flags(p)
    p.add_argument("--target", help="in-domain examples of the target capability; several files separated by "
                   "commas are several capabilities (union)")
    p.add_argument("--target-format", help="format of the target files (default auto)")
    p.add_argument("--target-field-map", metavar="KEY=COL,...", help="columns of the target for format=mapping")
    p.add_argument("--target-limit", type=int, help="read at most this many target records per file")
    p.add_argument("--target-split", help="split of a dataset target, with datasets' slicing (train[:32])")
    p.add_argument("--target-subset", help="config name of a hub / dataset-folder target (e.g. main)")
    p.add_argument("--target-encoding", help="text encoding of the target files (default utf-8)")
    p.add_argument("--budget", help="fraction (0.1, default), count (70), threshold ('score>=0.5') or full")
    p.add_argument("--order", choices=["auto", "top", "bottom"], help="which end of the scores (default: method's)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--out", "--output_dir", help="output folder (default runs/select)")
    p.add_argument("--write-rejected", action="store_true", default=None,
                   help="also write the examples not selected (rejected.jsonl beside selected.jsonl, same format)")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="do not keep or reuse pool features in the mechsieve cache")
    add_overwrite_flag(p)
    add_model_flags(p)
    add_engine_flags(p)
    add_config_flags(p)


def read_targets(cfg: Any):
    """The target pool: one file, or several separated by commas (sources kept per file)."""
    from dataclasses import replace

    from mechsieve.data.readers import read_pool
    from mechsieve.data.records import Pool, make_unique_ids

    paths = [x.strip() for x in cfg.path.split(",") if x.strip()]
    pools = [read_pool(replace(cfg, path=path)) for path in paths]
    if len(pools) == 1:
        return pools[0]
    examples = [ex for pool in pools for ex in pool.examples]
    make_unique_ids(examples)
    return Pool(examples, cfg.path, "memory", "mixed")


def method_list(method: str) -> list[str]:
    """The methods of `--method` (comma-separated), each once."""
    from mechsieve.config import ConfigError

    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods:
        raise ConfigError("method is empty; give one or more of the methods `mechsieve methods` lists")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ConfigError(f"method: {', '.join(repeated)} given twice; each method once")
    return methods


def method_settings(methods: list[str], scorer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's settings (checked: an unknown key is named with the method it was meant for).
    One method: all of `scorer`. Several: `scorer[METHOD]` for that method, over the keys of
    `scorer` that are not method names, given to every method whose settings have that key."""
    import dataclasses

    from mechsieve.commands._common import method_class, scorer_class
    from mechsieve.config import ConfigError, did_you_mean

    if len(methods) == 1:
        scorer_class(methods[0], scorer)
        return {methods[0]: dict(scorer)}
    classes = {m: method_class(m) for m in methods}
    own = {m: scorer.get(m) or {} for m in methods}
    common = {k: v for k, v in scorer.items() if k not in classes}
    names = {m: {f.name for f in dataclasses.fields(c.config_cls)} for m, c in classes.items()}
    for key in common:
        if not any(key in n for n in names.values()):
            known = sorted(set().union(*names.values()))
            raise ConfigError(f"scorer.{key}: none of {', '.join(methods)} has a setting {key}"
                              f"{did_you_mean(key, [*known, *methods])} (one method's: scorer.METHOD.KEY)")
    out = {}
    for m in methods:
        mine = {k: v for k, v in common.items() if k in names[m]}
        for k, v in own[m].items():
            mine[k] = {**mine[k], **v} if isinstance(v, dict) and isinstance(mine.get(k), dict) else v
        scorer_class(m, mine, key=f"scorer.{m}")
        out[m] = mine
    return out


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import ConfigError
    from mechsieve.data.writers import subset_filename
    from mechsieve.scorers.base import ScorerError
    from mechsieve.select import SelectionError, parse_budget
    from mechsieve.store.outputs import OutputFolder

    flags = {**model_flags(args), **data_flags(args), **data_flags(args, "target", "target"),
             "method": args.method, "budget": args.budget, "order": args.order, "seed": args.seed, "out": args.out,
             "feature_cache": args.feature_cache, "write_rejected": args.write_rejected, **engine_flags(args)}
    cfg = build_config(SelectCommand, args, flags)
    # settings and the output folder first: a typo fails before a large pool is read or a model loaded
    methods = method_list(cfg.method)
    settings = method_settings(methods, cfg.scorer)
    classes = {m: scorer_class(m, settings[m], key="scorer" if len(methods) == 1 else f"scorer.{m}") for m in methods}
    check_budget(cfg.budget)
    resolve_stream(cfg)
    for cls in classes.values():
        check_engine(cfg.engine, cls)
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    pool = read_data(cfg, progress=not args.quiet)
    if pool.skipped:
        print(f"skipped {len(pool.skipped)} invalid record(s); first: {pool.skipped[0]}")
    print(f"read {len(pool)} examples ({pool.format}) from {pool.path}")
    try:
        parse_budget(cfg.budget).size(len(pool))  # a budget the pool cannot meet: say so before loading a model
    except SelectionError as err:
        raise ConfigError(str(err)) from None
    target = read_targets(cfg.target) if cfg.target.path else None
    if target is not None:
        print(f"read {len(target)} target examples from {cfg.target.path}: {target.counts_by_source()}")
    loaded = None
    if any(cls.needs_model for cls in classes.values()):
        from mechsieve.models.loading import load_model

        loaded = load_model(cfg.model)
    order = None if cfg.order == "auto" else cfg.order
    several = len(methods) > 1
    entries = [*methods, "scores.parquet", "summary.json", "shards"] if several else \
        [subset_filename(pool), "scores.parquet", "summary.json", "shards",
         *([subset_filename(pool, "rejected")] if cfg.write_rejected else [])]
    folder.claim(entries)
    try:
        selections, shared = score_and_select(cfg, settings, pool, target, loaded, order, not args.quiet)
    except (SelectionError, ScorerError) as err:
        raise ConfigError(str(err)) from None
    extra = {"model": loaded.identity if loaded is not None else None,
             "target": {"path": cfg.target.path, "examples": len(target),
                        "fingerprint": target.fingerprint()} if target is not None else None}
    if several:
        paths = write_several(pool, selections, shared, cfg.out, extra)
    else:
        from mechsieve.select import write_selection

        paths = write_selection(pool, selections[methods[0]], cfg.out, extra)
    if cfg.write_rejected:
        for method, sel in selections.items():
            rejected = write_rejected(pool, sel, Path(cfg.out) / method if several else Path(cfg.out))
            paths = {**paths, (f"{method} rejected" if several else "rejected"): rejected}
    folder.finish()
    total = pool.counts_by_source()
    if shared.get("pass"):
        passes = shared["pass"]["passes"]
        print(f"shared pass of {', '.join(shared['shared'])}: {len(passes)} forward pass(es) in "
              f"{shared['pass']['seconds']:.1f} s; features computed {len(shared['pass']['features_computed'])}, "
              f"from the cache {len(shared['pass']['features_cached'])}")
        same = [p for p in passes if p["inputs"] == "example" and p["site"] == "resid"]
        if len(same) > 1:
            print(f"  note: {len(same)} passes over the same examples, because the methods' render or batching "
                  "settings differ (" + "; ".join(f"max_len {p['max_len']}, max_tokens {p['max_tokens']}, max_batch "
                                                   f"{p['max_batch']}" for p in same) + "); the same values for "
                  "scorer.render.max_len / scorer.max_len, scorer.max_tokens and scorer.max_batch share one pass")
    for method, sel in selections.items():
        engine = sel.settings.get("engine")
        if engine and "shards" in engine:
            print(f"engine {engine['executor']}: {engine['shards']} shards of {engine['shard_size']} "
                  f"({engine['resumed']} resumed from an earlier run)")
        print(f"{method}: selected {len(sel.ids)} of {len(pool)} ({cfg.budget}, {sel.settings['order']}) "
              f"in {sel.timings.get('score_total', 0.0):.1f} s; by source:")
        for source, count in sel.counts_by_source(pool).items():
            print(f"  {source:<24} {count:>6} / {total[source]}")
    print_outputs(paths)
    return 0


def score_and_select(cfg: Any, settings: dict[str, dict[str, Any]], pool: Any, target: Any, loaded: Any,
                     order: str | None, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method's Selection (method -> Selection) and the shared pass's report: through the
    engine when it shards, else in process, the forward-only methods sharing one pass (and the
    feature cache when on)."""
    from pathlib import Path

    if cfg.engine.sharded and len(settings) == 1:
        from mechsieve.engine import select_pool

        ((method, own),) = settings.items()
        sel = select_pool(method, pool, cfg.budget, target=target, model=loaded, seed=cfg.seed, settings=own,
                          order=order, engine=cfg.engine, folder=Path(cfg.out) / "shards", progress=progress)
        return {method: sel}, {"shared": []}
    if cfg.engine.sharded:
        from mechsieve.engine import select_pool_many

        return select_pool_many(settings, pool, cfg.budget, target=target, model=loaded, seed=cfg.seed, order=order,
                                engine=cfg.engine, folder=Path(cfg.out) / "shards", progress=progress)
    from mechsieve.select.pipeline import select_many

    cache = None
    if cfg.feature_cache:
        from mechsieve.models.loading import cache_root
        from mechsieve.store.features import FeatureCache

        cache = FeatureCache(cache_root())
    return select_many(settings, pool, cfg.budget, target=target, loaded=loaded, seed=cfg.seed, order=order,
                       cache=cache, progress=progress)


def write_rejected(pool: Any, sel: Any, folder: Path) -> Path:
    """The pool's examples that `sel` did not select, in the pool's format, as the subset is
    written (`rejected.jsonl` beside `selected.jsonl`); returns the file (or dataset folder)."""
    from mechsieve.data.stream import is_streamed
    from mechsieve.data.writers import subset_filename, write_subset

    out = folder / subset_filename(pool, "rejected")
    if is_streamed(pool):  # by position: most of the pool, no id made
        return pool.write_chosen(~sel.selected, out)
    return write_subset(pool, [ex.id for ex, chosen in zip(pool.examples, sel.selected) if not chosen], out)


def write_several(pool: Any, selections: dict[str, Any], shared: dict[str, Any], out: str, extra: dict[str, Any]
                  ) -> dict[str, Path]:
    """One folder per method (its subset, scores.parquet, summary.json), then `scores.parquet` with
    one score column per method and `summary.json` (the shared pass, each method's counts)."""
    import numpy as np

    from mechsieve.data.stream import ids_of, sources_of
    from mechsieve.select import write_selection
    from mechsieve.select.pipeline import write_score_table
    from mechsieve.store.atomic import write_json

    root = Path(out)
    paths: dict[str, Path] = {}
    for method, sel in selections.items():
        written = write_selection(pool, sel, root / method, {**extra, "shared_pass": shared.get("shared", [])})
        paths[method] = written["subset"].parent
    write_score_table(root / "scores.parquet", {
        "id": ids_of(pool.examples), "source": sources_of(pool.examples),
        **{m: np.asarray(sel.scores, dtype=np.float64) for m, sel in selections.items()},
        **{f"{m}.selected": np.asarray(sel.selected, dtype=bool) for m, sel in selections.items()}})
    write_json(root / "summary.json", {
        "methods": list(selections), "shared": shared, **extra,
        "pool": {"path": pool.path, "examples": len(pool), "fingerprint": pool.fingerprint(),
                 "by_source": pool.counts_by_source()},
        "selected": {m: {"examples": int(sel.selected.sum()), "by_source": sel.counts_by_source(pool),
                         "settings": sel.settings, "timings": sel.timings} for m, sel in selections.items()}})
    return {**paths, "scores": root / "scores.parquet", "summary": root / "summary.json"}
