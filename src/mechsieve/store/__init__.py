"""Artefacts on disk: atomic writes, safetensors + JSON settings, a keyed cache, chunked resume."""

from mechsieve.store.artefacts import (
    ChunkedWriter,
    SettingsMismatch,
    TornArtefact,
    artefact_exists,
    diff_settings,
    load_artefact,
    save_artefact,
)
from mechsieve.store.atomic import atomic_dir, atomic_path, write_json, write_text
from mechsieve.store.cache import Cache, CacheEntry

__all__ = ["Cache", "CacheEntry", "ChunkedWriter", "SettingsMismatch", "TornArtefact", "artefact_exists",
           "atomic_dir", "atomic_path", "diff_settings", "load_artefact", "save_artefact", "write_json", "write_text"]
