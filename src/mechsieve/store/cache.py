"""A cache of artefacts keyed by (model identity, data fingerprint, settings).

The key material is hashed into the entry's folder name and kept inside it; a hit re-checks it,
so a corrupted or hand-edited entry is refused with the differing setting named rather than used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechsieve.store.artefacts import (
    SettingsMismatch,
    artefact_exists,
    diff_settings,
    load_artefact,
)


def cache_key(model: Any, data: str, settings: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"model": model, "data": data, "settings": settings}, default=str, sort_keys=True))


@dataclass
class CacheEntry:
    folder: Path
    name: str
    key: dict[str, Any]

    def exists(self) -> bool:
        return artefact_exists(self.folder, self.name)

    def check(self) -> None:
        meta = json.loads((self.folder / f"{self.name}.json").read_text())
        differences = diff_settings(meta.get("settings", {}), self.key)
        if differences:
            raise SettingsMismatch(self.folder, differences)

    def load(self):
        return load_artefact(self.folder, self.name, expected=self.key)


class Cache:
    """Entries under `root/kind/<hash of key>/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, kind: str, model: Any, data: str, settings: Any, name: str = "artefact") -> CacheEntry:
        key = cache_key(model, data, settings)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return CacheEntry(self.root / kind / digest, name, key)
