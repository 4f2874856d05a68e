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
    add_overwrite_flag,
    build_config,
    data_flags,
    model_flags,
    print_outputs,
    scorer_class,
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
    """Record field marking known behaviour carriers (1/true/yes, or 0/false/no; any other value is
    refused): adds a label column and metrics."""
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
    p.add_argument("--out", "--output_dir", help="output folder (default runs/attribute)")
    add_overwrite_flag(p)
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

    from mechsieve.data.readers import read_pool
    from mechsieve.data.writers import subset_filename, write_jsonl, write_subset
    from mechsieve.evaluate.attribution import attribution_metrics, ranks
    from mechsieve.models.loading import load_model
    from mechsieve.scorers.registry import make_scorer
    from mechsieve.store import write_json
    from mechsieve.store.outputs import OutputFolder

    flags = {**model_flags(args), **data_flags(args), "method": args.method, "out": args.out,
             "remove_top": args.remove_top, "label_field": args.label_field, "seed": args.seed,
             "scorer.query": args.query, "scorer.concept_dir": args.concept_dir,
             "scorer.probe.layer": args.layer}
    if args.concept:
        flags["scorer.positive"], flags["scorer.negative"] = args.concept
    cfg = build_config(AttributeCommand, args, flags)
    # settings and the output folder first: a typo fails before a large pool is read or a model loaded
    scorer_class(cfg.method, cfg.scorer)
    scorer = make_scorer(cfg.method, cfg.scorer)
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    pool = read_pool(cfg.data)
    labels = read_labels(pool, cfg.label_field) if cfg.label_field else None
    loaded = load_model(cfg.model)
    out = folder.claim(["ranking.jsonl", "summary.json", subset_filename(pool, "filtered")])
    start = time.perf_counter()
    result = scorer.score(pool, loaded=loaded, seed=cfg.seed, progress=not args.quiet)
    wall = time.perf_counter() - start
    rank = ranks(result.scores)
    rows = [{"id": ex.id, "score": float(s), "rank": int(r), **({"label": bool(labels[i])} if labels is not None else {})}
            for i, (ex, s, r) in enumerate(zip(pool.examples, result.scores, rank))]
    rows.sort(key=lambda row: row["rank"])
    table = write_jsonl(out / "ranking.jsonl", rows)
    summary: dict[str, Any] = {"method": cfg.method, "settings": scorer.settings(), "pool": pool.path,
                               "examples": len(pool), "wall_s": round(wall, 3),
                               "timings": result.timings, "details": result.explanations}
    if labels is not None:
        summary["metrics"] = attribution_metrics(result.scores, labels, ks=(10, 40, 100), method=cfg.method)
    outputs: dict[str, Path | str] = {"ranking": table, "summary": out / "summary.json"}
    if cfg.remove_top:
        k = int(round(cfg.remove_top * len(pool)))
        top = {row["id"] for row in rows[:k]}
        kept = [ex.id for ex in pool.examples if ex.id not in top]
        outputs["filtered pool"] = write_subset(pool, kept, out / subset_filename(pool, "filtered"))
        summary["removed"] = k
    write_json(out / "summary.json", summary)
    folder.finish()
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


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_label(value: Any) -> bool | None:
    """1/true/yes -> True, 0/false/no -> False (strings in any case, bools, the numbers 0 and 1);
    None for anything else."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        text = value.strip().lower()
        return True if text in _TRUE else False if text in _FALSE else None
    return None


def read_labels(pool: Any, field: str) -> Any:
    """[n] bool labels of the pool's examples from record field `field`; a value that is not a
    label (a CSV's "2" or "maybe", a missing field) is refused, naming its line and example."""
    import numpy as np

    from mechsieve.data.readers import DataError

    missing = object()
    labels = []
    for ex in pool.examples:
        value = ex.meta.get(field, missing)
        label = None if value is missing else parse_label(value)
        if label is None:
            if value is missing:
                if not any(field in e.meta for e in pool.examples):
                    found = sorted({k for e in pool.examples for k in e.meta} - {"row"})
                    raise DataError(f"{pool.path}: no record has the field {field!r} given as --label-field; "
                                    f"the records' other fields: {', '.join(found) or 'none'}")
                problem = f"has no field {field!r}"
            else:
                problem = f"has {field}={value!r}"
            raise DataError(f"{_where(pool, ex)}: example {ex.id!r} {problem}, which is not a label (--label-field "
                            f"{field}); give 1/true/yes or 0/false/no")
        labels.append(label)
    return np.array(labels, dtype=bool)


def _where(pool: Any, ex: Any) -> str:
    """`file:line` (or `file:row N`) of an example read from a file, else the pool's path."""
    row = ex.meta.get("row")
    if row is None or pool.container == "memory":
        return str(pool.path)
    from mechsieve.data.readers import DataError, iter_raw

    try:
        for loc, r, _ in iter_raw(pool.path, pool.container):
            if r == row:
                return loc
    except (DataError, OSError, ValueError):
        pass
    return f"{pool.path}:row {row}"
