"""Scorers: one float per example of a pool. Base class, registry, and one file per method."""

from mechsieve.scorers.base import Scorer, ScorerError, ScoreResult
from mechsieve.scorers.registry import (
    BUILTIN,
    RegistryError,
    available,
    get_scorer_class,
    make_scorer,
    register,
    unregister,
)

__all__ = ["BUILTIN", "RegistryError", "ScoreResult", "Scorer", "ScorerError", "available",
           "get_scorer_class", "make_scorer", "register", "unregister"]
