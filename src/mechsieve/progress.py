"""Hugging Face progress bars switched off for one block, then put back as they were.

transformers' per-tensor loading bars and datasets' per-shard saving bars are noise beside the
command's own bars; but the switches are process-wide, so a library call that flips them must not
leave them flipped for the caller (a notebook that wants its download bars, a caller that turned
them off itself).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

_SWITCHES = {  # library: (module, is-enabled, disable, enable)
    "transformers": ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
                     "enable_progress_bar"),
    "datasets": ("datasets", "is_progress_bar_enabled", "disable_progress_bars", "enable_progress_bars"),
}


def progress_bar_enabled(library: Literal["transformers", "datasets"]) -> bool:
    """Whether `library`'s progress bars are on now."""
    module, is_enabled, _, _ = _SWITCHES[library]
    return bool(getattr(importlib.import_module(module), is_enabled)())


@contextmanager
def progress_bars_off(library: Literal["transformers", "datasets"]) -> Iterator[None]:
    """`library`'s progress bars off inside the block; on exit, the state found on entry.

    transformers' switch also flips huggingface_hub's bars (globally, dropping per-group
    settings), so the hub's states are saved and put back as well."""
    module_name, is_enabled, disable, enable = _SWITCHES[library]
    module = importlib.import_module(module_name)
    hub_states = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    hub_before = dict(hub_states)
    was_on = bool(getattr(module, is_enabled)())
    with _environment_wins():
        getattr(module, disable)()
    try:
        yield
    finally:
        if was_on:
            with _environment_wins():
                getattr(module, enable)()
        hub_states.clear()
        hub_states.update(hub_before)


@contextmanager
def _environment_wins() -> Iterator[None]:
    # HF_*_DISABLE_PROGRESS_BARS set by the user overrides the switches, with a warning on every
    # flip; the user chose that, so the flips made here stay silent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot (en|dis)able progress bars")
        yield
