"""Write a subset of a pool back in the pool's own format (same container, same raw records).

The raw records are re-read from the source file and filtered by row, so fields we do not model
(ids, tests, metadata columns) survive untouched; a Parquet subset is the original table's rows
(`take`), so its schema and metadata are the pool's. A DatasetDict folder gives a DatasetDict with
only the split that was read. Text is written in UTF-8 whatever the pool's encoding. Pools built
in memory, or mixed from several files, are written as chat `messages` JSONL, which every reader
here (and TRL) accepts.
Every write is atomic (store.atomic): a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mechsieve.data.readers import iter_raw
from mechsieve.data.records import Example, Pool
from mechsieve.store.atomic import atomic_dir, atomic_path, write_text

_SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "csv": ".csv"}


def example_to_messages(ex: Example) -> dict[str, Any]:
    messages = list(ex.prompt)
    if ex.response:
        messages = [*messages, {"role": "assistant", "content": ex.response}]
    return {"id": ex.id, "source": ex.source, "messages": messages}


def subset_filename(pool: Pool, stem: str = "selected") -> str:
    """The file (or folder) name a subset of `pool` is written under."""
    if pool.container in _SUFFIX:
        return stem + _SUFFIX[pool.container]
    if pool.container == "disk":
        return stem
    return stem + ".jsonl"


def write_subset(pool: Pool, ids: list[str] | set[str], out_path: str | Path) -> Path:
    """Write the records of `pool` whose id is in `ids`, in the pool's own container and layout."""
    if hasattr(pool, "write_subset"):  # a streamed pool (data.stream) reads its records again to write them
        return pool.write_subset(ids, out_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    keep = set(ids)
    unknown = keep - {ex.id for ex in pool.examples}
    if unknown:
        raise ValueError(f"{len(unknown)} id(s) are not in the pool {pool.path}, e.g. {sorted(unknown)[:3]}")
    chosen = [ex for ex in pool.examples if ex.id in keep]
    rows = {ex.meta.get("row") for ex in chosen}
    if pool.container not in (*_SUFFIX, "disk") or None in rows:
        return write_jsonl(out_path, [example_to_messages(ex) for ex in chosen])
    if pool.container == "disk":
        return _write_disk(pool, sorted(rows), out_path)
    if pool.container == "parquet":
        import pyarrow.parquet as pq

        # Rebuilding the table from Python rows would widen int32/float32, type all-null
        # columns as null and drop the schema metadata (the `huggingface` features).
        table = pq.read_table(pool.path).take(sorted(rows))
        with atomic_path(out_path) as tmp:
            pq.write_table(table, tmp)
        return out_path
    records = [rec for _, row, rec in iter_raw(pool.path, pool.container, pool.split, pool.encoding)
               if row in rows]
    if pool.container == "jsonl":
        return write_jsonl(out_path, records)
    if pool.container == "json":
        return write_text(out_path, json.dumps(records, ensure_ascii=False, indent=1))
    return _write_csv(out_path, records)


def _write_disk(pool: Pool, rows: list[int], out_path: Path) -> Path:
    """The rows of a `save_to_disk` folder; from a DatasetDict, a DatasetDict holding only the split
    that was read, so that code which opens the pool (`load_from_disk(p)[split]`) opens the subset."""
    import datasets

    folder = Path(pool.path)
    if (folder / "dataset_dict.json").exists():
        # only the split that was read is opened: another, empty split fails load_from_disk
        if not (folder / pool.split).is_dir():
            raise ValueError(f"{pool.path}: the DatasetDict no longer has split {pool.split!r}; "
                             "it changed since it was read")
        ds = datasets.DatasetDict({pool.split: datasets.load_from_disk(str(folder / pool.split)).select(rows)})
    else:
        ds = datasets.load_from_disk(pool.path).select(rows)
    with atomic_dir(out_path) as tmp:
        ds.save_to_disk(str(tmp))
    return out_path


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write_text(path, text)


def _write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    fields: list[str] = []
    for rec in records:
        fields += [k for k in rec if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    return path
