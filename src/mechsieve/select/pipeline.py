"""`select_examples`: score a pool with a registered method and apply a budget.

Returns a `Selection` (ids best first, per-example scores, ranks, the selected mask, the method's
explanations, timings and settings); `write_selection` writes it in the pool's own format with
`scores.parquet` and `summary.json` beside it (the only disk writes, through data/ and store/).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.data.packed import CodedStrs, PackedStrs
from mechsieve.data.records import Pool
from mechsieve.data.stream import ids_of, sources_of
from mechsieve.scorers.registry import make_scorer
from mechsieve.select.budget import SelectionError, choose, parse_budget

SCORE_GROUP_ROWS = 4096
"""Rows per row group of a scores table, which is built and written one row group at a time: the
driver's memory for it is then the same for 10^4 examples as for 10^7 (~6 MB), where a whole table
at once grew it by ~300 bytes an example, more than the ids and scores themselves."""


@dataclass
class Selection:
    """The outcome of one selection, aligned with `pool.examples`."""

    ids: list[str]
    """Selected ids, best first."""
    scores: np.ndarray
    """[n] float64, one per pool example."""
    ranks: np.ndarray
    """[n] int64, 1 = best."""
    selected: np.ndarray
    """[n] bool."""
    explanations: dict[str, Any] = field(default_factory=dict)
    """Method-specific details, JSON-able."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase."""
    settings: dict[str, Any] = field(default_factory=dict)
    """JSON-able settings that made it (method, budget, order, seed, scorer settings)."""

    def counts_by_source(self, pool: Pool) -> dict[str, int]:
        """Selected examples per source, in the pool's order of sources."""
        sources = sources_of(pool.examples)
        if isinstance(sources, CodedStrs):  # a streamed pool's: counted from the codes
            return sources.counts(self.selected)
        counts = dict.fromkeys(sources, 0)
        for source, chosen in zip(sources, self.selected):
            counts[source] += int(chosen)
        return counts


def select_examples(
    method: str,
    pool: Pool,
    budget: float | int | str,
    *,
    target: Pool | None = None,
    loaded: Any = None,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    order: str | None = None,
) -> Selection:
    """Score `pool` with registered method `method` and select `budget` of it.

    budget: a fraction in (0, 1], a count, a threshold string like "score>=0.5", or "full".
    order: "top" (highest scores first) or "bottom"; default the method's own (loss: its
    `direction` setting). Method "full" selects every example whatever the budget.
    Raises SelectionError on an empty pool or a budget larger than the pool.
    """
    if len(pool.examples) == 0:
        raise SelectionError("the pool is empty: nothing to select (check the path and --limit)")
    if method == "full":
        budget = "full"
    parsed = parse_budget(budget)
    parsed.size(len(pool.examples))  # refuse a too-large count before any model work
    scorer = make_scorer(method, settings)
    t0 = time.perf_counter()
    result = scorer.score(pool, target=target, loaded=loaded, seed=seed, progress=progress)
    return selection_from_result(method, scorer, result, pool, budget, seed=seed, order=order,
                                 score_seconds=time.perf_counter() - t0)


def select_many(settings: dict[str, dict[str, Any] | None], pool: Pool, budget: float | int | str, *,
                target: Pool | None = None, loaded: Any = None, seed: int = 0, order: str | None = None,
                cache: Any = None, progress: bool = True) -> tuple[dict[str, Selection], dict[str, Any]]:
    """`select_examples` for several methods (method -> its settings) at one budget: the forward-only
    ones read their pool features from one shared pass (scorers.many.score_many; `cache`: a
    store.features.FeatureCache). Returns (method -> Selection, the shared pass's report); each
    Selection's timings hold its own prepare seconds and the shared pass's seconds."""
    from mechsieve.scorers.many import score_many

    if len(pool.examples) == 0:
        raise SelectionError("the pool is empty: nothing to select (check the path and --limit)")
    for method in settings:
        parse_budget("full" if method == "full" else budget).size(len(pool.examples))
    scorers = {method: make_scorer(method, s) for method, s in settings.items()}
    results, report = score_many(scorers, pool, target=target, loaded=loaded, seed=seed, cache=cache,
                                 progress=progress)
    shared_seconds = report.get("pass", {}).get("seconds", 0.0)
    selections = {}
    for method, scorer in scorers.items():
        own = report["methods"][method]
        seconds = own.get("own_seconds", own.get("prepare_seconds", 0.0) + shared_seconds)
        recorded = {"shared_pass": report["shared"]} if method in report["shared"] and len(report["shared"]) > 1 else {}
        selections[method] = selection_from_result(method, scorer, results[method], pool, budget, seed=seed,
                                                   order=order, score_seconds=seconds, recorded=recorded)
    return selections, report


