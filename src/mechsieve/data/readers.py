"""Read a pool of examples from JSONL, JSON arrays, Parquet, CSV, a `datasets` folder or a hub id.

Hub ids and dataset folders are read as users name them (data/hub.py): a split as datasets spells
it (`train[:1000]`, `train[10%:20%]`; the slice applies to files and saved datasets too), a config
name (`subset`), a `revision`, `data_files`, and `streaming`.

Errors point at the record: `file:line` for JSONL, JSON and CSV, `file:row N` for Parquet and
saved datasets, with the field and what was expected. `skip_invalid=True` skips such records,
counts them and keeps their messages in `Pool.skipped`.

Text files are decoded line by line in `DataConfig.encoding` (UTF-8 by default, a leading UTF-8
byte-order mark is dropped), so a byte that does not decode is one invalid record at its line and
byte offset; a JSON array is decoded as a whole and such a byte stops the read. A Parquet file or
saved dataset that Arrow cannot read (cut short) is one DataError naming it; a saved dataset with
no rows is "no records".
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.formats import FORMATS, RecordError, detect_format, to_example
from mechsieve.data.hub import (
    BUILDERS,
    check_dataset_settings,
    is_dataset_folder,
    load_split,
    parse_split,
    saved_split,
    slice_rows,
)
from mechsieve.data.records import Example, Pool, make_unique_ids

CONTAINERS = ("jsonl", "json", "parquet", "csv", "disk", "datasets", "hub")
_GENERIC_STEMS = {"train", "test", "validation", "valid", "dev", "data", "dataset", "eval"}


class DataError(ValueError):
    """A pool could not be read; the message names the file and record."""


@dataclass
class DataConfig:
    """Where a pool comes from and how to read it."""

    path: str = ""
    """A file (.jsonl, .json, .parquet, .csv, optionally .gz), a `save_to_disk` folder, a hub id, a
    folder of data files `datasets.load_dataset` reads (hub layout, its README naming the subsets), or
    with `data_files` a datasets builder name (parquet, json, csv, arrow, text)."""
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "question_answer", "text", "mapping"] = "auto"
    """Record layout; `auto` detects it from the first record."""
    field_map: dict[str, str] = field(default_factory=dict)
    """For format=mapping: {prompt: COL, response: COL, id: COL, system: COL, source: COL}."""
    source: str = ""
    """Name recorded as each example's source. Default: a record's own `source` field (a non-empty
    string: a mixed pool written by mechsieve keeps its sources), else the file name (parent/stem
    for train.jsonl). A name given here wins over both; a field map's `source=COL` reads that column."""
    skip_invalid: bool = False
    """Skip malformed records (counted and reported) instead of stopping at the first."""
    limit: int = 0
    """Read at most this many valid records (0 = all)."""
    split: str = "train"
    """Split to read, as datasets spells it: `train`, `test`, or a slice such as `train[:1000]`,
    `train[100:200]`, `train[10%:20%]`, `train[-50:]`. Hub ids, dataset folders and saved DatasetDict
    folders read that split (a subset of a DatasetDict keeps it); a file or a single saved Dataset is
    one split, so only the slice applies. Rows are counted in the whole split."""
    subset: str = ""
    """Config name of a hub dataset or dataset folder (datasets' `name`): `openai/gsm8k` has `main`
    and `socratic` and no default. Default: the dataset's default config."""
    revision: str = ""
    """Revision of a hub dataset: a branch, tag or commit. Default: the main branch."""
    data_files: str | list[str] | dict[str, str | list[str]] = ""
    """Files of a hub dataset or dataset folder to read (glob patterns relative to it), or the files a
    builder name as path reads; a mapping {split: pattern(s)} names each file's split."""
    streaming: bool = False
    """Stream a hub dataset or dataset folder (datasets' streaming=True): records are taken as they
    come, up to `limit`, without preparing the whole split; a slice then needs absolute rows. Files
    and save_to_disk folders are read from disk as they are."""
    encoding: str = "utf-8"
    """Text encoding of JSONL, JSON and CSV files (utf-8, latin-1, cp1252, ...; any encoding that
    keeps ASCII as is). A UTF-8 byte-order mark is skipped. Subsets are written in UTF-8."""

    def __post_init__(self) -> None:
        if self.field_map and self.format == "auto":
            self.format = "mapping"
        check_choice("data.format", self.format, ("auto", *FORMATS))
        if self.limit < 0:
            raise ConfigError(f"data.limit={self.limit} must be >= 0")
        check_encoding("data.encoding", self.encoding)
        parse_split(self.split)


