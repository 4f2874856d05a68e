"""Data the `datasets` library reads: hub ids, local dataset folders and `save_to_disk` folders.

A split is spelled as datasets spells it (`train`, `train[:1000]`, `train[10%:20%]`, `test[-50:]`,
`train[:10%](pct1_dropremainder)`), and `SplitSpec.rows` resolves a slice to the rows datasets'
`ReadInstruction` gives (tests/test_hub_data.py checks they agree). The same slice applies to a hub
dataset, a saved DatasetDict and a local file, and rows are always counted in the whole split, so
`file:row N` names the same record whatever slice was read.

A saved DatasetDict is opened one split at a time (`load_from_disk(folder/split)`): opening the
whole dict fails (datasets' IndexError) when any of its splits was saved with no rows, whichever
split was asked for.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from mechsieve.config import ConfigError

# `name=` builders datasets ships: with data_files, `path: parquet` reads those files
BUILDERS = ("parquet", "json", "csv", "arrow", "text")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".ndjson")

_SPLIT_RE = re.compile(r"^(?P<name>\w+(\.\w+)*)(\[(?P<start>-?[\d_]+%?)?:(?P<stop>-?[\d_]+%?)?\])?"
                       r"(\((?P<rounding>[^)]*)\))?$")
_SPLIT_HELP = "e.g. train, test, train[:1000], train[100:200], train[10%:20%], train[-50:]"


class SplitSpec(NamedTuple):
    """One split and an optional slice of it; `start`/`stop` as written (rows, or percents when
    `percent`), None where left open."""

    name: str
    start: int | None = None
    stop: int | None = None
    percent: bool = False
    rounding: str = "closest"
    text: str = ""

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    @property
    def needs_length(self) -> bool:
        """Whether the rows depend on the split's length (percents, counting from the end)."""
        return self.percent or any(b is not None and b < 0 for b in (self.start, self.stop))

    def rows(self, n: int) -> range:
        """Rows [from, to) of a split of `n` rows, as datasets resolves the slice (`_rel_to_abs_instr`)."""
        if self.percent and self.rounding == "pct1_dropremainder" and n < 100:
            raise ConfigError(f"split {self.text!r}: pct1_dropremainder rounding on a split of {n} rows "
                              "(fewer than 100) always reads nothing; drop the (pct1_dropremainder)")

        def bound(value: int | None, default: int) -> int:
            if value is None:
                return default
            if self.percent:
                value = int(round(value * n / 100)) if self.rounding == "closest" else value * (n // 100)
            if value < 0:
                value = max(n + value, 0)
            return min(value, n)

        return range(bound(self.start, 0), bound(self.stop, n))


def parse_split(text: str, setting: str = "data.split") -> SplitSpec:
    """The split spec `text`, or a ConfigError naming `setting` and what is accepted."""
    if "+" in text:
        raise ConfigError(f"{setting}={text!r}: one split at a time ({_SPLIT_HELP}); read the other split "
                          "as another pool")
    match = _SPLIT_RE.match(text.strip())
    if not match:
        raise ConfigError(f"{setting}={text!r} is not a split as datasets spells it ({_SPLIT_HELP})")
    start, stop, rounding = match["start"], match["stop"], match["rounding"]
    percent = any(b is not None and b.endswith("%") for b in (start, stop))
    if rounding is not None and not percent:
        raise ConfigError(f"{setting}={text!r}: a rounding, ({rounding}), goes with a percent slice only")
    if rounding not in (None, "closest", "pct1_dropremainder"):
        raise ConfigError(f"{setting}={text!r}: rounding ({rounding}) is not allowed; choose closest "
                          "or pct1_dropremainder")
    bounds = [None if b is None else int(b.rstrip("%")) for b in (start, stop)]
    if percent and any(b is not None and abs(b) > 100 for b in bounds):
        raise ConfigError(f"{setting}={text!r}: a percent bound lies between -100% and 100%")
    return SplitSpec(match["name"], bounds[0], bounds[1], percent, rounding or "closest", text)


def slice_rows(rows_of: Callable[[], Iterator[tuple[str, int, Any]]], spec: SplitSpec
               ) -> Iterator[tuple[str, int, Any]]:
    """The (location, row, record) items `rows_of()` yields whose row lies in the slice of `spec`;
    a slice that needs the length reads the rows twice (once to count them)."""
    if not spec.sliced:
        yield from rows_of()
        return
    if spec.needs_length:
        rows = spec.rows(sum(1 for _ in rows_of()))
    else:
        rows = range(spec.start or 0, sys.maxsize if spec.stop is None else spec.stop)
    for item in rows_of():
        if item[1] >= rows.stop:
            return
        if item[1] >= rows.start:
            yield item


def is_dataset_folder(folder: Path) -> bool:
    """A folder `load_dataset` reads: a dataset card (hub layout, its `configs:` naming the
    subsets) or data files somewhere under it."""
    if (folder / "README.md").exists():
        return True
    return any(f.name.lower().removesuffix(".gz").endswith(DATA_SUFFIXES) for f in folder.rglob("*")
               if f.is_file() and not f.name.startswith("."))


def saved_split(path: str, spec: SplitSpec) -> tuple[Iterator[dict[str, Any]], int]:
    """(records, first row) of a `save_to_disk` folder: the split `spec` names of a DatasetDict
    (a single Dataset is its one split), sliced. No data file at all is no records."""
    from mechsieve.data.readers import DataError

    folder = Path(path)
    dict_file = folder / "dataset_dict.json"
    if dict_file.exists():
        try:
            splits = list(json.loads(dict_file.read_text(encoding="utf-8"))["splits"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a readable saved dataset ({_one_line(err)} in dataset_dict.json); "
                            "was it written completely? Save it again with save_to_disk") from None
        if spec.name not in splits:
            raise DataError(f"{path}: a DatasetDict without split {spec.name!r}; it has {splits} "
                            "(set --split or data.split)")
        folder = folder / spec.name
    if _no_saved_rows(folder):
        return iter(()), 0
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(folder))
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError) as err:
        raise DataError(f"{path}: not a readable saved dataset ({_one_line(err)}); was it written completely? "
                        "Save it again with save_to_disk, or check the copy") from None
    rows = spec.rows(len(ds))
    return iter(ds.select(rows) if rows != range(len(ds)) else ds), rows.start


