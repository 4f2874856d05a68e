"""Scorers by string key. Built-in ones are listed in `BUILTIN` (imported on first use, so
importing this module loads no method); `register` adds more at run time and refuses duplicates.

A new method is one file in `mechsieve/scorers/`, one line in `BUILTIN`, and one row in the
shared invariants table of tests/test_scorers.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from mechsieve.scorers.base import Scorer

BUILTIN: dict[str, str] = {
    "random": "mechsieve.scorers.baselines:RandomScorer",
    "full": "mechsieve.scorers.baselines:FullScorer",
    "loss": "mechsieve.scorers.baselines:LossScorer",
    "ifd": "mechsieve.scorers.baselines:IfdScorer",
    "rds": "mechsieve.scorers.baselines:RdsScorer",
    "kcenter": "mechsieve.scorers.kcenter:KCenterScorer",
    "nait": "mechsieve.scorers.nait:Nait",
    "vector-filter": "mechsieve.scorers.concept:VectorFilter",
    "projection-diff": "mechsieve.scorers.concept:ProjectionDiff",
    "concept-influence": "mechsieve.scorers.influence:ConceptInfluence",
    "influence": "mechsieve.scorers.influence:Influence",
    "grad-sim": "mechsieve.scorers.grad_sim:GradSim",
    "igds": "mechsieve.scorers.igds:Igds",
    "less": "mechsieve.scorers.less:Less",
}

_EXTRA: dict[str, type[Scorer]] = {}


class RegistryError(KeyError):
    """An unknown scorer name, or a name registered twice."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str, cls: type[Scorer] | None = None):
    """Register `cls` under `name` (usable as a decorator); a taken name is refused."""
    def add(klass: type[Scorer]) -> type[Scorer]:
        if name in BUILTIN or name in _EXTRA:
            raise RegistryError(f"a scorer named {name!r} is already registered; pick another name")
        if not (isinstance(klass, type) and issubclass(klass, Scorer)):
            raise TypeError(f"{klass!r} is not a mechsieve.scorers.Scorer subclass")
        _EXTRA[name] = klass
        return klass

    return add(cls) if cls is not None else add


def unregister(name: str) -> None:
    """Remove a run-time registration (built-ins stay)."""
    _EXTRA.pop(name, None)


def available() -> list[str]:
    return sorted({*BUILTIN, *_EXTRA})


def get_scorer_class(name: str) -> type[Scorer]:
    if name in _EXTRA:
        return _EXTRA[name]
    if name not in BUILTIN:
        raise RegistryError(f"unknown method {name!r}; available: {', '.join(available())}")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make_scorer(name: str, settings: dict[str, Any] | Any = None) -> Scorer:
    """An instance of scorer `name` with `settings` (a dict of its config fields, or the config)."""
    return get_scorer_class(name)(settings)