def selection_from_result(method: str, scorer: Any, result: Any, pool: Pool, budget: float | int | str, *,
                          seed: int = 0, order: str | None = None, score_seconds: float = 0.0,
                          recorded: dict[str, Any] | None = None) -> Selection:
    """The global selection from a scorer's `ScoreResult` over the whole pool (used by
    `select_examples` and by the engine, which computes the scores shard by shard).
    `recorded`: extra entries for the selection's settings record."""
    if method == "full":
        budget = "full"
    parsed = parse_budget(budget)
    scores = np.asarray(result.scores, dtype=np.float64)
    if scores.shape != (len(pool.examples),):
        raise SelectionError(f"{method} returned scores of shape {scores.shape} for {len(pool.examples)} examples")
    ids = ids_of(pool.examples)
    use_order = order or scorer.order
    t1 = time.perf_counter()
    picked = choose(scores, ids, parsed, use_order, result.per_target)
    t_select = time.perf_counter() - t1
    chosen = [ids[i] for i in picked.order[picked.selected[picked.order]].tolist()]
    timings = {**{k: round(float(v), 4) for k, v in result.timings.items()},
               "score_total": round(score_seconds, 4), "select": round(t_select, 4)}
    settings = {"method": method, "budget": budget if not isinstance(budget, np.generic) else budget.item(),
                "budget_kind": parsed.kind, "order": use_order, "seed": seed,
                "targets": result.target_names, "scorer": scorer.settings(), **(recorded or {})}
    return Selection(chosen, scores, picked.ranks, picked.selected, result.explanations, timings, settings)


def write_selection(pool: Pool, sel: Selection, out_dir: str | Path, extra: dict[str, Any] | None = None
                    ) -> dict[str, Path]:
    """Write `scores.parquet`, then the subset (pool's own format) and `summary.json` under `out_dir`."""
    from mechsieve.data.writers import subset_filename, write_subset
    from mechsieve.store.atomic import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The scores first: they may have taken hours, and a subset that fails to write must not lose them.
    write_score_table(out / "scores.parquet", {
        "id": ids_of(pool.examples),
        "source": sources_of(pool.examples),
        "score": np.asarray(sel.scores, dtype=np.float64),
        "rank": np.asarray(sel.ranks, dtype=np.int64),
        "selected": np.asarray(sel.selected, dtype=bool),
    })
    try:
        subset = write_subset(pool, sel.ids, out / subset_filename(pool))
    except Exception as err:
        err.add_note(f"the scores are kept in {out / 'scores.parquet'} (columns id, score, rank, selected)")
        raise
    summary = {
        "settings": sel.settings,
        "timings": sel.timings,
        "pool": {"path": pool.path, "format": pool.format, "examples": len(pool.examples),
                 "fingerprint": pool.fingerprint(), "by_source": pool.counts_by_source()},
        "selected": {"examples": int(sel.selected.sum()), "by_source": sel.counts_by_source(pool)},
        "explanations": sel.explanations,
        **(extra or {}),
    }
    write_json(out / "summary.json", summary)
    return {"subset": subset, "scores": out / "scores.parquet", "summary": out / "summary.json"}


def write_score_table(path: Path, columns: dict[str, Sequence[str] | np.ndarray]) -> Path:
    """Write `columns` (name -> one value per pool example: a sequence of str, a string column; or
    a numpy array, a column of its dtype) to the Parquet file `path`, atomically, `SCORE_GROUP_ROWS`
    rows a row group built from slices of them (a streamed pool's ids and sources, data.stream's
    PackedStrs, from their buffers: no per-example object is made). Without dictionary
    encoding: ids, scores and ranks do not repeat, and a dictionary's buffers cost the writer
    several MB a column (the file is no larger without)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mechsieve.store.atomic import atomic_path

    schema = pa.schema([(name, pa.from_numpy_dtype(values.dtype) if isinstance(values, np.ndarray) else pa.string())
                        for name, values in columns.items()])
    n = len(next(iter(columns.values())))
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, use_dictionary=False) as writer:
        for start in range(0, n, SCORE_GROUP_ROWS):
            stop = min(start + SCORE_GROUP_ROWS, n)
            part = {name: values.arrow(start, stop) if isinstance(values, PackedStrs) else values[start:stop]
                    for name, values in columns.items()}
            writer.write_table(pa.table(part, schema=schema))
    return path
