"""Pools larger than memory: one scan that keeps only ids, and shards that read their own records.

`scan_pool(cfg)` reads the pool once, record by record, converting each with `read_pool`'s own
`readers.Converter` (the same formats, field maps, sources, invalid records, `limit` and `~2` id
renaming), and keeps of each example only its id, its source and where its record lies (its row
in the split; for JSONL also the byte offset and line of that row); the fingerprint is hashed as
it goes, so it equals `read_pool(cfg).fingerprint()` and caches and shard folders key the same.
The result, a `StreamedPool`, stands in for the `Pool` on the driver: its length, ids, sources,
fingerprint and counts by source, and `examples` as light references (id, source, meta["row"])
made on the fly. The ids are one UTF-8 buffer with an offset each (`CompactIds`, sorted from the
bytes when many scores tie) and the sources a small code each into the distinct ones
(`CodedStrs`): no str per example is held (a list of 16-character ids costs ~81 bytes an id,
this ~24). Reading an example's text from a reference raises `StreamError`: a method that
needs the whole pool in memory is refused, not fed empty examples.

`StreamedPool.shard_reader(start, stop)` is the picklable `ShardReader` of examples
[start, stop): the worker that runs the shard (this process, or a Ray actor, which then needs the
data at the same path) reads them with `read()` and gets the Examples `read_pool` would have held
there, checked against the ids the scan found. Where each container seeks:
- JSONL (also .gz, decompressing up to the offset): the byte offset of the shard's first line;
- Parquet: the row group holding the shard's first row, read in Arrow batches;
- a save_to_disk folder, a dataset folder or hub id (memory-mapped Arrow): `select` of the rows;
- CSV (a quoted field may span lines) and a streamed hub dataset (`data.streaming`, datasets'
  `skip`): read from the start up to the shard's rows, so every shard costs a read up to its rows;
- a JSON array is decoded as a whole, so it is not streamed (convert it to JSONL).

What differs from `read_pool`: nothing in the examples; the driver no longer holds them.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.hub import check_dataset_settings, parse_split, slice_rows
from mechsieve.data.packed import CodedStrs, CompactIds, IdPacker
from mechsieve.data.readers import (
    Converter,
    DataConfig,
    DataError,
    _table_rows,
    container_of,
    iter_raw,
    jsonl_rows,
    read_pool,
)
from mechsieve.data.records import Example, Pool, fingerprint_line

STREAM_MODES = ("auto", "on", "off")
SEEKABLE = ("jsonl", "csv", "parquet", "disk", "datasets", "hub")
AUTO_CONTAINERS = ("jsonl", "csv", "parquet", "disk")
"""Containers `stream=auto` streams when large: local files whose size says how large the pool is."""


class StreamError(DataError):
    """Something needs the text of a streamed pool's examples on the driver, where only ids are held."""


# --- which runs stream -------------------------------------------------------------------------

def check_streamable(path: str, container: str) -> None:
    if container not in SEEKABLE:
        raise ConfigError(f"engine.stream=on: {path} is a JSON array, which is decoded as a whole and cannot be "
                          "streamed; convert it to JSONL (jq -c '.[]' IN.json > OUT.jsonl) or set "
                          "engine.stream=off (--no-stream)")


def size_on_disk(path: str) -> int:
    """Bytes of a file, or of every file under a folder; 0 for what is not on this disk (a hub id)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return 0


def wants_stream(cfg: DataConfig, mode: str, above_mb: float) -> bool:
    """Whether the pool `cfg` names is streamed: `on` always (a JSON array is refused), `off`
    never, `auto` when it is a local JSONL / CSV / Parquet file or save_to_disk folder of more
    than `above_mb` megabytes (10^6 bytes)."""
    check_choice("engine.stream", mode, STREAM_MODES)
    if mode == "off" or not cfg.path:
        return False
    if mode == "on":
        check_streamable(cfg.path, container_of(cfg.path, bool(cfg.data_files)))
        return True
    try:
        container = container_of(cfg.path, bool(cfg.data_files))
    except DataError:  # a path that is not there: reading the pool says so, after the settings are checked
        return False
    return container in AUTO_CONTAINERS and size_on_disk(cfg.path) > above_mb * 1e6


def open_pool(cfg: DataConfig, stream: bool, progress: bool = False) -> Pool:
    """The pool `cfg` names: scanned (`StreamedPool`, ids only) when `stream`, else read whole."""
    return scan_pool(cfg, progress=progress) if stream else read_pool(cfg)


def is_streamed(pool: Any) -> bool:
    return isinstance(pool, StreamedPool)


# --- one record at a time, as read_pool converts it ------------------------------------------

def parquet_rows(path: str, row: int) -> Iterator[tuple[str, int, Any]]:
    """(location, row, record) of a Parquet file from row `row`, starting at the row group that
    holds it (readers' Parquet reading, which starts at row 0)."""
    def records() -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        meta, group, first = pf.metadata, 0, 0
        while group < meta.num_row_groups and first + meta.row_group(group).num_rows <= row:
            first += meta.row_group(group).num_rows
            group += 1
        skip = row - first
        for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(group, meta.num_row_groups))):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield from (batch.slice(skip) if skip else batch).to_pylist()
            skip = 0

    return _table_rows(path, records(), "Parquet file", row)


