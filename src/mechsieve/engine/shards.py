"""The shard folder: per-shard outputs with completion markers, the run's settings and its state.

```
<folder>/run.json                     settings of the run (a rerun under others is refused)
<folder>/state.safetensors + .json    what `prepare` computed on the driver (reused on resume)
<folder>/shard-00003.safetensors      shard 3's arrays      (written atomically, first)
<folder>/shard-00003.json             shard 3's JSON meta   (written atomically, second)
<folder>/shard-00003.done             the completion marker (written last): rows, the ids it covers
```
A shard counts as finished only when its marker exists, so a run killed mid-write leaves at most
a data file without a marker, which the next run overwrites. The run's settings hold the shard
size, and a marker the ids its shard covers: a shard of other examples than the plan's (another
shard size giving as many shards) is never reused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.engine.base import EngineError, Shard, ShardOutput
from mechsieve.store.artefacts import SettingsMismatch, diff_settings
from mechsieve.store.atomic import atomic_path, write_json


def _plain(value: Any) -> Any:
    """json.dumps default: numpy scalars as Python numbers (so the state round-trips exactly)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def to_json(data: Any) -> Any:
    """`data` as it reads back from JSON (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(data, default=_plain))


def split_arrays(data: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Top-level numpy arrays apart from the JSON-able rest."""
    arrays = {k: np.ascontiguousarray(v) for k, v in data.items() if isinstance(v, np.ndarray)}
    rest = to_json({k: v for k, v in data.items() if not isinstance(v, np.ndarray)})
    return arrays, rest


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


class ShardStore:
    """Per-shard outputs under `folder` (see the module docstring)."""

    def __init__(self, folder: str | Path, settings: Mapping[str, Any], overwrite: bool = False):
        self.folder = Path(folder)
        self.settings = to_json(dict(settings))
        run_file = self.folder / "run.json"
        if overwrite:
            self.remove()
        if run_file.exists():
            found = json.loads(run_file.read_text()).get("settings", {})
            differences = diff_settings(found, self.settings)
            if differences:
                raise SettingsMismatch(self.folder, differences + [
                    "(shards of an interrupted run; set engine.overwrite=true / --overwrite-shards to discard "
                    "them)"])
        else:
            write_json(run_file, {"settings": self.settings})

    def path(self, k: int, suffix: str) -> Path:
        return self.folder / f"shard-{k:05d}{suffix}"

    def done(self, shards: list[Shard] | None = None) -> set[int]:
        """Indices of the shards whose marker exists; given the plan's `shards`, only those whose
        marker names the ids of the plan's shard (any other is computed again)."""
        found = {int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.done")}
        if shards is None:
            return found
        return {s.index for s in shards if s.index in found and self.marker(s.index).get("ids") == s.ids}

    def marker(self, k: int) -> dict[str, Any]:
        return json.loads(self.path(k, ".done").read_text())

    def write(self, k: int, output: ShardOutput, seconds: float = 0.0, ids: Sequence[str] | None = None) -> None:
        """Shard `k`'s arrays, then its meta, then its marker (with the `ids` it covers); each file
        atomically."""
        _save_arrays(self.path(k, ".safetensors"), output.arrays)
        write_json(self.path(k, ".json"), to_json(output.meta))
        n = len(next(iter(output.arrays.values()))) if output.arrays else 0
        write_json(self.path(k, ".done"), {"shard": k, "rows": n, "seconds": round(seconds, 4),
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           **({"ids": list(ids)} if ids is not None else {})})

    def read(self, k: int, ids: Sequence[str] | None = None) -> ShardOutput:
        """Shard `k`'s output; given the `ids` of the plan's shard `k`, refuse a shard of others."""
        if not self.path(k, ".done").exists():
            raise FileNotFoundError(f"{self.path(k, '.done')}: shard {k} is not finished")
        if ids is not None:
            found = self.marker(k).get("ids")
            if found != list(ids):
                def span(names: list[str] | None) -> str:
                    return f"{names[0]!r}..{names[-1]!r} ({len(names)})" if names else repr(names)

                raise EngineError(f"{self.path(k, '.done')}: shard {k} holds ids {span(found)}, but the plan's "
                                  f"shard {k} has {span(list(ids))}; set engine.overwrite=true / --overwrite-shards "
                                  "to compute the shards again")
        meta = json.loads(self.path(k, ".json").read_text())
        return ShardOutput(_load_arrays(self.path(k, ".safetensors")), meta)

    def save_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Write the driver's state; return it as it reads back (what every worker then sees)."""
        arrays, rest = split_arrays(state)
        _save_arrays(self.folder / "state.safetensors", arrays)
        write_json(self.folder / "state.json", rest)
        return {**rest, **arrays}

    def load_state(self) -> dict[str, Any] | None:
        """The saved state, or None when this run has none yet."""
        meta, data = self.folder / "state.json", self.folder / "state.safetensors"
        if not (meta.exists() and data.exists()):
            return None
        return {**json.loads(meta.read_text()), **_load_arrays(data)}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
