"""`mechsieve attribute`: rank the training examples of a pool by how much they drive a behaviour.

Methods: vector-filter, projection-diff, concept-influence (concept from `--concept POS NEG`),
influence, grad-sim (queries from `--query Q`, else the concept's positive file). Writes a ranked
table (id, score, rank[, label]), a JSON summary (settings, wall time, metrics when labels are
given) and, with `--remove-top F [F ...]`, the pool without its top fraction (the filtered training
set): `filtered.*` for one fraction, `filtered-F.*` for each of several.

With `--retrain` as well, the removal experiment (Concept Influence's causal check, see
evaluate/removal.py): the same LoRA is retrained from the base model without the top F and
without `--random-repeats` seeded random draws of F, and every retrained model is measured on
held-out data: the concept score of its own answers to `--heldout-prompts` (the behaviour) and its
loss on `--heldout-answers` (the task). Results: removal.json (read by `mechsieve report`) and a
printed table. Every method needs the concept for that measurement (--concept / --concept-dir).
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
from mechsieve.evaluate.removal import RemovalConfig
from mechsieve.models.loading import ModelConfig
from mechsieve.train.config import TrainConfig

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
    remove_top: float | list[float] = field(default_factory=list)
    """Fractions of the pool to remove from the top of the ranking, e.g. [0.1, 0.2] (a single number
    is one fraction; 0 or []: none): each writes the pool without its top (one fraction: filtered.*,
    several: filtered-F.*), and with `retrain` each is a point of the removal experiment."""
    retrain: bool = False
    """Run the removal experiment on the `remove_top` fractions: retrain the LoRA of `train` from the
    base model without the top / random removals and measure each model (settings: `removal`)."""
    removal: RemovalConfig = field(default_factory=RemovalConfig)
    """The removal experiment: held-out data, random repeats, full-pool baseline, generation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The LoRA (or full) fine-tune every run of the removal experiment retrains, from the base model."""
    label_field: str = ""
    """Record field marking known behaviour carriers (1/true/yes, or 0/false/no; any other value is
    refused): adds a label column and metrics."""
    seed: int = 0
    """Seed of sampling (projection-diff), query choice and projections."""

    def __post_init__(self) -> None:
        from mechsieve.config import ConfigError, check_choice

        check_choice("method", self.method, METHODS)
        fractions = [self.remove_top] if isinstance(self.remove_top, (int, float)) else list(self.remove_top)
        self.remove_top = [float(f) for f in fractions if f != 0]
        for f in self.remove_top:
            if not 0.0 < f < 1.0:
                raise ConfigError(f"remove_top={f} must be in (0, 1): the share of the pool removed from the top")
        if len(set(self.remove_top)) != len(self.remove_top):
            raise ConfigError(f"remove_top={self.remove_top} lists a fraction twice")
        if self.retrain:
            if not self.remove_top:
                raise ConfigError("--retrain retrains without the top of the ranking: give the fractions to remove, "
                                  "e.g. --remove-top 0.1 0.2 (remove_top)")
            self.removal.check_data()

    def concept_given(self) -> bool:
        """Whether the scorer settings name a concept (a saved one, or both contrastive files)."""
        s = self.scorer
        return bool(s.get("concept_dir") or (s.get("positive") and s.get("negative")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--method", choices=METHODS, help="attribution method (default vector-filter)")
    p.add_argument("--concept", nargs=2, metavar=("POS", "NEG"),
                   help="data files of behaviour-showing and behaviour-free examples")
    p.add_argument("--concept-dir", help="a saved concept folder instead of --concept")
    p.add_argument("--query", help="data file of query examples (influence, grad-sim; default: POS)")
    p.add_argument("--layer", "--concept-layer", dest="layer", type=_layer,
                   help="concept layer: a block index (negative from the end), or auto (the block whose held-out "
                        "separation is best; probe scorers only)")
    p.add_argument("--out", "--output_dir", help="output folder (default runs/attribute)")
    add_overwrite_flag(p)
    p.add_argument("--remove-top", type=float, nargs="+", metavar="F",
                   help="write the pool without its top fraction, e.g. 0.1 (several: one pool each, and the "
                   "points of the removal experiment with --retrain)")
    p.add_argument("--retrain", action="store_true",
                   help="removal experiment: retrain the LoRA (train.* settings) without the top F and without "
                   "random F, and measure the concept score and task loss of each model (needs a concept)")
    p.add_argument("--random-repeats", type=int, help="random removals per fraction with --retrain (default 3)")
    p.add_argument("--full-baseline", action="store_true", help="with --retrain, also retrain on the whole pool")
    p.add_argument("--heldout-prompts", metavar="FILE",
                   help="with --retrain: data file whose prompts each retrained model answers (the behaviour)")
    p.add_argument("--heldout-answers", metavar="FILE",
                   help="with --retrain: held-out in-domain examples, for the task loss per answer token")
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
    import sys
    import time
    import warnings

    from mechsieve.config import ConfigError
    from mechsieve.data.readers import read_pool
    from mechsieve.data.writers import write_jsonl, write_subset
    from mechsieve.evaluate.attribution import attribution_metrics, ranks
    from mechsieve.evaluate.prompt_baseline import prompt_only_baseline_for_pool
    from mechsieve.features.probes import ProbeGateWarning
    from mechsieve.models.loading import load_model
    from mechsieve.scorers.registry import make_scorer
    from mechsieve.store import write_json
    from mechsieve.store.outputs import OutputFolder

    flags = {**model_flags(args), **data_flags(args), "method": args.method, "out": args.out,
             "remove_top": args.remove_top, "label_field": args.label_field, "seed": args.seed,
             "scorer.query": args.query, "scorer.concept_dir": args.concept_dir,
             "scorer.probe.layer": args.layer, "retrain": True if args.retrain else None,
             "removal.random_repeats": args.random_repeats,
             "removal.baseline": True if args.full_baseline else None,
             "removal.prompts.path": args.heldout_prompts, "removal.answers.path": args.heldout_answers}
    if args.concept:
        flags["scorer.positive"], flags["scorer.negative"] = args.concept
    cfg = build_config(AttributeCommand, args, flags)
    # settings and the output folder first: a typo fails before a large pool is read or a model loaded
    scorer_class(cfg.method, cfg.scorer)
    if cfg.retrain and not cfg.concept_given():
        raise ConfigError(f"--retrain measures the behaviour of each retrained model as the concept score of its "
                          f"answers, so {cfg.method} needs a concept too: give --concept POS NEG (behaviour-showing "
                          "and behaviour-free data files) or --concept-dir DIR (a saved concept)")
    scorer = make_scorer(cfg.method, cfg.scorer)
    folder = OutputFolder(cfg.out, NAME, overwrite=args.overwrite)
    pool = read_pool(cfg.data)
    labels = read_labels(pool, cfg.label_field) if cfg.label_field else None
    heldout = _read_heldout(cfg) if cfg.retrain else None
    loaded = load_model(cfg.model)
    pools = filtered_names(pool, cfg.remove_top)
    out = folder.claim(["ranking.jsonl", "summary.json", *pools.values(), *(["removal.json"] if cfg.retrain else [])])
    start = time.perf_counter()
    with warnings.catch_warnings():  # the probe gate's warning is printed once, below, with the results
        warnings.simplefilter("ignore", ProbeGateWarning)
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
        summary["prompt_only_baseline"] = prompt_only_baseline_for_pool(pool.examples, labels, seed=cfg.seed)
    outputs: dict[str, Path | str] = {"ranking": table, "summary": out / "summary.json"}
    removed = []
    for f, name in pools.items():
        k = int(round(f * len(pool)))
        top = {row["id"] for row in rows[:k]}
        kept = [ex.id for ex in pool.examples if ex.id not in top]
        label = "filtered pool" if len(pools) == 1 else f"filtered pool (top {f:g} removed)"
        outputs[label] = write_subset(pool, kept, out / name)
        removed.append(k)
    if removed:
        summary["removed"] = removed[0] if len(removed) == 1 else removed
    print(f"{cfg.method}: scored {len(pool)} examples from {pool.path} in {wall:.1f} s")
    if result.explanations.get("concept_dir"):
        outputs["concept"] = result.explanations["concept_dir"]
        sep = result.explanations.get("separation")
        print(f"concept at block {result.explanations['layer']}"
              + (f", held-out separation (AUC-ROC) {sep:.3f}" if sep is not None else ""))
    gate = result.explanations.get("probe_gate")
    if isinstance(gate, dict) and gate.get("warning"):
        print(f"warning: {gate['warning']}", file=sys.stderr)
    if labels is not None:
        m = summary["metrics"]
        print(f"AUC-PR {m['auc_pr']:.3f} (base rate {m['base_rate']:.3f}) over {m['positives']} labelled examples")
        for name, b in summary["prompt_only_baseline"].items():
            shown = f"AUC-PR {b['auc_pr']:.3f}" if "auc_pr" in b else f"skipped: {b.get('skipped')}"
            print(f"  prompt-only baseline, {name.replace('_', ' ')}: {shown}"
                  + ("  <- the prompt alone gives the label away: a format shortcut"
                     if name == "bag_of_words" and b.get("above_base_rate", 0) > 0.1 else ""))
    write_json(out / "summary.json", summary)  # the ranking's summary stands before the (long) retrains
    if cfg.retrain:
        assert heldout is not None
        outputs["removal experiment"] = _removal(cfg, loaded, pool, result.scores, labels, heldout, out,
                                                 progress=not args.quiet)
        write_json(out / "summary.json", {**summary, "removal": "removal.json"})
    folder.finish()
    print_outputs(outputs)
    return 0


def filtered_names(pool: Any, fractions: list[float]) -> dict[float, str]:
    """The file (or folder) each filtered pool is written under: `filtered` for one fraction,
    `filtered-F` (F as written, e.g. filtered-0.1) for each of several."""
    from mechsieve.data.writers import subset_filename

    if len(fractions) == 1:
        return {fractions[0]: subset_filename(pool, "filtered")}
    return {f: subset_filename(pool, f"filtered-{f:g}") for f in fractions}


def _read_heldout(cfg: AttributeCommand) -> tuple[Any, Any]:
    """(held-out prompts, held-out answers) of the removal experiment, read before the model loads."""
    from mechsieve.data.readers import DataError, read_pool

    prompts, answers = read_pool(cfg.removal.prompts), read_pool(cfg.removal.answers)
    for flag, data in (("--heldout-prompts", prompts), ("--heldout-answers", answers)):
        if not len(data):
            raise DataError(f"{flag} {data.path}: no examples to measure the retrained models on")
    if not any(ex.response.strip() for ex in answers.examples):
        raise DataError(f"--heldout-answers {answers.path}: no record has an answer; the task loss is taken on "
                        "held-out in-domain answers (prompt + response records)")
    return prompts, answers


def _removal(cfg: AttributeCommand, loaded: Any, pool: Any, scores: Any, labels: Any, heldout: tuple[Any, Any],
             out: Path, progress: bool) -> Path:
    """The removal experiment (evaluate/removal.py) on the ranking just made -> removal.json."""
    from mechsieve.config import from_dict, to_dict
    from mechsieve.evaluate.removal import removal_table, run_removal
    from mechsieve.scorers.concept import resolve_concept
    from mechsieve.store import write_json

    src = from_dict(scorer_class(cfg.method, cfg.scorer).config_cls, cfg.scorer, prefix="scorer.")
    concept = resolve_concept(loaded, src, progress)  # the scorer's own (cached) concept for the probe methods
    prompts, answers = heldout
    n_runs = len(cfg.remove_top) * (1 + cfg.removal.random_repeats) + int(cfg.removal.baseline)
    print(f"removal experiment: {n_runs} retrains of {len(pool)} examples; each model answers {len(prompts)} held-out "
          f"prompts (concept at block {concept.layer}, read by the {cfg.removal.activations} model) and is scored on "
          f"{len(answers)} held-out answers")
    run = run_removal(loaded, pool, scores, concept, src, cfg.remove_top, cfg.removal, cfg.train, prompts, answers,
                      seed=cfg.seed, labels=labels, progress=progress)
    removal = {**run.summary(), "settings": {"method": cfg.method, "seed": cfg.seed, "removal": to_dict(cfg.removal),
                                             "train": to_dict(cfg.train), "concept_layer": int(concept.layer),
                                             "concept_dir": concept.folder, "heldout_prompts": prompts.path,
                                             "heldout_answers": answers.path}}
    path = write_json(out / "removal.json", removal)
    print(removal_table(removal))
    return path


def _layer(value: str) -> int | str:
    """--layer: an int, or `auto`."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a block index or auto") from None


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
