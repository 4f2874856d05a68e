"""The feature cache: arrays of the shared feature pass (capture.shared) keyed by (model identity,
data fingerprint, the feature's full key), so a run that asks for one more method computes only
the features that are missing. Entries are artefacts (safetensors + JSON) under `root/features/`;
a torn or mismatching entry counts as absent and is recomputed (and rewritten)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.store.artefacts import (
    SettingsMismatch,
    artefact_exists,
    load_artefact,
    save_artefact,
)
from mechsieve.store.cache import Cache


class FeatureCache:
    """`load` / `save` of one feature's arrays; `hits` / `misses` count the lookups."""

    NAME = "feature"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._cache = Cache(self.root)
        self.hits = 0
        self.misses = 0

    def _entry(self, identity: Any, fingerprint: str, key: dict[str, Any]):
        return self._cache.entry("features", identity, fingerprint, key, name=self.NAME)

    def load(self, identity: Any, fingerprint: str, key: dict[str, Any]) -> dict[str, np.ndarray] | None:
        from safetensors import SafetensorError

        entry = self._entry(identity, fingerprint, key)
        if not artefact_exists(entry.folder, entry.name):
            self.misses += 1
            return None
        try:
            arrays, _ = load_artefact(entry.folder, entry.name, expected=entry.key)
        except (SettingsMismatch, OSError, ValueError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def save(self, identity: Any, fingerprint: str, key: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
        entry = self._entry(identity, fingerprint, key)
        return save_artefact(entry.folder, entry.name, arrays, entry.key)