def _scan_rows(cfg: DataConfig, container: str) -> Iterator[tuple[str, int, Any, int, int]]:
    if container == "jsonl":
        yield from slice_rows(lambda: jsonl_rows(cfg.path, cfg.encoding), parse_split(cfg.split))
        return
    for loc, row, record in iter_raw(cfg.path, container, cfg.split, cfg.encoding, subset=cfg.subset,
                                     revision=cfg.revision, data_files=cfg.data_files, streaming=cfg.streaming):
        yield loc, row, record, -1, 0


# --- the scan and the pool it gives ------------------------------------------------------------

def scan_pool(cfg: DataConfig, progress: bool = False) -> StreamedPool:
    """Read the pool `cfg` names once, keeping of each example its id, source and place (see the
    module docstring); errors and skipped records exactly as `read_pool`'s."""
    if not cfg.path:
        raise DataError("no data path given (data.path / --pool)")
    container = container_of(cfg.path, bool(cfg.data_files))
    check_dataset_settings(cfg.path, container, cfg.subset, cfg.revision, cfg.data_files)
    check_streamable(cfg.path, container)
    from tqdm.auto import tqdm

    convert = Converter(cfg, container)
    ids = IdPacker()
    codes, names = array("i"), {}  # sources: a code each into the distinct ones, in order of appearance
    rows, offsets, lines = array("q"), array("q"), array("q")
    digest = sha256()
    with tqdm(desc="scan pool", unit="ex", disable=not progress, leave=False) as bar:
        for loc, row, record, offset, lineno in _scan_rows(cfg, container):
            example = convert(loc, row, record)
            if example is None:
                continue
            example.id = ids.add(example.id)  # make_unique_ids, one example at a time
            digest.update(fingerprint_line(example))
            codes.append(names.setdefault(example.source, len(names)))
            rows.append(row)
            offsets.append(offset)
            lines.append(lineno)
            bar.update()
            if cfg.limit and len(ids) >= cfg.limit:
                break
    if not len(ids):
        skipped = convert.skipped
        why = f"; {len(skipped)} record(s) skipped as invalid, first: {skipped[0]}" if skipped else ""
        raise DataError(f"{cfg.path}: no records{why}")
    sources = CodedStrs(list(names), np.frombuffer(codes, dtype=np.intc))
    return StreamedPool(cfg, container, convert.fmt or "auto", ids.ids(), sources, rows,
                        offsets if container == "jsonl" else None, lines if container == "jsonl" else None,
                        digest.hexdigest()[:16], convert.skipped, ids.renamed)


class ExampleRef:
    """One example of a streamed pool as the driver holds it: `id`, `source`, `meta` = {"row": R}.
    Its text is not here: asking for it raises StreamError."""

    __slots__ = ("id", "source", "meta")

    def __init__(self, id: str, source: str, row: int) -> None:
        self.id = id
        self.source = source
        self.meta = {"row": row}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise StreamError(f"example {self.id!r}: its {name!r} is not held here: the pool is streamed "
                          "(engine.stream), so the driver keeps only ids and each shard reads its own records. "
                          "This step reads every example on the driver: set engine.stream=off (--no-stream), "
                          "or use a method the engine shards (`mechsieve methods`)")

    def __repr__(self) -> str:
        return f"ExampleRef({self.id!r}, {self.source!r}, row={self.meta['row']})"


