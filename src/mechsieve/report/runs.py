"""Run folders in, typed data out: which command wrote a folder, and what the report reads of it.

The report's only file reads live here. A folder is recognised by the files its command writes:
- `select`      summary.json + scores.parquet (select/pipeline.py `write_selection`);
- `attribute`   summary.json + ranking.jsonl (commands/attribute.py);
- `mask-tokens` summary.json + a `datasets.save_to_disk` folder (tokens/pipeline.py `write_masked`);
- `experiment`  results.json (experiment/report.py `write_results`).
Example texts are not stored in run folders; they are read back from the pool the run recorded
(or pools passed in) and matched by id, with a note when they cannot be or do not match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EXPECTED = ("a run folder written by mechsieve select (summary.json + scores.parquet), attribute (summary.json + "
            "ranking.jsonl), mask-tokens (summary.json + a saved dataset) or experiment (results.json)")


class ReportError(ValueError):
    """A folder given to the report is not a mechsieve run folder, or one of its files is unreadable."""


@dataclass
class SelectionRun:
    """A `mechsieve select` folder: per-example scores aligned with the pool, and summary.json."""

    path: Path
    summary: dict[str, Any]
    ids: list[str]
    sources: list[str]
    scores: np.ndarray  # [n] float64
    ranks: np.ndarray  # [n] int64, 1 = best
    selected: np.ndarray  # [n] bool
    kind: str = "selection"

    @property
    def method(self) -> str:
        return str(self.summary.get("settings", {}).get("method", "?"))


@dataclass
class AttributionRun:
    """A `mechsieve attribute` folder: the ranking (best first), summary.json, an optional removal curve."""

    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]  # id, score, rank[, label], best first
    removal: dict[str, Any] | None = None  # evaluate.attribution.RemovalResult.summary()
    kind: str = "attribution"


@dataclass
class MaskExample:
    """One example of a `mask-tokens` dataset: ids [t], reasons [t] (bit flags), scores per attribute [t]."""

    id: str
    input_ids: np.ndarray
    reasons: np.ndarray
    response: np.ndarray  # [t] bool: tokens that count as response (trained on, or masked)
    scores: dict[str, np.ndarray]


@dataclass
class TokenMaskRun:
    """A `mechsieve mask-tokens` folder: summary.json and the most-masked examples of its dataset."""

    path: Path
    summary: dict[str, Any]
    examples: list[MaskExample]  # most masked first
    kind: str = "masks"


@dataclass
class ExperimentRun:
    """A `mechsieve experiment` folder: results.json (config, rows, summary)."""

    path: Path
    results: dict[str, Any]
    kind: str = "experiment"


Run = SelectionRun | AttributionRun | TokenMaskRun | ExperimentRun


@dataclass
class Texts:
    """Example texts found for a run, by id, and what the reader should know about them."""

    by_id: dict[str, Any] = field(default_factory=dict)  # id -> data.records.Example
    note: str = ""
    warning: bool = False


def detect_kind(folder: str | Path) -> str:
    """`selection`, `attribution`, `masks` or `experiment`; ReportError for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such folder; expected {EXPECTED}")
    has = {p.name for p in folder.iterdir()}
    if "results.json" in has:
        return "experiment"
    if "summary.json" in has:
        if "scores.parquet" in has:
            return "selection"
        if "ranking.jsonl" in has:
            return "attribution"
        if "dataset_info.json" in has or "state.json" in has:
            return "masks"
    listing = ", ".join(sorted(has)[:6]) + (", ..." if len(has) > 6 else "") if has else "nothing"
    raise ReportError(f"{folder}: not a mechsieve run folder (it holds {listing}); expected {EXPECTED}")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: unreadable ({err}); rerun the command that wrote it") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_run(folder: str | Path, top_masked: int = 8) -> Run:
    """Read a run folder (see the module docstring); `top_masked`: mask-tokens examples kept."""
    folder = Path(folder)
    kind = detect_kind(folder)
    if kind == "experiment":
        results = _json(folder / "results.json")
        if not isinstance(results.get("rows"), list) or not isinstance(results.get("summary"), dict):
            raise ReportError(f"{folder / 'results.json'}: no rows / summary; expected the file "
                              "`mechsieve experiment` writes")
        return ExperimentRun(folder, results)
    summary = _json(folder / "summary.json")
    if kind == "selection":
        return _selection(folder, summary)
    if kind == "attribution":
        return _attribution(folder, summary)
    return _masks(folder, summary, top_masked)


def _selection(folder: Path, summary: dict[str, Any]) -> SelectionRun:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(folder / "scores.parquet").to_pydict()
        return SelectionRun(folder, summary, [str(x) for x in table["id"]], [str(x) for x in table["source"]],
                            np.asarray(table["score"], dtype=np.float64), np.asarray(table["rank"], dtype=np.int64),
                            np.asarray(table["selected"], dtype=bool))
    except (OSError, KeyError, ValueError) as err:
        raise ReportError(f"{folder / 'scores.parquet'}: unreadable or without id/source/score/rank/selected "
                          f"columns ({err}); rerun mechsieve select") from None


