"""The token-mask pipeline of a pool: render, score every token with XTF, decide the masks, write.

`mask_examples` runs in process; `mask_examples_sharded` has the engine score the tokens shard by
shard (resumable; on Ray actors with engine.executor=ray) and decides the masks here over the
whole pool. `write_masked` writes what `mechsieve mask-tokens` writes: a `datasets.save_to_disk`
dataset with columns input_ids, labels (-100 on prompt and masked tokens), completion_mask (1
where the loss is taken, i.e. labels != -100), the per-token scores ri, kn, tr (NaN where not
scored), mask_reason (bit flags 1=RI, 2=KN, 4=TR) and id; the same table as
parquet/train.parquet (what `datasets.load_dataset` and `trl sft --dataset_name OUT/parquet` read;
both refuse a save_to_disk folder); plus summary.json (masked share per attribute, overlaps, the
most-masked examples).

TRL (1.16) trains on the labels column as it is: its collator, DataCollatorForLanguageModeling,
reads only input_ids and labels (it pads labels with -100), and SFTTrainer builds labels from
completion_mask only for data without a labels column (and only with completion_only_loss).
completion_mask is there for such readers; the labels carry the masks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, Rendered, render_pool
from mechsieve.store.atomic import write_json
from mechsieve.tokens.base import TokenMasks, TokenScores
from mechsieve.tokens.summary import mask_counts, most_masked
from mechsieve.tokens.xtf import Xtf, XtfConfig

if TYPE_CHECKING:
    from mechsieve.engine.base import EngineConfig


@dataclass
class MaskRun:
    """Everything one masking run produced, aligned by example."""

    ids: list[str]
    rendered: list[Rendered]
    scores: TokenScores
    masks: TokenMasks
    render_summary: str
    seconds: float


def mask_examples(loaded: Any, examples: Sequence[Example], cfg: XtfConfig, render_cfg: RenderConfig,
                  words: list[str] | None = None, progress: bool = True, target: Sequence[Example] | None = None,
                  cache: Any = None) -> MaskRun:
    """Render `examples`, score their tokens with XTF and decide the masks (`target`: in-domain
    examples for contextual TR; `cache`: a store.features.FeatureCache for the per-token features)."""
    return run_masker(Xtf(cfg, words=words, target=target, render_cfg=render_cfg), loaded, examples, render_cfg,
                      progress, cache=cache)


def run_masker(masker: Any, loaded: Any, examples: Sequence[Example], render_cfg: RenderConfig,
               progress: bool = True, cache: Any = None) -> MaskRun:
    """Render `examples`, score their tokens with `masker` (a TokenMasker) and decide the masks.
    `cache`: a store.features.FeatureCache; a masker whose scores are features of the shared pass
    (tokens.shared.ForwardMasker) reads them from it and writes what it computes (keyed by the
    model's identity and the rendered tokens), so a rerun with other decision settings runs no pass."""
    from mechsieve.tokens.shared import ForwardMasker

    start = time.perf_counter()
    rendered, stats = render_pool(examples, loaded.tokenizer, render_cfg)
    if cache is not None and isinstance(masker, ForwardMasker):
        scores = masker.score(loaded, loaded.tokenizer, rendered, progress=progress, cache=cache)
        masks = masker.decide(scores)
    else:
        scores, masks = masker.mask(loaded.model, loaded.tokenizer, rendered, progress=progress)
    return MaskRun([ex.id for ex in examples], rendered, scores, masks, stats.summary(),
                   round(time.perf_counter() - start, 2))


def mask_examples_sharded(model: Any, examples: Sequence[Example], cfg: XtfConfig, render_cfg: RenderConfig,
                          words: list[str], engine: EngineConfig, folder: str | Path, tokenizer: Any,
                          progress: bool = True, target: Sequence[Example] | None = None) -> MaskRun:
    """`mask_examples` with the token scores computed shard by shard by the engine (resumable;
    on Ray actors with engine.executor=ray), the masks decided here over the whole pool.
    `model` is a LoadedModel, or its ModelConfig when Ray actors load it themselves."""
    from mechsieve.data.stream import full_examples
    from mechsieve.engine import token_scores_sharded

    start = time.perf_counter()
    masker = Xtf(cfg, words=words, target=target, render_cfg=render_cfg)  # refuses unusable settings first
    # a streamed pool's examples are read again one at a time here; the shards read their own
    rendered, stats = render_pool(full_examples(examples), tokenizer, render_cfg)
    scores = token_scores_sharded(model, examples, cfg, words, render_cfg, folder, engine, progress,
                                  target=target)
    if [len(e) for e in scores.eligible] != [len(r) for r in rendered]:
        raise RuntimeError("the shards' token scores do not line up with the examples rendered here; "
                           "the workers must use the same tokenizer as the driver")
    return MaskRun([ex.id for ex in examples], rendered, scores, masker.decide(scores), stats.summary(),
                   round(time.perf_counter() - start, 2))


PARQUET = "parquet/train.parquet"
"""Where in the output folder the Parquet copy goes (a folder of its own: see the module docstring)."""


def write_masked(out: str | Path, run: MaskRun, tokenizer: Any, settings: dict[str, Any], top: int = 5,
                 parquet: bool = True) -> dict[str, Any]:
    """Write the tokenized dataset (+ scores), its Parquet copy (`parquet`) and summary.json to
    `out`; return the summary."""
    from mechsieve.train import TrainItem, save_tokenized

    labels = run.masks.labels(run.rendered)
    items = [TrainItem(r.input_ids, lab) for r, lab in zip(run.rendered, labels)]
    extra: dict[str, list] = {"id": list(run.ids),
                              "completion_mask": [(lab != -100).astype(int).tolist() for lab in labels],
                              "mask_reason": [r.astype(int).tolist() for r in run.masks.reasons]}
    for name, values in run.scores.scores.items():
        extra[name] = _float_lists(values)
    out = Path(out)
    save_tokenized(out, items, extra=extra, parquet=out / PARQUET if parquet else None)
    if not parquet:  # a copy left by an earlier run would no longer match the dataset
        (out / PARQUET).unlink(missing_ok=True)
    summary = {"settings": settings, "render": run.render_summary, "seconds": run.seconds,
               "scoring": run.scores.info, "decision": run.masks.info,
               **mask_counts(run.scores, run.masks),
               "most_masked": most_masked(run.ids, run.scores, run.masks, run.rendered, tokenizer, top=top)}
    write_json(out / "summary.json", summary)
    return summary


def _float_lists(values: list[np.ndarray]) -> list[list[float]]:
    return [v.astype(float).tolist() for v in values]