def _no_saved_rows(folder: Path) -> bool:
    """Whether a saved Dataset folder holds no data file (`load_from_disk` fails on it)."""
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # no readable state.json: let load_from_disk say what is wrong


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def load_split(path: str, container: str, spec: SplitSpec, subset: str = "", revision: str = "",
               data_files: Any = "", streaming: bool = False) -> tuple[Iterator[dict[str, Any]], int]:
    """(records, first row) of a hub dataset (`container` hub) or a local dataset folder / builder
    with data_files (`datasets`), through `datasets.load_dataset`; streamed lazily with `streaming`."""
    from mechsieve.data.readers import DataError

    if container == "hub" and offline():
        raise DataError(f"{path}: looks like a hub dataset id, but the hub is offline here "
                        "(HF_HUB_OFFLINE=1); pass a local file or a save_to_disk folder")
    if streaming and spec.needs_length:
        raise ConfigError(f"data.split={spec.text!r}: a percent slice or one counted from the end needs the "
                          "split's length, which streaming does not know; give absolute rows (e.g. train[:1000], "
                          "train[100:200]) or set data.streaming=false")
    import datasets

    kwargs: dict[str, Any] = {"split": spec.name, "streaming": streaming}
    for key, value in (("name", subset), ("revision", revision), ("data_files", data_files)):
        if value:
            kwargs[key] = value
    what = "as a hub dataset" if container == "hub" else "with datasets.load_dataset"
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as err:  # datasets and the hub raise many kinds; name the likely causes
        raise DataError(f"{path}: could not load it {what} ({_one_line(err)}){_hint(err, container)}") from err
    if streaming:
        start = spec.start or 0
        if start:
            ds = ds.skip(start)
        if spec.stop is not None:
            ds = ds.take(max(spec.stop - start, 0))
        return iter(ds), start
    rows = spec.rows(len(ds))
    return iter(ds.select(rows) if rows != range(len(ds)) else ds), rows.start


def check_dataset_settings(path: str, container: str, subset: str, revision: str, data_files: Any) -> None:
    """Refuse a setting that means nothing for this input rather than ignore it."""
    hub_only: dict[str, Any] = {"revision": revision} if container != "hub" else {}
    if container not in ("datasets", "hub"):
        hub_only = {"subset": subset, "data_files": data_files, **hub_only}
    for key, value in hub_only.items():
        if value:
            kind = {"disk": "save_to_disk folder", "datasets": "local dataset"}.get(container, f"{container} file")
            where = "hub ids" if key == "revision" else "hub ids and dataset folders"
            raise ConfigError(f"data.{key}={value!r}: {path} is a {kind}, and {key} applies to {where} only; "
                              "drop the setting, or point data.path at the dataset")


def _hint(err: Exception, container: str) -> str:
    text = str(err)
    if "Config name is missing" in text or "BuilderConfig" in text:
        return "; choose the dataset's config with --subset NAME (data.subset)"
    if "split" in text.lower() and ("Unknown" in text or "Bad split" in text):
        return "; choose one of its splits with --split NAME (data.split)"
    if "revision" in text.lower():
        return "; check data.revision (a branch, tag or commit of the dataset)"
    if container == "hub":
        return "; if it is a local file, check the path; offline, pass a local file"
    return "; check data.path, data.subset and data.data_files"


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())
