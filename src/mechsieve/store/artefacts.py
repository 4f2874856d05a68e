"""Artefacts: tensors as safetensors with a JSON of the settings that made them, side by side.

A loader given the settings it expects refuses an artefact made under other settings and names
each differing setting. The two files are written one after the other, so a crash between them
could leave new tensors beside old settings: each write stamps both with a digest of the tensors
(in the safetensors header metadata and in the JSON; a digest, not a random id, so the same
tensors give the same bytes), and a pair whose digests differ is torn: not there for
`artefact_exists` (so it is recomputed) and refused by `load_artefact`. Chunked writers let a long computation resume: chunk files appear
atomically one by one, and a rerun under the same settings skips the chunks already there.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.store.atomic import atomic_path, write_json


class SettingsMismatch(RuntimeError):
    """An artefact exists but was made under other settings; `differences` lists them."""

    def __init__(self, where: str | Path, differences: list[str]):
        self.differences = differences
        shown = "\n  ".join(differences[:12])
        more = f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
        super().__init__(
            f"{where} was made under other settings:\n  {shown}{more}\n"
            "Remove that folder (or pass --overwrite), or write to another --out / cache folder.")


class TornArtefact(SettingsMismatch):
    """The tensors and the settings of an artefact come from different writes (a write was
    interrupted between its two files, or two runs wrote the same folder at once)."""

    def __init__(self, where: str | Path):
        self.differences = [f"{WRITE_ID}: tensors and settings from different writes"]
        RuntimeError.__init__(
            self, f"{where}: torn artefact: tensors and settings from different writes; rerun to recompute "
            "it (or remove that folder)")


WRITE_ID = "tensors_sha256"
"""Key of the tensors' digest in the safetensors header metadata and in the settings JSON."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def diff_settings(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, `key: X there, Y here`, in key order."""
    a, b = flatten(json.loads(json.dumps(found, default=str))), flatten(json.loads(json.dumps(expected, default=str)))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            lines.append(f"{key}: not set there, {b[key]!r} here")
        elif key not in b:
            lines.append(f"{key}: {a[key]!r} there, not set here")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key]!r} there, {b[key]!r} here")
    return lines


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def save_artefact(folder: str | Path, name: str, tensors: Mapping[str, Any], settings: Mapping[str, Any],
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write `name.safetensors` and `name.json` ({"settings": ..., **extra}), each atomically,
    both stamped with the tensors' digest so that a pair from different writes is never read as one."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: _to_numpy(v) for k, v in tensors.items()}
    digest = tensors_digest(arrays)
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file(arrays, tmp, metadata={WRITE_ID: digest})
    write_json(folder / f"{name}.json", {"settings": settings, **(extra or {}), WRITE_ID: digest})
    return folder / f"{name}.safetensors"


def tensors_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the name, dtype, shape and bytes of every array, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
    return h.hexdigest()


def _tensors_write_id(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return (fh.metadata() or {}).get(WRITE_ID)


def _is_torn(meta: Mapping[str, Any], data_path: Path) -> bool:
    """Whether the settings and the tensors carry different digests (artefacts written before
    digests were stamped carry none on either side and are read as they are)."""
    return meta.get(WRITE_ID) != _tensors_write_id(data_path)


def load_artefact(folder: str | Path, name: str, expected: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an artefact; with `expected`, refuse one made under other settings (SettingsMismatch)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta_path, data_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_path.exists() or not data_path.exists():
        raise FileNotFoundError(f"{folder}: no artefact {name!r} ({meta_path.name} + {data_path.name})")
    meta = json.loads(meta_path.read_text())
    if _is_torn(meta, data_path):
        raise TornArtefact(folder / name)
    if expected is not None:
        differences = diff_settings(meta.get("settings", {}), expected)
        if differences:
            raise SettingsMismatch(folder / name, differences)
    return load_file(str(data_path)), meta


def artefact_exists(folder: str | Path, name: str) -> bool:
    """Both files there, from the same write (a torn pair counts as absent, to be recomputed)."""
    folder = Path(folder)
    meta_path, data_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not (meta_path.exists() and data_path.exists()):
        return False
    from safetensors import SafetensorError

    try:
        return not _is_torn(json.loads(meta_path.read_text()), data_path)
    except (OSError, ValueError, SafetensorError):  # unreadable or not safetensors at all: absent
        return False


class ChunkedWriter:
    """Chunk files `chunks/{name}-{k:05d}.safetensors` under a folder whose `run.json` holds the
    settings; opening it under other settings is refused, so a resume never mixes runs."""

    _pattern = re.compile(r"-(\d{5})\.safetensors$")

    def __init__(self, folder: str | Path, name: str, settings: Mapping[str, Any], overwrite: bool = False):
        self.folder = Path(folder)
        self.name = name
        self.settings = json.loads(json.dumps(settings, default=str))
        self.chunk_dir = self.folder / "chunks"
        run_file = self.folder / f"{name}.run.json"
        if overwrite:
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
            run_file.unlink(missing_ok=True)
        if run_file.exists():
            found = json.loads(run_file.read_text()).get("settings", {})
            differences = diff_settings(found, self.settings)
            if differences:
                raise SettingsMismatch(self.folder, differences)
        else:
            write_json(run_file, {"settings": self.settings})
        self.chunk_dir.mkdir(parents=True, exist_ok=True)

    def done(self) -> set[int]:
        return {int(m.group(1)) for p in self.chunk_dir.glob(f"{self.name}-*.safetensors")
                if (m := self._pattern.search(p.name))}

    def write(self, k: int, tensors: Mapping[str, Any]) -> None:
        from safetensors.numpy import save_file

        with atomic_path(self.chunk_dir / f"{self.name}-{k:05d}.safetensors") as tmp:
            save_file({key: _to_numpy(v) for key, v in tensors.items()}, tmp)

    def read(self, k: int) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.chunk_dir / f"{self.name}-{k:05d}.safetensors"))

    def cleanup(self) -> None:
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        (self.folder / f"{self.name}.run.json").unlink(missing_ok=True)