_ASCII_PROBE = '\n\r\t {}[]",:azAZ09'


def check_encoding(name: str, encoding: str) -> None:
    """Refuse an unknown encoding, or one that does not keep ASCII as is: lines are split on the
    newline byte before decoding, so that one bad byte costs one record, not the file."""
    try:
        codec = codecs.lookup(encoding).name
        ascii_safe = codec == "utf-8-sig" or _ASCII_PROBE.encode(codec) == _ASCII_PROBE.encode("ascii")
    except (LookupError, TypeError):
        raise ConfigError(f"{name}={encoding!r} is not a text encoding Python knows; "
                          "try utf-8, latin-1 or cp1252") from None
    if not ascii_safe:
        raise ConfigError(f"{name}={encoding!r} is not supported: it does not keep ASCII bytes as is "
                          f"(UTF-16/32); convert the file first, e.g. iconv -f {encoding} -t utf-8 IN > OUT")


def container_of(path: str, data_files: bool = False) -> str:
    """Guess the container from the path: file suffix, a saved-dataset folder, a dataset folder or
    builder name (`datasets`, read by load_dataset), or a hub id."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "disk"
        if data_files or is_dataset_folder(p):
            return "datasets"
        raise DataError(f"{path}: a folder, but neither one written by datasets.save_to_disk (no "
                        "dataset_info.json / state.json inside) nor one holding data files "
                        "(.parquet, .jsonl, .json, .csv, .arrow) or a dataset card (README.md)")
    if data_files and path in BUILDERS:
        return "datasets"
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


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _line_codec(encoding: str) -> tuple[str, bool]:
    """(codec to decode each line with, whether a leading UTF-8 byte-order mark is dropped)."""
    codec = codecs.lookup(encoding).name
    if codec in ("utf-8", "utf-8-sig"):
        return "utf-8", True
    return codec, False


def _bad_byte(path: str, data: bytes, err: UnicodeDecodeError, offset: int, encoding: str) -> str:
    where = " of the decompressed file" if path.endswith(".gz") else ""
    return f"byte 0x{data[err.start]:02x} at byte offset {offset + err.start}{where} is not valid {encoding}"


def _decoded_lines(path: str, encoding: str, offset: int = 0, lineno: int = 0
                   ) -> Iterator[tuple[int, int, str, str | None]]:
    """Yield (line number, byte offset of the line, text, problem) for every line from byte
    `offset` (the start of line `lineno + 1`; a streamed shard seeks to its own), split on \\n,
    \\r\\n and \\r as `open(newline="")` does. `problem` names a byte that does not decode (the
    text then has it replaced by U+FFFD), else None."""
    codec, drop_bom = _line_codec(encoding)
    with _open_binary(path) as fh:
        if offset:
            fh.seek(offset)
        for chunk in fh:
            for raw in chunk.splitlines(keepends=True) if b"\r" in chunk else (chunk,):
                lineno += 1
                start = 3 if lineno == 1 and drop_bom and raw.startswith(codecs.BOM_UTF8) else 0
                data = raw[start:] if start else raw
                try:
                    text, problem = data.decode(codec), None
                except UnicodeDecodeError as err:
                    text = data.decode(codec, "replace")
                    problem = (f"{_bad_byte(path, data, err, offset + start, encoding)}; if the file is in "
                               "another encoding, set it: --encoding latin-1 or --set data.encoding=latin-1 "
                               "(or cp1252, ...)")
                yield lineno, offset, text, problem
                offset += len(raw)


def jsonl_rows(path: str, encoding: str, offset: int = 0, lineno: int = 0, row: int = 0
               ) -> Iterator[tuple[str, int, Any, int, int]]:
    """(location, row, record, byte offset of its line, line number) of a JSONL file from byte
    `offset` (the start of line `lineno + 1`, row `row`): blank lines skipped, a line that does
    not decode or parse an `_Invalid` at its line. The offsets are what a streamed pool
    (data.stream) keeps, so that each shard seeks to its own first line."""
    for line, here, text, problem in _decoded_lines(path, encoding, offset, lineno):
        if problem is None and not text.strip():
            continue
        if problem is not None:
            record: Any = _Invalid(problem, decoding=True)
        else:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                record = _Invalid(f"not valid JSON ({err.msg} at column {err.colno})")
        yield f"{path}:{line}", row, record, here, line
        row += 1


def _decoded_text(path: str, encoding: str) -> str:
    """The whole file decoded; a byte that does not decode stops the read (named by line and offset)."""
    codec, drop_bom = _line_codec(encoding)
    with _open_binary(path) as fh:
        data = fh.read()
    start = 3 if drop_bom and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode(codec)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, start + err.start) + 1
        raise DataError(f"{path}:{line}: {_bad_byte(path, data[start:], err, start, encoding)}; "
                        "a JSON array is decoded as a whole, so --skip-invalid cannot skip this record: set the "
                        "file's encoding (--encoding latin-1 or --set data.encoding=latin-1, cp1252, ...) "
                        "or fix that byte") from None


def iter_raw(path: str, container: str, split: str = "train", encoding: str = "utf-8", *,
             subset: str = "", revision: str = "", data_files: Any = "", streaming: bool = False
             ) -> Iterator[tuple[str, int, Any]]:
    """Yield (location, row, raw record) for every record of the split (and slice) `split`;
    location is `file:line` or `file:row N`, rows counted in the whole split.

    A record that cannot be parsed or decoded comes as an `_Invalid` carrying why."""
    spec = parse_split(split)
    if container == "disk":
        records, start = saved_split(path, spec)
        yield from _table_rows(path, records, "saved dataset", start)
    elif container in ("datasets", "hub"):
        records, start = load_split(path, container, spec, subset, revision, data_files, streaming)
        yield from _table_rows(path, records, "hub dataset" if container == "hub" else "dataset", start)
    else:
        # a file is one split: only the slice applies, its name is not checked
        yield from slice_rows(lambda: _file_rows(path, container, encoding), spec)


def _file_rows(path: str, container: str, encoding: str) -> Iterator[tuple[str, int, Any]]:
    if container == "jsonl":
        for loc, row, record, _, _ in jsonl_rows(path, encoding):
            yield loc, row, record
    elif container == "json":
        yield from _iter_json_array(path, _decoded_text(path, encoding))
    elif container == "csv":
        yield from _iter_csv(path, encoding)
    elif container == "parquet":
        yield from _table_rows(path, _parquet_records(path), "Parquet file")
    else:
        raise DataError(f"{path}: unknown container {container!r}; expected one of {list(CONTAINERS)}")


class _Invalid:
    """A record that could not even be parsed (or decoded: `decoding`); carries why."""

    def __init__(self, why: str, decoding: bool = False):
        self.why = why
        self.decoding = decoding


def _iter_csv(path: str, encoding: str) -> Iterator[tuple[str, int, Any]]:
    """CSV rows; a row any of whose lines (a quoted field may span several) does not decode is
    an `_Invalid` at the first such line. A row the csv module refuses stops the read, named."""
    bad: dict[int, str] = {}

    def texts() -> Iterator[str]:
        for lineno, _, text, problem in _decoded_lines(path, encoding):
            if problem is not None:
                bad[lineno] = problem
            yield text

    _allow_long_csv_fields()
    reader = csv.DictReader(texts())
    try:
        reader.fieldnames  # noqa: B018 - reads the header, so that its line can be checked alone
        if bad:
            lineno = min(bad)
            raise DataError(f"{path}:{lineno}: the header: {bad[lineno]}; a header that does not decode "
                            "cannot be skipped")
        for row, record in enumerate(reader):
            if bad:
                lines = sorted(n for n in bad if n <= reader.line_num)
                if lines:
                    problem = bad[lines[0]]
                    for n in lines:
                        del bad[n]
                    yield f"{path}:{lines[0]}", row, _Invalid(problem, decoding=True)
                    continue
            yield f"{path}:{reader.line_num}", row, dict(record)
    except csv.Error as err:
        # DictReader.line_num is updated after a row is read; its reader's, as each line is.
        raise DataError(f"{path}:{reader.reader.line_num}: not a readable CSV row ({err})") from None


def _allow_long_csv_fields() -> None:
    """Lift the csv module's 128 KiB field limit (a long answer is data, not an error) to the
    largest a C long takes."""
    limit = sys.maxsize
    while csv.field_size_limit() < limit:
        try:
            csv.field_size_limit(limit)
        except OverflowError:  # a C long is 32 bits on Windows
            limit //= 2


def _iter_json_array(path: str, text: str) -> Iterator[tuple[str, int, Any]]:
    """Walk a JSON array element by element so each record keeps its line number.

    Line numbers come from one cursor that only moves forward: counting from the top for every
    record made a 20k-record file take 38 s."""
    decoder = json.JSONDecoder()
    seen = [0, 1]  # [position, line number at that position]

    def line_at(pos: int) -> int:
        seen[1] += text.count("\n", seen[0], pos)
        seen[0] = pos
        return seen[1]

    pos = _skip_ws(text, 0)
    if pos >= len(text):
        return
    if text[pos] != "[":
        # A single object, or a {"data": [...]} wrapper, is not what we read: say so.
        raise DataError(f"{path}:{line_at(pos)}: expected a JSON array of records "
                        f"(starting with '['), found {text[pos]!r}")
    pos = _skip_ws(text, pos + 1)
    row = 0
    while pos < len(text) and text[pos] != "]":
        line = line_at(pos)
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_at(err.pos)}: not valid JSON ({err.msg})") from err
        yield f"{path}:{line}", row, record
        row += 1
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise DataError(f"{path}:{line_at(pos)}: expected ',' or ']' between records")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_records(path: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _table_rows(path: str, records: Iterator[Any], what: str, start: int = 0) -> Iterator[tuple[str, int, Any]]:
    """(location, row, record) of a table's rows from row `start`; a file Arrow cannot read (cut short
    by a crash or a copy, or not what its name says) is a DataError naming it, not a traceback."""
    import pyarrow as pa

    row = start
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable {what} ({_one_line(err)}); was it written completely? "
                            "Write it again, or check the copy") from None
        yield f"{path}:row {row}", row, record
        row += 1


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


class Converter:
    """The conversion of one raw record (read_pool's and a streamed shard's) (location, row, record) -> Example, or None for a
    record skipped under `skip_invalid` (its message appended to `skipped`). `fmt`: the layout a
    scan detected (a shard must not detect its own from its first record)."""

    def __init__(self, cfg: DataConfig, container: str, fmt: str | None = None) -> None:
        self.cfg = cfg
        self.container = container
        self.fmt = fmt if fmt is not None else (None if cfg.format == "auto" else cfg.format)
        self.source = cfg.source or default_source(cfg.path)
        self.own_source = not cfg.source and "source" not in cfg.field_map
        self.skipped: list[str] = []

    def __call__(self, loc: str, row: int, record: Any) -> Example | None:
        cfg = self.cfg
        if isinstance(record, _Invalid) and record.decoding:
            if not cfg.skip_invalid:
                raise DataError(f"{loc}: {record.why} (or use --skip-invalid to skip such records)")
            self.skipped.append(f"{loc}: {record.why}")
            return None
        try:
            if isinstance(record, _Invalid):
                raise RecordError("<line>", "one JSON object per line", record.why)
            if self.fmt is None:
                self.fmt = _detect(record, self.container)
            example = to_example(record, self.fmt, self.source, row, cfg.field_map)
            if self.own_source:
                own_source(example, record)
            return example
        except RecordError as err:
            message = f"{loc}: {err}{_layout_note(record, self.container, self.fmt, cfg.format == 'auto')}"
            if not cfg.skip_invalid:
                raise DataError(message + " (use --skip-invalid to skip such records)") from err
            self.skipped.append(message)
            return None



def read_pool(
    path: str | Path | DataConfig,
    format: str = "auto",
    field_map: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    source: str = "",
    limit: int = 0,
    split: str = "train",
    subset: str = "",
    streaming: bool = False,
) -> Pool:
    """Read every record at `path` (of split `split`, config `subset` for hub datasets) into a Pool
    of Examples; a DataConfig gives every setting.

    Raises DataError naming `file:line`, the field and what was expected, unless
    `skip_invalid`, which skips and counts malformed records instead. An empty input is an error.
    """
    if isinstance(path, DataConfig):
        cfg = path
    else:
        cfg = DataConfig(path=str(path), format=format, field_map=dict(field_map or {}),
                         skip_invalid=skip_invalid, source=source, limit=limit, split=split, subset=subset,
                         streaming=streaming)
    if not cfg.path:
        raise DataError("no data path given (data.path / --pool)")
    container = container_of(cfg.path, bool(cfg.data_files))
    check_dataset_settings(cfg.path, container, cfg.subset, cfg.revision, cfg.data_files)
    convert = Converter(cfg, container)
    examples: list[Example] = []
    records = iter_raw(cfg.path, container, cfg.split, cfg.encoding, subset=cfg.subset, revision=cfg.revision,
                       data_files=cfg.data_files, streaming=cfg.streaming)
    for loc, row, record in records:
        example = convert(loc, row, record)
        if example is not None:
            examples.append(example)
        if cfg.limit and len(examples) >= cfg.limit:
            break
    skipped, fmt = convert.skipped, convert.fmt
    if not examples:
        why = f"; {len(skipped)} record(s) skipped as invalid, first: {skipped[0]}" if skipped else ""
        raise DataError(f"{cfg.path}: no records{why}")
    renamed = make_unique_ids(examples)
    return Pool(examples, cfg.path, container, fmt or "auto", skipped, renamed, split=parse_split(cfg.split).name,
                encoding=cfg.encoding)


def own_source(example: Example, record: Any) -> None:
    """A record's own `source` field (a non-empty string) becomes the example's source, over the
    file-name default; it then leaves `meta`, where it would be counted twice."""
    own = record.get("source") if isinstance(record, Mapping) else None
    if isinstance(own, str) and own.strip():
        example.source = own
        example.meta.pop("source", None)


def _present(record: Any, container: str) -> Any:
    """The fields that hold a value: a null is absent (`detect_format`), and so is an empty CSV
    cell, CSV's only way to leave a column out of a row."""
    if container == "csv" and isinstance(record, Mapping):
        return {k: v for k, v in record.items() if v != ""}
    return record


