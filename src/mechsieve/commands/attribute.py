"""`mechsieve attribute`: rank the training examples of a pool by how much they drive a behaviour.

Methods: vector-filter, projection-diff, concept-influence (concept from `--concept POS NEG`),
influence, grad-sim (queries from `--query Q`, else the concept's positive file). Writes a ranked
table (id, score, rank[, label]), a JSON summary (settings, wall time, metrics when labels are
given) and, with `--remove-top F`, the pool without its top fraction (the filtered training set).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_model_flags,
    build_config,
    data_flags,
    model_flags,
    print_outputs,
)
from mechsieve.data.readers import DataConfig
from mechsieve.models.loading import ModelConfig

NAME = "attribute"
HELP = "rank training examples by their attribution to a concept or to query examples"
METHODS = ("vector-filter", "projection-diff", "concept-influence", "influence", "grad-sim")


@dataclass
class AttributeCommand:
    """Settings of `mechsieve attribute`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "vector-filter"
    """One of vector-filter, projection-diff, concept-influence, influence, grad-sim."""
    scorer: dict[str, Any] = field(default_factory=dict)
    """Settings of the method (e.g. probe.layer, damping, track_blocks); see its config class."""
    out: str = "runs/attribute"
    """Output folder."""
    remove_top: float = 0.0
    """Also write the pool without its top fraction (0: do not)."""
    label_field: str = ""
    """Record field marking known behaviour carriers (truthy = yes): adds a label column and metrics."""
    seed: int = 0
    """Seed of sampling (projection-diff), query choice and projections."""

    def __post_init__(self) -> None:
        from mechsieve.config import ConfigError, check_choice

        check_choice("method", self.method, METHODS)
        if not 0.0 <= self.remove_top < 1.0:
            raise ConfigError(f"remove_top={self.remove_top} must be in [0, 1)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--method", choices=METHODS, help="attribution method (default vector-filter)")
    p.add_argument("--concept", nargs=2, metavar=("POS", "NEG"),
                   help="data files of behaviour-showing and behaviour-free examples")
    p.add_argument("--concept-dir", help="a saved concept folder instead of --concept")
    p.add_argument("--query", help="data file of query examples (influence, grad-sim; default: POS)")
    p.add_argument("--layer", type=int, help="concept layer (block index, negative from the end)")
    p.add_argument("--out", help="output folder (default runs/attribute)")
    p.add_argument("--remove-top", type=float, help="write the pool without its top fraction, e.g. 0.1")
    p.add_argument("--label-field", help="record field with known labels, for AUC-PR / precision@k")
    p.add_argument("--seed", type=int)
    add_config_flags(p)


def run(args: argparse.Namespace) -> int:
    import sys

    from mechsieve.scorers.base import ScorerError

    try:
        return _run(args)
    except (ScorerError, ImportError) as err:  # no concept / queries / kronfluence: say what to do
        print(f"mechsieve attribute: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from mechsieve.data.readers import read_pool
    from mechsieve.data.writers import subset_filename, write_jsonl, write_subset
    from mechsieve.evaluate.attribution import attribution_metrics, ranks
    from mechsieve.models.loading import load_model
    from mechsieve.scorers.registry import make_scorer
    from mechsieve.store import write_json

    flags = {**model_flags(args), **data_flags(args), "method": args.method, "out": args.out,
             "remove_top": args.remove_top, "label_field": args.label_field, "seed": args.seed,
             "scorer.query": args.query, "scorer.concept_dir": args.concept_dir,
             "scorer.probe.layer": args.layer}
    if args.concept:
        flags["scorer.positive"], flags["scorer.negative"] = args.concept
    cfg = build_config(AttributeCommand, args, flags)
    pool = read_pool(cfg.data)
    scorer = make_scorer(cfg.method, cfg.scorer)
    loaded = load_model(cfg.model)
    start = time.perf_counter()
    result = scorer.score(pool, loaded=loaded, seed=cfg.seed, progress=not args.quiet)
    wall = time.perf_counter() - start
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = ranks(result.scores)
    labels = None
    if cfg.label_field:
        labels = np.array([bool(ex.meta.get(cfg.label_field)) for ex in pool.examples])
    rows = [{"id": ex.id, "score": float(s), "rank": int(r), **({"label": bool(labels[i])} if labels is not None else {})}
            for i, (ex, s, r) in enumerate(zip(pool.examples, result.scores, rank))]
    rows.sort(key=lambda row: row["rank"])
    table = write_jsonl(out / "ranking.jsonl", rows)
    summary: dict[str, Any] = {"method": cfg.method, "settings": scorer.settings(), "pool": pool.path,
                               "examples": len(pool), "wall_s": round(wall, 3),
                               "timings": result.timings, "details": result.explanations}
    if labels is not None:
        summary["metrics"] = attribution_metrics(result.scores, labels, ks=(10, 40, 100))
    outputs: dict[str, Path | str] = {"ranking": table, "summary": out / "summary.json"}
    if cfg.remove_top:
        k = int(round(cfg.remove_top * len(pool)))
        top = {row["id"] for row in rows[:k]}
        kept = [ex.id for ex in pool.examples if ex.id not in top]
        outputs["filtered pool"] = write_subset(pool, kept, out / subset_filename(pool, "filtered"))
        summary["removed"] = k
    write_json(out / "summary.json", summary)
    print(f"{cfg.method}: scored {len(pool)} examples from {pool.path} in {wall:.1f} s")
    if result.explanations.get("concept_dir"):
        outputs["concept"] = result.explanations["concept_dir"]
        sep = result.explanations.get("separation")
        print(f"concept at block {result.explanations['layer']}"
              + (f", held-out separation (AUC-ROC) {sep:.3f}" if sep is not None else ""))
    if labels is not None:
        m = summary["metrics"]
        print(f"AUC-PR {m['auc_pr']:.3f} (base rate {m['base_rate']:.3f}) over {m['positives']} labelled examples")
    print_outputs(outputs)
    return 0
