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
    """A registered scorer: `mechsieve methods` lists them, `mechsieve methods NAME` shows its settings."""
    budget: str = "0.1"
    """A fraction (0.1), a count (70), a threshold (score>=0.5) or full."""
    order: Literal["auto", "top", "bottom"] = "auto"
    """Which end of the scores to select; auto: the method's own (loss: its direction)."""
    seed: int = 0
    """Seed of random selection (and of any method that samples)."""
    scorer: dict[str, Any] = field(default_factory=dict)
    """The method's settings, e.g. --set scorer.site=mlp --set scorer.render.max_len=256."""
    out: str = "runs/select"
    """Output folder: the subset in the pool's format, scores.parquet, summary.json (and
    shards/ while a sharded run is under way)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Where scoring runs: in process (default) or on Ray actors; shard size for resumable runs."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mechsieve.scorers.registry import available

    p.add_argument("--method", help=f"one of: {', '.join(available())} (default nait)")
    add_data_flags(p)
    p.add_argument("--target", help="in-domain examples of the target capability; several files separated by "
                   "commas are several capabilities (union)")
    p.add_argument("--target-format", help="format of the target files (default auto)")
    p.add_argument("--target-field-map", metavar="KEY=COL,...", help="columns of the target for format=mapping")
    p.add_argument("--target-limit", type=int, help="read at most this many target records per file")
    p.add_argument("--budget", help="fraction (0.1, default), count (70), threshold ('score>=0.5') or full")
    p.add_argument("--order", choices=["auto", "top", "bottom"], help="which end of the scores (default: method's)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--out", "--output_dir", help="output folder (default runs/select)")
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


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import ConfigError
    from mechsieve.data.readers import read_pool
    from mechsieve.data.writers import subset_filename
    from mechsieve.scorers.base import ScorerError
    from mechsieve.select import SelectionError, parse_budget, select_examples, write_selection
    from mechsieve.store.outputs import OutputFolder

    flags = {**model_flags(args), **data_flags(args), **data_flags(args, "target", "target"),
             "method": args.method, "budget": args.budget, "order": args.order, "seed": args.seed, "out": args.out,
             **engine_flags(args)}
    cfg = build_config(SelectCommand, args, flags)
    # settings and the output folder first: a typo fails before a large pool is read or a model loaded
    cls = scorer_class(cfg.method, cfg.scorer)
    check_budget(cfg.budget)
    check_engine(cfg.engine, cls)
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    pool = read_pool(cfg.data)
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
    if cls.needs_model:
        from mechsieve.models.loading import load_model

        loaded = load_model(cfg.model)
    order = None if cfg.order == "auto" else cfg.order
    folder.claim([subset_filename(pool), "scores.parquet", "summary.json", "shards"])
    try:
        if cfg.engine.sharded:
            from mechsieve.engine import select_pool

            sel = select_pool(cfg.method, pool, cfg.budget, target=target, model=loaded, seed=cfg.seed,
                              settings=cfg.scorer, order=order, engine=cfg.engine, folder=Path(cfg.out) / "shards",
                              progress=not args.quiet)
        else:
            sel = select_examples(cfg.method, pool, cfg.budget, target=target, loaded=loaded, seed=cfg.seed,
                                  settings=cfg.scorer, progress=not args.quiet, order=order)
    except (SelectionError, ScorerError) as err:
        raise ConfigError(str(err)) from None
    extra = {"model": loaded.identity if loaded is not None else None,
             "target": {"path": cfg.target.path, "examples": len(target),
                        "fingerprint": target.fingerprint()} if target is not None else None}
    paths = write_selection(pool, sel, cfg.out, extra)
    folder.finish()
    counts = sel.counts_by_source(pool)
    total = pool.counts_by_source()
    engine = sel.settings.get("engine")
    if engine and "shards" in engine:
        print(f"engine {engine['executor']}: {engine['shards']} shards of {engine['shard_size']} "
              f"({engine['resumed']} resumed from an earlier run)")
    print(f"{cfg.method}: selected {len(sel.ids)} of {len(pool)} ({cfg.budget}, {sel.settings['order']}) "
          f"in {sel.timings.get('score_total', 0.0):.1f} s; by source:")
    for source, count in counts.items():
        print(f"  {source:<24} {count:>6} / {total[source]}")
    print_outputs(paths)
    return 0
