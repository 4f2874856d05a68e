"""The scorer contract: a pool (and its settings) in, one float per example out.

A scorer is a class with a settings dataclass (`Scorer.config_cls`, names paired: `NaitConfig` /
`Nait`) and one required method, `score`. Class attributes say what it needs: `needs_model`
(a `LoadedModel`, run through `mechsieve.capture`), `needs_target` (an in-domain target pool), and
`default_order` (`top`: high scores are selected first; `bottom`: low scores are).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from mechsieve.config import from_dict, to_dict
from mechsieve.data.records import Pool


class ScorerError(ValueError):
    """A scorer was called without what it needs (a model, a target set) or on an unusable pool."""


@dataclass
class NoSettings:
    """A scorer without settings."""


@dataclass
class ScoreResult:
    """scores: [n] float64 aligned with `pool.examples`.

    per_target: optional [n, c] float64, one column per target capability (selection then takes
    the union of per-capability top-k); target_names names the columns. explanations: JSON-able
    method-specific details; timings: seconds per phase.
    """

    scores: np.ndarray
    explanations: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    per_target: np.ndarray | None = None
    target_names: list[str] = field(default_factory=list)


class Scorer(ABC):
    """Base of every scorer; see the module docstring."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = NoSettings
    needs_model: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False
    default_order: ClassVar[Literal["top", "bottom"]] = "top"

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.config_cls()
        elif isinstance(config, dict):
            config = from_dict(self.config_cls, config, prefix=f"{self.name}.")
        self.config = config

    @property
    def order(self) -> Literal["top", "bottom"]:
        """Which end of the scores is selected first; a setting may change it (loss: low)."""
        return self.default_order

    def settings(self) -> dict[str, Any]:
        """JSON-able settings, recorded beside every selection."""
        return to_dict(self.config)

    @abstractmethod
    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        """Score every example of `pool`: ScoreResult.scores is [len(pool)] float64."""

    def check_inputs(self, pool: Pool, target: Pool | None, loaded: Any) -> None:
        """Refuse an empty pool, or a call without the model / target this scorer needs."""
        if len(pool.examples) == 0:
            raise ScorerError(f"{self.name}: the pool is empty; nothing to score")
        if self.needs_model and loaded is None:
            raise ScorerError(f"{self.name} reads the model: pass loaded=mechsieve.models.load_model(...) "
                              "(the CLI loads --model, default smollm2-135m-instruct)")
        if self.needs_target and (target is None or len(target.examples) == 0):
            raise ScorerError(f"{self.name} scores against a target set: pass target= a pool of "
                              "in-domain examples (CLI: --target FILE)")
