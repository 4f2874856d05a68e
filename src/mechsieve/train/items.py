"""Training items: token ids with labels (-100 where no loss), their collation, and their files.

A `TrainItem` is what the trainer consumes and what a token masker (XTF) writes: `labels[t]` is
`input_ids[t]` where the loss is taken and -100 elsewhere (prompt tokens, masked tokens,
padding). Labels are aligned with the ids, as in Hugging Face: the logits at `t - 1` predict
`labels[t]`. Collation pads ids and labels side by side, so a mask always reaches the loss.

Tokenized files are read with their `labels` as given, or TRL-style without labels: then the
labels are built from TRL's mask columns as TRL's SFTTrainer builds them (`input_ids[t]` where
every mask column, `completion_mask` / `assistant_masks`, is 1, and `attention_mask` when given
is not 0; -100 elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechsieve.capture.batching import pad_rows, position_ids
from mechsieve.data.readers import DataError
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, render_pool

IGNORE = -100
LABEL_MASKS = ("completion_mask", "assistant_masks")
"""TRL's per-token mask columns (1: the loss is taken on the token), read when there are no labels."""


@dataclass
class TrainItem:
    """One training sequence. input_ids: [t] int64; labels: [t] int64, -100 where no loss."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 1:
            raise ValueError(f"input_ids {self.input_ids.shape} and labels {self.labels.shape} "
                             "must be 1-d and of the same length")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_targets(self) -> int:
        """Tokens the loss is taken on (the first token has no prediction, so it never counts)."""
        return int((self.labels[1:] != IGNORE).sum())


def items_from_examples(examples: Sequence[Example], tokenizer: Any,
                        render_cfg: RenderConfig | None = None) -> list[TrainItem]:
    """Render examples; labels are the ids on response tokens and -100 on everything else."""
    rendered, _ = render_pool(examples, tokenizer, render_cfg or RenderConfig())
    return [TrainItem(r.input_ids, np.where(r.response_mask, r.input_ids, IGNORE)) for r in rendered]


@dataclass
class ItemBatch:
    """Padded items. Row r holds item `indices[r]` right-padded; labels are -100 on padding."""

    input_ids: torch.Tensor  # [b, t] long
    labels: torch.Tensor  # [b, t] long
    attention_mask: torch.Tensor  # [b, t] long
    position_ids: torch.Tensor  # [b, t] long
    indices: list[int]

    def to(self, device: Any) -> ItemBatch:
        return ItemBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device),
                         self.position_ids.to(device), self.indices)

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate_items(items: Sequence[TrainItem], indices: Sequence[int], pad_id: int) -> ItemBatch:
    """Right-pad `items[i] for i in indices`; ids and labels move together, so masks survive."""
    chosen = [items[i] for i in indices]
    ids, _ = pad_rows([np.asarray(it.input_ids, dtype=np.int64) for it in chosen], pad_id)
    labels, _ = pad_rows([np.asarray(it.labels, dtype=np.int64) for it in chosen], IGNORE)
    att, _ = pad_rows([np.ones(len(it), dtype=np.int64) for it in chosen], 0)
    att_t = torch.from_numpy(att)
    return ItemBatch(torch.from_numpy(ids), torch.from_numpy(labels), att_t, position_ids(att_t), list(indices))


def save_tokenized(path: str | Path, items: Sequence[TrainItem], extra: dict[str, list] | None = None,
                   parquet: str | Path | None = None) -> Path:
    """Write items as a `datasets.save_to_disk` dataset in folder `path`: columns input_ids,
    labels (+ extra). The dataset's files are swapped into the folder one by one (each whole, the
    state file last); other files there are kept, and the data files of a dataset saved there
    before are removed only when the new one does not reuse their names.

    `parquet`: also write the same table (columns, features) to this Parquet file, atomically.
    `datasets.load_dataset` and `trl sft --dataset_name` refuse a folder holding a save_to_disk
    dataset, so the Parquet copy goes to its own folder (`mask-tokens` uses `parquet/train.parquet`)."""
    import os
    import shutil
    import tempfile

    import datasets

    from mechsieve.progress import progress_bars_off

    columns: dict[str, list] = {"input_ids": [it.input_ids.tolist() for it in items],
                                "labels": [it.labels.tolist() for it in items]}
    for name, values in (extra or {}).items():
        if name in columns:
            raise ValueError(f"extra column {name!r} clashes with input_ids/labels")
        if len(values) != len(items):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(items)} items")
        columns[name] = list(values)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "labels": datasets.Sequence(datasets.Value("int64"))})
    ds = datasets.Dataset.from_dict({k: columns[k] for k in ("input_ids", "labels")}, features=features)
    for name in columns:
        if name not in ("input_ids", "labels"):
            ds = ds.add_column(name, columns[name])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(".tokenized.*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    old_files = _saved_data_files(path)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".tokenized.", suffix=".tmp"))
    try:
        # datasets' own per-shard bar is noise beside the command's progress; keep it quiet.
        with progress_bars_off("datasets"):
            ds.save_to_disk(str(tmp))
        # data files first, state.json (which names them) last: a reader sees whole files only
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: (n == "state.json", n))
        for name in names:
            os.replace(tmp / name, path / name)
        for name in old_files - set(names):
            (path / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if parquet is not None:
        from mechsieve.store.atomic import atomic_path

        with atomic_path(parquet) as tmp_file, progress_bars_off("datasets"):
            ds.to_parquet(tmp_file)
    return path


def _saved_data_files(folder: Path) -> set[str]:
    """The data files a dataset saved in `folder` lists in its state.json (none when there is none)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return {Path(f["filename"]).name for f in state.get("_data_files", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def is_tokenized(path: str | Path) -> bool:
    """Whether `path` holds tokenized items (input_ids with labels, or with TRL's completion_mask /
    assistant_masks) rather than records."""
    try:
        columns = set(_columns(Path(path)))
    except Exception:
        return False
    return "input_ids" in columns and bool(columns & {"labels", *LABEL_MASKS})


def _columns(path: Path) -> list[str]:
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return list(ds.column_names)
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    if path.name.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    return list(json.loads(line))
        return []
    raise ValueError(f"{path}: not a saved dataset folder, .parquet or .jsonl")


def load_tokenized(path: str | Path) -> list[TrainItem]:
    """Read items from a save_to_disk folder, a .parquet or a .jsonl: input_ids with labels, or
    TRL-style input_ids with completion_mask / assistant_masks (+ attention_mask) and no labels,
    whose labels are built as TRL builds them (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    rows: list[tuple[Any, dict[str, Any]]] = []  # (ids, {label column: values}) per row
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        used = _label_columns(path, list(ds.column_names))
        columns = {name: list(ds[name]) for name in used}
        rows = [(ids, {name: columns[name][i] for name in used}) for i, ids in enumerate(list(ds["input_ids"]))]
    elif path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        used = _label_columns(path, table.column_names)
        columns = {name: table.column(name).to_pylist() for name in used}
        rows = [(ids, {name: columns[name][i] for name in used})
                for i, ids in enumerate(table.column("input_ids").to_pylist())]
    elif path.name.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err}); tokenized items are one "
                                    "object with input_ids and labels a line") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected an object with input_ids and labels, "
                                    f"got {type(row).__name__}")
                used = _label_columns(f"{path}:{lineno}", list(row))
                rows.append((row["input_ids"], {name: row[name] for name in used}))
    else:
        raise DataError(f"{path}: tokenized items come as a save_to_disk folder, .parquet or .jsonl")
    return [_item(path, row, ids, given) for row, (ids, given) in enumerate(rows)]


def _item(path: Path, row: int, ids: Any, given: dict[str, Any]) -> TrainItem:
    """Row `row` of a tokenized file as an item; DataError naming the row if it is not one.
    `given`: its labels, or TRL's mask columns (and attention_mask) to build them from."""
    kinds = f"{' and '.join(['input_ids', *given])} must be lists of token ids (integers)"
    arrays = {}
    for name, values in {"input_ids": ids, **given}.items():
        try:
            arrays[name] = np.asarray(values, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as err:
            raise DataError(f"{path}: row {row}: {kinds} ({err})") from err
    if any(a.ndim != 1 for a in arrays.values()):
        shapes = " and ".join(str(a.shape) for a in arrays.values())
        raise DataError(f"{path}: row {row}: {kinds}; got shapes {shapes}")
    ids_a = arrays.pop("input_ids")
    for name, a in arrays.items():
        if len(a) != len(ids_a):
            raise DataError(f"{path}: row {row} has {len(ids_a)} input_ids but {len(a)} {name}")
    if "labels" in arrays:
        return TrainItem(ids_a, arrays["labels"])
    keep = np.ones(len(ids_a), dtype=bool)
    for a in arrays.values():  # the mask columns and attention_mask: 0 means no loss
        keep &= a != 0
    return TrainItem(ids_a, np.where(keep, ids_a, IGNORE))


def _label_columns(where: Any, columns: list[str]) -> list[str]:
    """The columns labels come from: `labels` when present, else TRL's mask columns (with
    attention_mask when present); DataError naming what is missing."""
    if "input_ids" in columns and "labels" in columns:
        return ["labels"]
    masks = [c for c in LABEL_MASKS if c in columns]
    if "input_ids" in columns and masks:
        return masks + (["attention_mask"] if "attention_mask" in columns else [])
    missing = [c for c in ("input_ids", "labels") if c not in columns]
    raise DataError(f"{where}: missing column(s) {missing}; tokenized items need input_ids and labels, or "
                    f"input_ids and TRL's completion_mask (found {sorted(columns)}). A pool of records is read "
                    "with read_pool instead.")
