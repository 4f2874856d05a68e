"""`mechsieve capture`: activations of a pool, reduced per example, saved resumably."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from mechsieve.capture.activations import CaptureConfig
from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_engine_flags,
    add_model_flags,
    build_config,
    check_engine,
    data_flags,
    engine_flags,
    int_list,
    model_flags,
    print_outputs,
    read_data,
    resolve_stream,
)
from mechsieve.data.readers import DataConfig
from mechsieve.data.render import RenderConfig
from mechsieve.engine.base import EngineConfig
from mechsieve.models.loading import ModelConfig

NAME = "capture"
HELP = "capture per-example activations (residual stream or MLP neurons) of a pool"


@dataclass
class CaptureCommand:
    """Settings of `mechsieve capture`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    out: str = "runs/capture"
    """Output folder: activations.safetensors + activations.json (chunks while running)."""
    overwrite: bool = False
    """Recompute even if the folder holds a finished or partial capture (else: reuse / resume)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """In process (default) or on Ray actors; with a shard size, shards under OUT/shards resume."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--out", "--output_dir", help="output folder (default runs/capture)")
    p.add_argument("--layers", help="'all' or comma-separated block indices, e.g. 0,15,-1")
    p.add_argument("--site", choices=["resid", "mlp"], help="residual stream (default) or MLP neurons")
    p.add_argument("--reductions", help="comma-separated: last_prompt,mean_response,mean_prompt,mean_all,last,drift")
    p.add_argument("--max-len", "--max_length", type=int,
                   help="longest rendered example (tokens); longer ones are cut and counted")
    p.add_argument("--max-tokens", type=int, help="token budget of one batch")
    p.add_argument("--overwrite", action="store_true", help="recompute from scratch")
    add_engine_flags(p)
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    from mechsieve.capture.activations import capture_pool
    from mechsieve.models.loading import load_model
    from mechsieve.store.outputs import OutputFolder

    flags = {**model_flags(args), **data_flags(args), "out": args.out,
             "capture.layers": int_list(args.layers) if args.layers else None,
             "capture.site": args.site,
             "capture.reductions": args.reductions.split(",") if args.reductions else None,
             "render.max_len": args.max_len, "capture.max_tokens": args.max_tokens,
             "overwrite": True if args.overwrite else None, **engine_flags(args)}
    cfg = build_config(CaptureCommand, args, flags)
    resolve_stream(cfg)
    check_engine(cfg.engine)
    # a capture resumes its chunks and reuses a finished capture: its own folder needs no --overwrite
    folder = OutputFolder(cfg.out, NAME, resumes=True)
    pool = read_data(cfg, progress=not args.quiet)
    if pool.skipped:
        print(f"skipped {len(pool.skipped)} invalid record(s); first: {pool.skipped[0]}")
    entries = ["activations.safetensors", "activations.json", "activations.run.json", "chunks", "shards"]
    if cfg.engine.sharded:
        from dataclasses import replace

        from mechsieve.engine import capture_sharded

        # Ray actors load their own copies: the driver only loads the model for a local run
        model = cfg.model if cfg.engine.executor == "ray" else load_model(cfg.model)
        engine = replace(cfg.engine, overwrite=cfg.engine.overwrite or cfg.overwrite)
        folder.claim(entries)
        result, report = capture_sharded(model, pool, cfg.capture, cfg.render, cfg.out, engine,
                                         progress=not args.quiet, overwrite=cfg.overwrite)
        if "shards" in report["engine"]:
            e = report["engine"]
            print(f"engine {e['executor']}: {e['shards']} shards of {e['shard_size']} ({e['resumed']} resumed)")
    else:
        loaded = load_model(cfg.model)
        folder.claim(entries)
        result, report = capture_pool(loaded, pool, cfg.capture, cfg.render, out_dir=cfg.out,
                                      overwrite=cfg.overwrite, progress=not args.quiet)
    folder.finish()
    s = result.summary()
    print(f"read {len(pool)} examples ({pool.format}) from {pool.path}; {report['render']}")
    if report.get("cached"):
        print("a finished capture with the same settings was already there: reused it")
    else:
        print(f"captured {s['reductions']} at {len(s['layers'])} layer(s), d={s['d']}: "
              f"{s['tokens']} tokens in {s['seconds']} s ({s['tokens_per_s']} tok/s), "
              f"padding efficiency {s['padding_efficiency']}"
              + (f", {s['resumed_examples']} examples resumed from chunks" if s["resumed_examples"] else ""))
    print_outputs({"activations": Path(cfg.out) / "activations.safetensors",
                   "settings": Path(cfg.out) / "activations.json"})
    return 0