def _attribution(folder: Path, summary: dict[str, Any]) -> AttributionRun:
    rows = []
    path = folder / "ranking.jsonl"
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"id": str(row["id"]), "score": float(row["score"]), "rank": int(row["rank"]),
                         **({"label": bool(row["label"])} if "label" in row else {})})
        except (ValueError, KeyError, TypeError) as err:
            raise ReportError(f"{path}:{lineno}: expected {{id, score, rank[, label]}} ({err})") from None
    rows.sort(key=lambda r: r["rank"])
    removal = summary.get("removal") if isinstance(summary.get("removal"), dict) else None
    if (folder / "removal.json").exists():
        removal = _json(folder / "removal.json")
    return AttributionRun(folder, summary, rows, removal)


def _masks(folder: Path, summary: dict[str, Any], top: int) -> TokenMaskRun:
    import datasets
    import pyarrow.compute as pc

    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise ReportError(f"{folder}: the saved dataset is unreadable ({err}); rerun mechsieve mask-tokens") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    need = {"input_ids", "labels", "mask_reason"}
    if not need <= set(ds.column_names):
        raise ReportError(f"{folder}: the dataset lacks {sorted(need - set(ds.column_names))}; expected the "
                          "columns mechsieve mask-tokens writes")
    reasons = ds.data.column("mask_reason").combine_chunks()
    flags = pc.list_flatten(reasons).to_numpy(zero_copy_only=False) > 0
    parents = pc.list_parent_indices(reasons).to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[flags], minlength=len(ds))
    order = np.argsort(-counts, kind="stable")[:top]
    attrs = [a for a in ("ri", "kn", "tr") if a in ds.column_names]
    rows = ds.select(order.tolist())
    examples = []
    for k in range(len(rows)):
        row = rows[k]
        reason = np.asarray(row["mask_reason"], dtype=np.int64)
        labels = np.asarray(row["labels"], dtype=np.int64)
        examples.append(MaskExample(str(row.get("id", order[k])), np.asarray(row["input_ids"], dtype=np.int64), reason,
                                    (labels != -100) | (reason > 0),
                                    {a: np.asarray(row[a], dtype=np.float64) for a in attrs}))
    return TokenMaskRun(folder, summary, examples)


# --- example texts ------------------------------------------------------------------------------

def read_recorded_pool(path: str, fmt: str = "auto") -> list[Any]:
    """Pools at a recorded path: one file, or several joined by commas (a `mixed` pool)."""
    from mechsieve.data.formats import FORMATS
    from mechsieve.data.readers import read_examples, read_pool

    parts = [p for p in str(path).split(",") if p]
    missing = [p for p in parts if not Path(p).exists()]
    if not parts or missing:
        raise FileNotFoundError(f"{', '.join(missing) or path!r} is not a local file")
    if fmt == "mixed" or len(parts) > 1:
        return [read_examples(parts)]
    return [read_pool(parts[0], format=fmt if fmt in FORMATS and fmt != "mapping" else "auto")]


def find_texts(ids: list[str], path: str | None, fmt: str = "auto", fingerprint: str | None = None,
               pools: list[Any] | None = None) -> Texts:
    """Texts of `ids` from `pools` (when given) or the pool recorded at `path`, matched by id.

    With a recorded `fingerprint` and every id found, a pool whose content differs from what
    was scored is flagged (its texts may not be the ones the scores belong to).
    """
    from mechsieve.data.records import Pool

    origin = "the pools passed in" if pools else f"the recorded pool {path}"
    if not pools:
        if not path:
            return Texts(note="example texts not shown: the run does not record its pool; pass it with --pool")
        try:
            pools = read_recorded_pool(path, fmt)
        except Exception as err:  # any reader error only costs the texts; say why
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            return Texts(note=f"example texts not shown: {origin} could not be read back ({first}); "
                              "pass the pool file with --pool")
    by_id = {ex.id: ex for pool in pools for ex in pool.examples}
    found = [by_id.get(i) for i in ids]
    missing = sum(ex is None for ex in found)
    texts = {i: ex for i, ex in zip(ids, found) if ex is not None}
    if missing == len(ids):
        return Texts(note=f"example texts not shown: none of the run's ids is in {origin}", warning=True)
    if missing:
        return Texts(texts, f"{missing} of {len(ids)} example ids are not in {origin}; their texts are not shown",
                     warning=True)
    if fingerprint and Pool(found, "", "memory", "memory").fingerprint() != fingerprint:
        return Texts(texts, f"{origin} differs from the pool that was scored (content fingerprint); the texts "
                            "shown may not be the ones the scores belong to", warning=True)
    return Texts(texts)


def find_tokenizer(identity: Any) -> tuple[Any, str]:
    """The tokenizer of a recorded model identity when it is on this machine: (tokenizer, "") or
    (None, why not). Never downloads."""
    if not isinstance(identity, dict) or "kind" not in identity:
        return None, "the run does not record its model"
    kind = identity["kind"]
    if kind == "folder":
        where = str(identity.get("path", ""))
    elif kind == "alias":
        from mechsieve.models.loading import cache_root

        where = str(cache_root() / "models" / str(identity.get("name", "")))
    else:
        where = str(identity.get("id", ""))
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where, local_files_only=True), ""
    except Exception as err:  # a missing folder or hub cache only costs the token view
        return None, f"the tokenizer of {where!r} is not available here ({type(err).__name__})"