def _detect(record: Any, container: str) -> str:
    try:
        return detect_format(_present(record, container))
    except RecordError:
        if container != "csv":
            raise
        return detect_format(record)  # a row of empty cells: its layout, so that to_example names the field


def _layout_note(record: Any, container: str, fmt: str | None, detected: bool) -> str:
    """What a record error adds about the layout: the file's, and this record's where it differs
    (a file of mixed layouts)."""
    if fmt is None:
        return ""
    found = None
    if fmt != "mapping" and not isinstance(record, _Invalid):
        with contextlib.suppress(RecordError):
            found = detect_format(_present(record, container))
    if found is not None and found != fmt:
        how = " (detected from the first record)" if detected else ""
        return f" [mixed layouts: expected layout {fmt}{how}, found layout {found}]"
    return f" [layout {fmt}{', detected from the first record' if detected else ''}]"


def read_examples(paths: list[str], **kwargs: Any) -> Pool:
    """Read several files into one Pool (sources kept per file)."""
    pools = [read_pool(p, **kwargs) for p in paths]
    if len(pools) == 1:
        return pools[0]
    examples = [ex for pool in pools for ex in pool.examples]
    make_unique_ids(examples)
    return Pool(examples, ",".join(paths), "memory", "mixed",
                [s for p in pools for s in p.skipped])
