"""`mechsieve mask-tokens`: XTF token masks of a pool, written as a tokenized training set.

A shell over `mechsieve.tokens.pipeline` (`mask_examples`, `mask_examples_sharded`,
`write_masked`; the module docstring there describes the output folder's columns and
summary.json). `mechsieve train --pool DIR` trains on the folder directly; its Parquet copy,
DIR/parquet/train.parquet, is what `datasets.load_dataset("parquet", data_files=...)` and
`trl sft --dataset_name DIR/parquet` read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_engine_flags,
    add_model_flags,
    add_overwrite_flag,
    build_config,
    check_engine,
    data_flags,
    engine_flags,
    model_flags,
    print_outputs,
    read_data,
    resolve_stream,
)
from mechsieve.data.readers import DataConfig
from mechsieve.data.render import RenderConfig
from mechsieve.engine.base import EngineConfig
from mechsieve.models.loading import ModelConfig
from mechsieve.tokens.excess_loss import ExcessLossConfig
from mechsieve.tokens.xtf import XtfConfig

NAME = "mask-tokens"
HELP = "mask noisy response tokens (XTF: reasoning importance, knowledge novelty, task relevance)"


@dataclass
class MaskTokensCommand:
    """Settings of `mechsieve mask-tokens`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    masker: Literal["xtf", "excess-loss"] = "xtf"
    """`xtf` (its `xtf` settings) or `excess-loss` (its `excess_loss` settings; needs `target`, the
    clean in-domain set its reference is fitted on, unless excess_loss.reference names one)."""
    xtf: XtfConfig = field(default_factory=XtfConfig)
    excess_loss: ExcessLossConfig = field(default_factory=ExcessLossConfig)
    target: DataConfig = field(default_factory=DataConfig)
    """Clean in-domain examples: the domain of XTF's contextual task relevance (robust preset), and
    what excess-loss fits its reference model on."""
    out: str = "runs/mask-tokens"
    """Output folder: the tokenized dataset and summary.json."""
    top: int = 5
    """How many of the most-masked examples summary.json shows."""
    parquet: bool = True
    """Also write the dataset as parquet/train.parquet (same columns), which `datasets.load_dataset`
    and `trl sft --dataset_name OUT/parquet` read; neither reads the save_to_disk folder itself."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Where token scoring runs: in process (default) or on Ray actors; the masks are decided on
    the driver (TR's thresholds are over every token of the pool)."""
    feature_cache: bool = True
    """In process: keep the per-token features (NLL, relevance, received attention) in
    $MECHSIEVE_CACHE/features, so a rerun with other decision settings (rule, caps, keep) runs no
    model pass; false: compute them every time."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--out", "--output_dir", help="output folder (default runs/mask-tokens)")
    add_overwrite_flag(p)
    p.add_argument("--domain", choices=["math", "code", "medicine"], help="built-in word list for task relevance")
    p.add_argument("--words-file", help="your own word list for task relevance (one word a line)")
    p.add_argument("--masker", choices=["xtf", "excess-loss"], help="xtf (default) or excess-loss (needs --target)")
    p.add_argument("--preset", choices=["robust", "paper"], help="XTF's rules: robust (default) or the paper's")
    p.add_argument("--target", help="clean in-domain examples (the domain of contextual task relevance)")
    p.add_argument("--attributes", help="comma-separated subset of ri,kn,tr (default: the preset's)")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="compute the per-token features every time (default: cached, reused by a rerun)")
    p.add_argument("--ri-layers", choices=["all", "last", "middle"],
                   help="attention of all layers, the last, or the middle half (default: the preset's)")
    p.add_argument("--max-len", "--max_length", type=int, help="longest rendered example (tokens)")
    add_engine_flags(p)
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import ConfigError, to_dict
    from mechsieve.data.readers import read_pool
    from mechsieve.models.loading import load_model, load_tokenizer, resolve_model_path
    from mechsieve.store.outputs import OutputFolder
    from mechsieve.tokens.pipeline import (
        PARQUET,
        mask_examples,
        mask_examples_sharded,
        run_masker,
        write_masked,
    )
    from mechsieve.tokens.xtf import bundled_words, parse_word_list

    flags = {**model_flags(args), **data_flags(args), **data_flags(args, "target", "target"), "out": args.out,
             "masker": args.masker, "xtf.preset": args.preset, "xtf.domain": args.domain,
             "xtf.words_file": args.words_file, "xtf.ri_layers": args.ri_layers,
             "xtf.attributes": args.attributes.split(",") if args.attributes else None,
             "render.max_len": args.max_len, "feature_cache": args.feature_cache, **engine_flags(args)}
    cfg = build_config(MaskTokensCommand, args, flags)
    resolve_stream(cfg)
    check_engine(cfg.engine)
    if cfg.masker == "excess-loss":
        if not (cfg.target.path or cfg.excess_loss.reference):
            raise ConfigError("--masker excess-loss fits its reference model on clean in-domain examples: give "
                              "--target FILE (or excess_loss.reference, a model or adapter folder)")
        if cfg.engine.sharded:
            raise ConfigError("--masker excess-loss runs in process: drop --engine / --shard-size / --stream "
                              "(a pool above engine.stream_above_mb streams unless --no-stream)")
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    if cfg.xtf.words_file:
        words = parse_word_list(Path(cfg.xtf.words_file).read_text(encoding="utf-8"))
    else:
        words = bundled_words(cfg.xtf.domain)
    pool = read_data(cfg, progress=not args.quiet)
    if pool.skipped:
        print(f"skipped {len(pool.skipped)} invalid record(s); first: {pool.skipped[0]}")
    target = read_pool(cfg.target).examples if cfg.target.path else None
    if cfg.engine.executor == "ray":  # the actors load the model; here only the tokenizer
        model, tokenizer, identity = cfg.model, load_tokenizer(cfg.model), resolve_model_path(cfg.model)[1]
    else:
        model = load_model(cfg.model)
        tokenizer, identity = model.tokenizer, model.identity
    # the dataset's files (data-*.arrow among them) are recorded as they appear
    folder.claim(["dataset_info.json", "state.json", "summary.json", "shards", "parquet"])
    cache = None
    if cfg.feature_cache and not cfg.engine.sharded:
        from mechsieve.models.loading import cache_root
        from mechsieve.store.features import FeatureCache

        cache = FeatureCache(cache_root())
    if cfg.masker == "excess-loss":
        from mechsieve.tokens.excess_loss import ExcessLoss

        masker = ExcessLoss(cfg.excess_loss)
        if cfg.excess_loss.reference:
            masker.load_reference(model)
        else:
            masker.fit_reference(model, target, cfg.render, progress=not args.quiet)
        result = run_masker(masker, model, pool.examples, cfg.render, progress=not args.quiet, cache=cache)
    elif cfg.engine.sharded:
        result = mask_examples_sharded(model, pool.examples, cfg.xtf, cfg.render, words, cfg.engine,
                                       Path(cfg.out) / "shards", tokenizer, progress=not args.quiet, target=target)
    else:
        result = mask_examples(model, pool.examples, cfg.xtf, cfg.render, words=words, progress=not args.quiet,
                               target=target, cache=cache)
    settings = {"command": to_dict(cfg), "model": identity, "pool": str(pool.path),
                "pool_fingerprint": pool.fingerprint(), "words": len(words),
                "target": {"path": cfg.target.path, "examples": len(target)} if target else None}
    summary = write_masked(cfg.out, result, tokenizer, settings, top=cfg.top, parquet=cfg.parquet)
    folder.finish()
    print(f"read {len(pool)} examples ({pool.format}) from {pool.path}; {result.render_summary}")
    engine = result.scores.info.get("engine")
    if engine and "shards" in engine:
        print(f"engine {engine['executor']}: {engine['shards']} shards of {engine['shard_size']} "
              f"({engine['resumed']} resumed from an earlier run)")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in summary["masked_share"].items())
    print(f"masked {summary['masked_tokens']['union']} of {summary['eligible_tokens']} response tokens "
          f"({shares}) in {result.seconds} s")
    outputs: dict[str, Path | str] = {"dataset": cfg.out, "summary": Path(cfg.out) / "summary.json"}
    if cfg.parquet:
        outputs["parquet"] = Path(cfg.out) / PARQUET
    print_outputs(outputs)
    return 0
