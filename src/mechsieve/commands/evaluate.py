"""`mechsieve evaluate`: task metrics of a base model, or of it with a trained adapter."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_model_flags,
    add_overwrite_flag,
    build_config,
    data_flags,
    model_flags,
    print_outputs,
)
from mechsieve.data.render import RenderConfig
from mechsieve.evaluate.tasks import TaskConfig
from mechsieve.models.loading import ModelConfig

NAME = "evaluate"
HELP = "held-out loss, exact match, multiple choice, ROUGE-L or chrF of a model (+ adapter)"


@dataclass
class EvaluateCommand:
    """Settings of `mechsieve evaluate`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: str = ""
    """Folder `mechsieve train` wrote (LoRA adapter or full model); empty: the base model."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Evaluations, e.g. [{task: exact_match, data: {path: gsm8k/test.jsonl, limit: 200}}]."""
    render: RenderConfig = field(default_factory=RenderConfig)
    out: str = "runs/evaluate"
    """Output folder: metrics.json (and outputs.json with per-example predictions)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--adapter", help="folder written by `mechsieve train` (default: evaluate the base model)")
    p.add_argument("--task", choices=["loss", "exact_match", "multiple_choice", "rouge", "chrf"],
                   help="one task on --pool (more tasks: a config file's `tasks` list)")
    add_data_flags(p)
    p.add_argument("--name", help="label of the task in the output")
    p.add_argument("--max-new-tokens", type=int, help="generation tasks: longest answer (default 256)")
    p.add_argument("--answer", choices=["gsm8k", "math"],
                   help="exact_match: final answers as GSM8K numbers (default), or LaTeX / boxed / fractions "
                        "through math-verify (pip install 'mechsieve[math]')")
    p.add_argument("--out", "--output_dir", help="output folder (default runs/evaluate)")
    add_overwrite_flag(p)
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import ConfigError
    from mechsieve.evaluate.tasks import evaluate_task
    from mechsieve.models.loading import load_model
    from mechsieve.store.atomic import write_json
    from mechsieve.store.outputs import OutputFolder
    from mechsieve.train import load_adapter

    flags: dict = {**model_flags(args), "out": args.out, "adapter": args.adapter}
    if args.task or args.pool:
        if not (args.task and args.pool):
            raise ConfigError("--task and --pool go together (e.g. --task loss --pool test.jsonl)")
        task = {"task": args.task, "data": {k.split(".", 1)[1]: v for k, v in data_flags(args).items()}}
        if args.name:
            task["name"] = args.name
        if args.max_new_tokens:
            task["max_new_tokens"] = args.max_new_tokens
        if args.answer:
            task["answer"] = args.answer
        flags["tasks"] = [task]
    elif args.answer:
        raise ConfigError("--answer goes with --task exact_match and --pool; in a config file, set `answer:` "
                          "in each task of the `tasks` list")
    cfg = build_config(EvaluateCommand, args, flags)
    if not cfg.tasks:
        raise ConfigError("no task: give --task and --data, or a config file with a `tasks` list")
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    loaded = load_model(cfg.model)
    if cfg.adapter:
        load_adapter(loaded, cfg.adapter)
    results = []
    for task in cfg.tasks:
        res = evaluate_task(loaded, task, cfg.render, progress=not args.quiet, keep_outputs=True)
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res["metrics"].items())
        print(f"{res['name']} ({res['task']}, {res['data']}): {shown}  [{res['seconds']:.1f} s]")
        results.append(res)
    out = folder.claim(["metrics.json", "outputs.json"])
    write_json(out / "metrics.json", {"model": loaded.identity, "adapter": cfg.adapter or None,
                                      "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]})
    write_json(out / "outputs.json", {r["name"]: r.get("outputs", {}) for r in results})
    folder.finish()
    print_outputs({"metrics": out / "metrics.json", "predictions": out / "outputs.json"})
    return 0
