"""`mechsieve experiment`: selection methods against random and full data, over seeds."""

from __future__ import annotations

import argparse

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_model_flags,
    build_config,
    data_flags,
    model_flags,
    print_outputs,
)

NAME = "experiment"
HELP = "for each method and seed: select, fine-tune with equal steps, evaluate; table + JSON/CSV/PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--methods", help="comma-separated selection methods, e.g. random,full,nait")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--budget", help="fraction (0.1) or count (200) each method selects")
    p.add_argument("--steps", "--max_steps", type=int, help="optimizer steps of every run (equal training budget)")
    p.add_argument("--out", "--output_dir", help="output folder (default runs/experiment)")
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    import yaml

    from mechsieve.experiment import ExperimentConfig, run_experiment
    from mechsieve.experiment.report import format_table, is_primary, metric_columns, summarize

    flags = {**model_flags(args), **data_flags(args, key="pool"), "out": args.out, "steps": args.steps,
             "methods": [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
             "seeds": [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None,
             "budget": yaml.safe_load(args.budget) if args.budget else None}
    cfg = build_config(ExperimentConfig, args, flags)
    result = run_experiment(cfg, progress=not args.quiet)
    summary = summarize(result.rows)
    columns = metric_columns(result.rows)
    print()
    print(format_table(summary, [c for c in columns if is_primary(c, cfg)] or columns))
    hits = result.cache_hits
    print(f"equal training budget: {result.steps} optimizer steps per run (from {result.steps_from})")
    print(f"reused from cache: {hits['selection']} selection(s), {hits['train']} training run(s), "
          f"{hits['eval']} evaluation(s)")
    print_outputs({k: v for k, v in result.outputs.items()})
    return 0
