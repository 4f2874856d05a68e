"""`mechsieve evaluate`: task metrics of a base model, or of it with a trained adapter; and
lm-evaluation-harness tasks on the same model (`--lm-eval`, the `eval` extra)."""

from __future__ import annotations

import argparse
import json
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
from mechsieve.evaluate.lm_eval_bridge import LmEvalConfig
from mechsieve.evaluate.tasks import TaskConfig
from mechsieve.models.loading import ModelConfig

NAME = "evaluate"
HELP = "held-out loss, exact match, multiple choice, ROUGE-L, chrF or lm-eval tasks of a model (+ adapter)"


@dataclass
class EvaluateCommand:
    """Settings of `mechsieve evaluate`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: str = ""
    """Folder `mechsieve train` wrote (LoRA adapter or full model); empty: the base model."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Evaluations, e.g. [{task: exact_match, data: {path: gsm8k/test.jsonl, limit: 200}}]."""
    render: RenderConfig = field(default_factory=RenderConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    """lm-evaluation-harness tasks run on the same model (+ adapter); results in lm_eval.json."""
    out: str = "runs/evaluate"
    """Output folder: metrics.json (and outputs.json with per-example predictions); lm_eval.json."""


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
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="lm-evaluation-harness tasks, comma-separated (arc_easy,hellaswag; names in "
                        "--lm-eval-include; YAML paths), run on the model + adapter (pip install 'mechsieve[eval]')")
    p.add_argument("--lm-eval-include", metavar="FOLDER", help="folder of local lm-eval task YAMLs")
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="lm-eval: first N documents per task (default all)")
    p.add_argument("--lm-eval-fewshot", type=int, metavar="K",
                   help="lm-eval: few-shot examples per prompt (default: each task's own)")
    p.add_argument("--out", "--output_dir", help="output folder (default runs/evaluate)")
    add_overwrite_flag(p)
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import ConfigError
    from mechsieve.evaluate.lm_eval_bridge import run_lm_eval, summary_lines, task_manager
    from mechsieve.evaluate.tasks import evaluate_task
    from mechsieve.models.loading import load_model
    from mechsieve.store.atomic import write_json, write_text
    from mechsieve.store.outputs import OutputFolder
    from mechsieve.train import load_adapter

    flags: dict = {**model_flags(args), "out": args.out, "adapter": args.adapter,
                   "lm_eval.tasks": [t.strip() for t in args.lm_eval.split(",") if t.strip()] if args.lm_eval else None,
                   "lm_eval.include": args.lm_eval_include, "lm_eval.limit": args.lm_eval_limit,
                   "lm_eval.num_fewshot": args.lm_eval_fewshot}
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
    if not cfg.tasks and not cfg.lm_eval.tasks:
        raise ConfigError("no task: give --task and --data, --lm-eval TASKS, or a config file with a `tasks` list")
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    # lm-eval task names are checked before the model loads and the other tasks run.
    lm_tasks = task_manager(cfg.lm_eval) if cfg.lm_eval.tasks else None
    loaded = load_model(cfg.model)
    if cfg.adapter:
        load_adapter(loaded, cfg.adapter)
    results = []
    for task in cfg.tasks:
        res = evaluate_task(loaded, task, cfg.render, progress=not args.quiet, keep_outputs=True)
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res["metrics"].items())
        print(f"{res['name']} ({res['task']}, {res['data']}): {shown}  [{res['seconds']:.1f} s]")
        results.append(res)
    lm_run = None
    if cfg.lm_eval.tasks:
        lm_run = run_lm_eval(loaded, cfg.lm_eval, progress=not args.quiet, adapter=cfg.adapter, tasks=lm_tasks)
        for line in summary_lines(lm_run.results):
            print(line)
    files = (["metrics.json", "outputs.json"] if cfg.tasks else []) + \
        (["lm_eval.json"] if lm_run else []) + (["lm_eval_samples.jsonl"] if cfg.lm_eval.log_samples else [])
    out = folder.claim(files)
    written: dict = {}
    if cfg.tasks:
        write_json(out / "metrics.json", {"model": loaded.identity, "adapter": cfg.adapter or None,
                                          "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]})
        write_json(out / "outputs.json", {r["name"]: r.get("outputs", {}) for r in results})
        written.update({"metrics": out / "metrics.json", "predictions": out / "outputs.json"})
    if lm_run is not None:
        write_json(out / "lm_eval.json", lm_run.results)
        written["lm-eval"] = out / "lm_eval.json"
        if cfg.lm_eval.log_samples:
            write_text(out / "lm_eval_samples.jsonl",
                       "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in lm_run.samples))
            written["lm-eval samples"] = out / "lm_eval_samples.jsonl"
    folder.finish()
    print_outputs(written)
    return 0
