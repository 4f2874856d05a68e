"""`mechsieve mask-tokens`: XTF token masks of a pool, written as a tokenized training set.

The output folder is a `datasets.save_to_disk` dataset with columns input_ids, labels (-100 on
prompt and masked tokens), completion_mask (1 where the loss is taken, what TRL's collator reads),
the per-token scores ri, kn, tr (NaN where not scored), mask_reason (bit flags 1=RI, 2=KN, 4=TR)
and id; plus summary.json (masked share per attribute, overlaps, the most-masked examples).
`mechsieve train --data DIR` trains on it directly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_engine_flags,
    add_model_flags,
    build_config,
    check_engine,
    data_flags,
    engine_flags,
    model_flags,
    print_outputs,
)

NAME = "mask-tokens"
HELP = "mask noisy response tokens (XTF: reasoning importance, knowledge novelty, task relevance)"


@dataclass
class MaskTokensCommand:
    """Settings of `mechsieve mask-tokens`."""

    from mechsieve.data.readers import DataConfig
    from mechsieve.data.render import RenderConfig
    from mechsieve.engine.base import EngineConfig
    from mechsieve.models.loading import ModelConfig
    from mechsieve.tokens.xtf import XtfConfig

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    xtf: XtfConfig = field(default_factory=XtfConfig)
    out: str = "runs/mask-tokens"
    """Output folder: the tokenized dataset and summary.json."""
    top: int = 5
    """How many of the most-masked examples summary.json shows."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Where token scoring runs: in process (default) or on Ray actors; the masks are decided on
    the driver (TR's thresholds are over every token of the pool)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--out", help="output folder (default runs/mask-tokens)")
    p.add_argument("--domain", choices=["math", "code", "medicine"], help="built-in word list for task relevance")
    p.add_argument("--words-file", help="your own word list for task relevance (one word a line)")
    p.add_argument("--attributes", help="comma-separated subset of ri,kn,tr (default all three)")
    p.add_argument("--ri-layers", choices=["all", "last"], help="attention of all layers (default) or the last")
    p.add_argument("--max-len", type=int, help="longest rendered example (tokens)")
    add_engine_flags(p)
    add_config_flags(p)


@dataclass
class MaskRun:
    """Everything one masking run produced, aligned by example."""

    ids: list[str]
    rendered: list[Any]
    scores: Any  # TokenScores
    masks: Any  # TokenMasks
    render_summary: str
    seconds: float


def mask_examples(loaded: Any, examples: Sequence[Any], cfg: Any, render_cfg: Any, words: list[str] | None = None,
                  progress: bool = True) -> MaskRun:
    """Render `examples`, score their tokens with XTF and decide the masks."""
    from mechsieve.data.render import render_pool
    from mechsieve.tokens.xtf import Xtf

    start = time.perf_counter()
    rendered, stats = render_pool(examples, loaded.tokenizer, render_cfg)
    masker = Xtf(cfg, words=words)
    scores, masks = masker.mask(loaded.model, loaded.tokenizer, rendered, progress=progress)
    return MaskRun([ex.id for ex in examples], rendered, scores, masks, stats.summary(),
                   round(time.perf_counter() - start, 2))


def mask_examples_sharded(model: Any, examples: Sequence[Any], cfg: Any, render_cfg: Any, words: list[str],
                          engine: Any, folder: str | Path, tokenizer: Any, progress: bool = True) -> MaskRun:
    """`mask_examples` with the token scores computed shard by shard by the engine (resumable;
    on Ray actors with engine.executor=ray), the masks decided here over the whole pool."""
    from mechsieve.data.render import render_pool
    from mechsieve.engine import token_scores_sharded
    from mechsieve.tokens.xtf import Xtf

    start = time.perf_counter()
    masker = Xtf(cfg, words=words)  # refuses an unusable word list before any shard runs
    rendered, stats = render_pool(examples, tokenizer, render_cfg)
    scores = token_scores_sharded(model, list(examples), cfg, words, render_cfg, folder, engine, progress)
    if [len(e) for e in scores.eligible] != [len(r) for r in rendered]:
        raise RuntimeError("the shards' token scores do not line up with the examples rendered here; "
                           "the workers must use the same tokenizer as the driver")
    return MaskRun([ex.id for ex in examples], rendered, scores, masker.decide(scores), stats.summary(),
                   round(time.perf_counter() - start, 2))


def load_tokenizer(model_cfg: Any) -> Any:
    """Only the tokenizer of `model_cfg` (a Ray run's driver needs no model to render and write)."""
    from transformers import AutoTokenizer

    from mechsieve.models.loading import resolve_model_path

    folder, identity = resolve_model_path(model_cfg)
    extra = {"revision": model_cfg.revision} if identity["kind"] == "hub" and model_cfg.revision else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code, **extra)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_model does
    return tokenizer


