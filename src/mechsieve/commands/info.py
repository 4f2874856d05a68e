"""`mechsieve info`: hook points of a model and statistics of a dataset."""

from __future__ import annotations

import argparse
import json

import numpy as np

from mechsieve.commands._common import add_data_flags, data_flags

NAME = "info"
HELP = "show a model's hook points and a dataset's records, formats and token lengths"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder, hub id or smollm2-135m-instruct; shows its hook points")
    add_data_flags(p)
    p.add_argument("--max-len", "--max_length", type=int, default=512,
                   help="max_len used to count truncations (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import ConfigError

    if not args.model and not args.pool:
        raise ConfigError("give --model and/or --pool")
    out: dict = {}
    loaded = None
    if args.model:
        from mechsieve.models.hooks import describe
        from mechsieve.models.loading import load_model

        loaded = load_model(args.model)
        out["model"] = {"name": args.model, "identity": loaded.identity, **describe(loaded.model)}
    if args.pool:
        from mechsieve.data.readers import DataConfig, read_pool

        flags = data_flags(args)
        cfg = DataConfig(**{k.split(".", 1)[1]: v for k, v in flags.items()})
        pool = read_pool(cfg)
        info = {"path": pool.path, "container": pool.container, "format": pool.format,
                "records": len(pool), "skipped_invalid": len(pool.skipped),
                "renamed_duplicate_ids": pool.duplicate_ids, "sources": pool.counts_by_source(),
                "fingerprint": pool.fingerprint()}
        if loaded is not None:
            from mechsieve.data.render import RenderConfig, render_pool

            rendered, stats = render_pool(pool.examples, loaded.tokenizer, RenderConfig(max_len=1 << 30))
            lengths = np.array([len(r) for r in rendered])
            resp = np.array([int(r.response_mask.sum()) for r in rendered])
            info["tokens"] = _describe(lengths)
            info["response_tokens"] = _describe(resp)
            info[f"longer_than_{args.max_len}"] = int((lengths > args.max_len).sum())
        else:
            chars = np.array([len(ex.response) + sum(len(m["content"]) for m in ex.prompt) for ex in pool.examples])
            info["characters"] = _describe(chars)
            info["note"] = "pass --model to count tokens"
        out["data"] = info
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        _print(out)
    return 0


def _describe(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "max": int(values.max()), "total": int(values.sum())}


def _print(data: dict, indent: int = 0) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            print(" " * indent + f"{key}:")
            _print(value, indent + 2)
        else:
            print(" " * indent + f"{key}: {value}")