class ExampleRefs(Sequence):
    """`StreamedPool.examples`: an ExampleRef per example, made when asked for, never stored."""

    def __init__(self, pool: StreamedPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool.ids)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        p = self.pool
        return ExampleRef(p.ids[k], p.sources[k], p.rows[k])

    def __iter__(self) -> Iterator[ExampleRef]:
        p = self.pool
        for ex_id, source, row in zip(p.ids, p.sources, p.rows):
            yield ExampleRef(ex_id, source, row)

    @property
    def ids(self) -> CompactIds:
        """The pool's own ids (not a copy)."""
        return self.pool.ids

    def __repr__(self) -> str:
        return f"<{len(self)} streamed examples of {self.pool.path}>"


class StreamedPool(Pool):
    """A pool known by its scan (see the module docstring): a `Pool` whose `examples` are
    ExampleRefs; `shard_reader` and `iter_examples` read the examples themselves."""

    def __init__(self, config: DataConfig, container: str, fmt: str, ids: CompactIds, sources: CodedStrs,
                 rows: array, offsets: array | None, lines: array | None, fingerprint: str,
                 skipped: list[str], duplicate_ids: int) -> None:
        self.config = config
        self.ids = ids
        self.sources = sources
        self.rows = rows
        self.offsets = offsets
        self.lines = lines
        self._fingerprint = fingerprint
        super().__init__(ExampleRefs(self), config.path, container, fmt, skipped, duplicate_ids,
                         split=parse_split(config.split).name, encoding=config.encoding)

    def __repr__(self) -> str:
        return f"StreamedPool({self.path!r}, {len(self.ids)} examples, {self.container}, {self.format})"

    def fingerprint(self) -> str:
        return self._fingerprint

    def counts_by_source(self) -> dict[str, int]:
        return self.sources.counts()

    def subset(self, ids: list[str] | set[str]) -> Pool:
        raise StreamError("a streamed pool is not subset in memory; write the subset (write_subset) and read it")

    def shard_reader(self, start: int, stop: int) -> ShardReader:
        """The reader of examples [start, stop) (a shard's)."""
        if not 0 <= start < stop <= len(self.ids):
            raise ValueError(f"examples [{start}, {stop}) are not within the pool's {len(self.ids)}")
        offset = self.offsets[start] if self.offsets is not None else -1
        lineno = self.lines[start] if self.lines is not None else 0
        return ShardReader(self.config, self.container, self.format, self.ids.view(start, stop), self.rows[start],
                           self.rows[stop - 1] + 1, offset, lineno)

    def iter_examples(self, start: int = 0, stop: int | None = None) -> Iterator[Example]:
        """The examples [start, stop) in order, read one at a time (none held after it is yielded)."""
        stop = len(self.ids) if stop is None else stop
        return self.shard_reader(start, stop).iter() if stop > start else iter(())

    def write_subset(self, ids: list[str] | set[str], out_path: str | Path) -> Path:
        """`writers.write_subset` for this pool, the records read again one at a time: the same
        file as the in-memory pool's subset (Parquet: the same table, in row groups of its own)."""
        keep = set(ids)
        chosen = np.fromiter((ex_id in keep for ex_id in self.ids), dtype=bool, count=len(self.ids))
        if len(keep) > int(chosen.sum()):
            unknown = keep - {self.ids[k] for k in np.flatnonzero(chosen).tolist()}
            raise ValueError(f"{len(unknown)} id(s) are not in the pool {self.path}, e.g. {sorted(unknown)[:3]}")
        return self.write_chosen(chosen, out_path)

    def write_chosen(self, chosen: np.ndarray, out_path: str | Path) -> Path:
        """The subset of the examples `chosen` [n] bool marks (`write_subset` by position: no id is
        made, so that the rejected examples, most of the pool, are written as cheaply)."""
        from mechsieve.data.writers import _write_csv, _write_disk, example_to_messages
        from mechsieve.store.atomic import atomic_path

        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        rows = np.frombuffer(self.rows, dtype=np.int64)[np.asarray(chosen, dtype=bool)]
        last = int(rows.max(initial=-1))
        wanted = np.zeros(last + 1, dtype=bool)  # by row of the split
        wanted[rows] = True
        if self.container == "disk":
            return _write_disk(self, np.flatnonzero(wanted).tolist(), out_path)
        if self.container == "parquet":
            return self._write_parquet(wanted, out_path)
        if self.container in ("jsonl", "csv"):
            def records() -> Iterator[Any]:
                for _, row, record in iter_raw(self.path, self.container, self.config.split, self.encoding):
                    if row > last:
                        return
                    if wanted[row]:
                        yield record

            if self.container == "csv":
                return _write_csv(out_path, list(records()))
            lines: Iterator[Any] = records()
        else:  # datasets folders and hub ids: chat messages, as writers does for them
            lines = (example_to_messages(ex) for ex, keep in zip(self.iter_examples(), chosen) if keep)
        with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for record in lines:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        return out_path

    def _write_parquet(self, wanted: np.ndarray, out_path: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mechsieve.store.atomic import atomic_path

        pf = pq.ParquetFile(self.path)
        with atomic_path(out_path) as tmp:
            with pq.ParquetWriter(tmp, pf.schema_arrow) as writer:
                first = 0
                for batch in pf.iter_batches(batch_size=4096):
                    take = np.flatnonzero(wanted[first:first + batch.num_rows])
                    first += batch.num_rows
                    if len(take):
                        writer.write_table(pa.Table.from_batches([batch.take(pa.array(take, pa.int64()))],
                                                                 schema=pf.schema_arrow))
        return out_path


@dataclass
class ShardReader:
    """Reads the examples `ids` of a streamed pool: from its record at `row` (JSONL: at byte
    `offset`, line `lineno`) up to row `stop_row`, converted as the scan converted them (layout
    `format`). Picklable: it is what a Ray actor gets instead of the examples (`ids`, a view on
    the pool's, then carries only the shard's bytes)."""

    config: DataConfig
    container: str
    format: str
    ids: CompactIds
    row: int
    stop_row: int
    offset: int = -1
    lineno: int = 0

    def _records(self) -> Iterator[tuple[str, int, Any]]:
        cfg = self.config
        if self.container == "jsonl":
            for loc, row, record, _, _ in jsonl_rows(cfg.path, cfg.encoding, self.offset, self.lineno - 1, self.row):
                yield loc, row, record
        elif self.container == "parquet":
            yield from parquet_rows(cfg.path, self.row)
        else:  # the rows themselves, by a slice of the split (rows count in the whole split)
            split = f"{parse_split(cfg.split).name}[{self.row}:{self.stop_row}]"
            yield from iter_raw(cfg.path, self.container, split, cfg.encoding, subset=cfg.subset,
                                revision=cfg.revision, data_files=cfg.data_files, streaming=cfg.streaming)

    def iter(self) -> Iterator[Example]:
        """The examples one at a time, each with the id the scan gave it; a record that is not the
        one the scan found there (the data changed since) is a DataError."""
        convert = Converter(self.config, self.container, self.format)
        n = 0
        for loc, row, record in self._records():
            example = convert(loc, row, record)
            if example is None:
                continue
            want = self.ids[n]
            if want != example.id and not want.startswith(example.id + "~"):
                raise DataError(f"{loc}: this record has id {example.id!r}, but the scan found {want!r} here; "
                                f"{self.config.path} changed since it was scanned: run again")
            example.id = want
            yield example
            n += 1
            if n == len(self.ids):
                return
        raise DataError(f"{self.config.path}: {n} of the shard's {len(self.ids)} examples found up to row "
                        f"{self.stop_row}; it changed since it was scanned: run again")

    def read(self) -> list[Example]:
        return list(self.iter())


def full_examples(examples: Sequence[Any]) -> Sequence[Any] | Iterator[Example]:
    """`examples` with their text: a streamed pool's read again one at a time, any other as given."""
    return examples.pool.iter_examples() if isinstance(examples, ExampleRefs) else examples


def ids_of(examples: Sequence[Any]) -> Sequence[str]:
    """The ids of `examples` in order: a streamed pool's own `CompactIds` (shared, not copied; a
    str made per id read), any other's gathered in a list."""
    return examples.ids if isinstance(examples, ExampleRefs) else [ex.id for ex in examples]


def sources_of(examples: Sequence[Any]) -> Sequence[str]:
    """The sources of `examples` in order, as `ids_of` gives their ids (a streamed pool's own `CodedStrs`)."""
    return examples.pool.sources if isinstance(examples, ExampleRefs) else [ex.source for ex in examples]