def write_masked(out: str | Path, run: MaskRun, tokenizer: Any, settings: dict[str, Any], top: int = 5
                 ) -> dict[str, Any]:
    """Write the tokenized dataset (+ scores) and summary.json to `out`; return the summary."""
    import numpy as np

    from mechsieve.store.atomic import write_json
    from mechsieve.tokens.summary import mask_counts, most_masked
    from mechsieve.train import TrainItem, save_tokenized

    labels = run.masks.labels(run.rendered)
    items = [TrainItem(r.input_ids, lab) for r, lab in zip(run.rendered, labels)]

    def column(values: list[np.ndarray]) -> list[list[float]]:
        return [v.astype(float).tolist() for v in values]

    extra: dict[str, list] = {"id": list(run.ids),
                              "completion_mask": [(lab != -100).astype(int).tolist() for lab in labels],
                              "mask_reason": [r.astype(int).tolist() for r in run.masks.reasons]}
    for name, values in run.scores.scores.items():
        extra[name] = column(values)
    out = Path(out)
    save_tokenized(out, items, extra=extra)
    summary = {"settings": settings, "render": run.render_summary, "seconds": run.seconds,
               "scoring": run.scores.info, "decision": run.masks.info,
               **mask_counts(run.scores, run.masks),
               "most_masked": most_masked(run.ids, run.scores, run.masks, run.rendered, tokenizer, top=top)}
    write_json(out / "summary.json", summary)
    return summary


def run(args: argparse.Namespace) -> int:
    from mechsieve.config import to_dict
    from mechsieve.data.readers import read_pool
    from mechsieve.models.loading import load_model
    from mechsieve.tokens.xtf import bundled_words, parse_word_list

    flags = {**model_flags(args), **data_flags(args), "out": args.out, "xtf.domain": args.domain,
             "xtf.words_file": args.words_file, "xtf.ri_layers": args.ri_layers,
             "xtf.attributes": args.attributes.split(",") if args.attributes else None,
             "render.max_len": args.max_len, **engine_flags(args)}
    cfg = build_config(MaskTokensCommand, args, flags)
    check_engine(cfg.engine)
    if cfg.xtf.words_file:
        words = parse_word_list(Path(cfg.xtf.words_file).read_text(encoding="utf-8"))
    else:
        words = bundled_words(cfg.xtf.domain)
    pool = read_pool(cfg.data)
    if pool.skipped:
        print(f"skipped {len(pool.skipped)} invalid record(s); first: {pool.skipped[0]}")
    if cfg.engine.executor == "ray":  # the actors load the model; here only the tokenizer
        from mechsieve.models.loading import resolve_model_path

        model, tokenizer, identity = cfg.model, load_tokenizer(cfg.model), resolve_model_path(cfg.model)[1]
    else:
        model = load_model(cfg.model)
        tokenizer, identity = model.tokenizer, model.identity
    if cfg.engine.sharded:
        result = mask_examples_sharded(model, pool.examples, cfg.xtf, cfg.render, words, cfg.engine,
                                       Path(cfg.out) / "shards", tokenizer, progress=not args.quiet)
    else:
        result = mask_examples(model, pool.examples, cfg.xtf, cfg.render, words=words, progress=not args.quiet)
    settings = {"command": to_dict(cfg), "model": identity, "pool": str(pool.path),
                "pool_fingerprint": pool.fingerprint(), "words": len(words)}
    summary = write_masked(cfg.out, result, tokenizer, settings, top=cfg.top)
    print(f"read {len(pool)} examples ({pool.format}) from {pool.path}; {result.render_summary}")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in summary["masked_share"].items())
    print(f"masked {summary['masked_tokens']['union']} of {summary['eligible_tokens']} response tokens "
          f"({shares}) in {result.seconds} s")
    print_outputs({"dataset": cfg.out, "summary": Path(cfg.out) / "summary.json"})
    return 0
