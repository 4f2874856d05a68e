"""Read a pool of examples from JSONL, JSON arrays, Parquet, CSV, a `datasets` folder or a hub id.

Errors point at the record: `file:line` for JSONL, JSON and CSV, `file:row N` for Parquet and
saved datasets, with the field and what was expected. `skip_invalid=True` skips such records,
counts them and keeps their messages in `Pool.skipped`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.formats import FORMATS, RecordError, detect_format, to_example
from mechsieve.data.records import Example, Pool, make_unique_ids

CONTAINERS = ("jsonl", "json", "parquet", "csv", "disk", "hub")
_GENERIC_STEMS = {"train", "test", "validation", "valid", "dev", "data", "dataset", "eval"}


class DataError(ValueError):
    """A pool could not be read; the message names the file and record."""


@dataclass
class DataConfig:
    """Where a pool comes from and how to read it."""

    path: str = ""
    """A file (.jsonl, .json, .parquet, .csv, optionally .gz), a `save_to_disk` folder, or a hub id."""
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "question_answer", "text", "mapping"] = "auto"
    """Record layout; `auto` detects it from the first record."""
    field_map: dict[str, str] = field(default_factory=dict)
    """For format=mapping: {prompt: COL, response: COL, id: COL, system: COL, source: COL}."""
    source: str = ""
    """Name recorded as each example's source; default: the file name (parent/stem for train.jsonl)."""
    skip_invalid: bool = False
    """Skip malformed records (counted and reported) instead of stopping at the first."""
    limit: int = 0
    """Read at most this many valid records (0 = all)."""
    split: str = "train"
    """Split to read, for hub ids."""

    def __post_init__(self) -> None:
        if self.field_map and self.format == "auto":
            self.format = "mapping"
        check_choice("data.format", self.format, ("auto", *FORMATS))
        if self.limit < 0:
            raise ConfigError(f"data.limit={self.limit} must be >= 0")


def container_of(path: str) -> str:
    """Guess the container from the path: file suffix, a saved-dataset folder, or a hub id."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "disk"
        raise DataError(f"{path}: a folder, but not one written by datasets.save_to_disk "
                        "(no dataset_info.json / state.json inside)")
    for suffix in ("jsonl", "json", "parquet", "csv"):
        if name.endswith("." + suffix):
            if not p.exists():
                raise DataError(f"{path}: no such file")
            return suffix
    if name.endswith(".ndjson"):
        return "jsonl"
    if not p.exists() and path.count("/") == 1 and not path.startswith((".", "/")):
        return "hub"
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    raise DataError(f"{path}: unknown file type; expected .jsonl, .json, .parquet, .csv "
                    "(optionally .gz) or a datasets.save_to_disk folder")


def default_source(path: str) -> str:
    p = Path(path)
    stem = p.name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".ndjson"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    if stem.lower() in _GENERIC_STEMS and p.parent.name:
        return f"{p.parent.name}/{stem}"
    return stem


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def iter_raw(path: str, container: str, split: str = "train") -> Iterator[tuple[str, int, Any]]:
    """Yield (location, row, raw record) for every record; location is `file:line` or `file:row N`."""
    if container == "jsonl":
        with _open_text(path) as fh:
            row = 0
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield loc, row, _Invalid(f"not valid JSON ({err.msg} at column {err.colno})")
                else:
                    yield loc, row, record
                row += 1
    elif container == "json":
        with _open_text(path) as fh:
            text = fh.read()
        yield from _iter_json_array(path, text)
    elif container == "csv":
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            for row, record in enumerate(reader):
                yield f"{path}:{reader.line_num}", row, dict(record)
    elif container == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path}:row {row}", row, record
                row += 1
    elif container in ("disk", "hub"):
        ds = _load_datasets(path, container, split)
        for row, record in enumerate(ds):
            yield f"{path}:row {row}", row, record
    else:
        raise DataError(f"{path}: unknown container {container!r}; expected one of {list(CONTAINERS)}")


class _Invalid:
    """A record that could not even be parsed; carries why."""

    def __init__(self, why: str):
        self.why = why


def _iter_json_array(path: str, text: str) -> Iterator[tuple[str, int, Any]]:
    """Walk a JSON array element by element so each record keeps its line number."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text):
        return
    if text[pos] != "[":
        # A single object, or a {"data": [...]} wrapper, is not what we read: say so.
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON array of records "
                        f"(starting with '['), found {text[pos]!r}")
    pos = _skip_ws(text, pos + 1)
    row = 0
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{text.count(chr(10), 0, err.pos) + 1}: not valid JSON ({err.msg})") from err
        yield f"{path}:{line}", row, record
        row += 1
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' between records")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _load_datasets(path: str, container: str, split: str):
    import datasets

    if container == "disk":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: a DatasetDict without split {split!r}; it has {list(ds)} (set data.split)")
            ds = ds[split]
        return ds
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"{path}: looks like a hub dataset id, but the hub is offline here "
                        "(HF_HUB_OFFLINE=1); pass a local file or a save_to_disk folder")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as err:  # the hub raises many kinds; name the likely causes
        raise DataError(f"{path}: could not load it as a hub dataset ({type(err).__name__}: {err}); "
                        "if it is a local file, check the path; offline, pass a local file") from err


def read_pool(
    path: str | Path | DataConfig,
    format: str = "auto",
    field_map: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    source: str = "",
    limit: int = 0,
    split: str = "train",
) -> Pool:
    """Read every record at `path` into a Pool of Examples.

    Raises DataError naming `file:line`, the field and what was expected, unless
    `skip_invalid`, which skips and counts malformed records instead. An empty input is an error.
    """
    if isinstance(path, DataConfig):
        cfg = path
    else:
        cfg = DataConfig(path=str(path), format=format, field_map=dict(field_map or {}),
                         skip_invalid=skip_invalid, source=source, limit=limit, split=split)
    if not cfg.path:
        raise DataError("no data path given (data.path / --pool)")
    container = container_of(cfg.path)
    src = cfg.source or default_source(cfg.path)
    fmt = None if cfg.format == "auto" else cfg.format
    examples: list[Example] = []
    skipped: list[str] = []
    for loc, row, record in iter_raw(cfg.path, container, cfg.split):
        try:
            if isinstance(record, _Invalid):
                raise RecordError("<line>", "one JSON object per line", record.why)
            if fmt is None:
                fmt = detect_format(record)
            examples.append(to_example(record, fmt, src, row, cfg.field_map))
        except RecordError as err:
            layout = f" [layout {fmt}{', detected from the first record' if cfg.format == 'auto' else ''}]" if fmt else ""
            message = f"{loc}: {err}{layout}"
            if not cfg.skip_invalid:
                raise DataError(message + " (use --skip-invalid to skip such records)") from err
            skipped.append(message)
        if cfg.limit and len(examples) >= cfg.limit:
            break
    if not examples:
        why = f"; {len(skipped)} record(s) skipped as invalid, first: {skipped[0]}" if skipped else ""
        raise DataError(f"{cfg.path}: no records{why}")
    renamed = make_unique_ids(examples)
    return Pool(examples, cfg.path, container, fmt or "auto", skipped, renamed)


def read_examples(paths: list[str], **kwargs: Any) -> Pool:
    """Read several files into one Pool (sources kept per file)."""
    pools = [read_pool(p, **kwargs) for p in paths]
    if len(pools) == 1:
        return pools[0]
    examples = [ex for pool in pools for ex in pool.examples]
    make_unique_ids(examples)
    return Pool(examples, ",".join(paths), "memory", "mixed",
                [s for p in pools for s in p.skipped])
