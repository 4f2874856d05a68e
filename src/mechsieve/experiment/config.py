"""Settings of `mechsieve experiment`: which methods, seeds, budget, training and evaluations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mechsieve.config import ConfigError, check_positive
from mechsieve.data.readers import DataConfig
from mechsieve.data.render import RenderConfig
from mechsieve.evaluate.tasks import TaskConfig
from mechsieve.models.loading import ModelConfig
from mechsieve.train.config import TrainConfig


@dataclass
class ExperimentConfig:
    """Select with each method and seed, fine-tune with the same number of steps, evaluate."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pool: DataConfig = field(default_factory=DataConfig)
    """The candidate training data."""
    target: DataConfig = field(default_factory=DataConfig)
    """Examples of the target capability, for targeted methods (nait, rds, igds); path may be empty."""
    methods: list[str] = field(default_factory=lambda: ["random", "full"])
    """Selection methods (registered scorer names), `random` and `full` included for comparison."""
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method scorer settings, e.g. {nait: {layers: [10, 20]}}."""
    budget: int | float | str = 0.1
    """Examples each method selects: a fraction in (0, 1] or a count (`full` ignores it)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Each seed reruns selection (random's draw) and training (LoRA init, batch order)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings shared by every run; train.seed is replaced by each seed."""
    steps: int = 0
    """Optimizer steps of every run (equal training budget). 0: train.max_steps when set, else
    train.epochs over a budget-sized set, from the pool's mean micro-batches per example."""
    render: RenderConfig = field(default_factory=RenderConfig)
    eval: list[TaskConfig] = field(default_factory=list)
    """Evaluations after training, e.g. [{task: loss, data: {path: test.jsonl, limit: 100}}]."""
    eval_base: bool = True
    """Also evaluate the untrained base model (one row, `base`)."""
    out: str = "runs/experiment"
    """Results (results.json, results.csv, results.png) go here."""
    cache: str = ""
    """Cache of finished selection / training / evaluation steps (default: <out>/cache)."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods is empty; list at least one, e.g. [random, full]")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods={self.methods} lists a method twice")
        if "base" in self.methods:
            raise ConfigError("methods: 'base' is the untrained model's row (eval_base), not a method")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one, e.g. [0]")
        if not self.pool.path:
            raise ConfigError("pool.path is empty; give the candidate training data")
        if not self.eval:
            raise ConfigError("eval is empty; give at least one task, e.g. "
                              "[{task: loss, data: {path: test.jsonl}}]")
        check_positive("steps", self.steps, allow_zero=True)
        names = [t.label() for t in self.eval]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval tasks share a name ({names}); set eval[i].name to tell them apart")
        self._check_methods()

    def _check_methods(self) -> None:
        """Method names, their settings and the budget, checked before any data is read: a typo
        names the method it was meant for."""
        from mechsieve.config import check_settings, did_you_mean, from_dict
        from mechsieve.scorers.registry import RegistryError, available, get_scorer_class
        from mechsieve.select.budget import SelectionError, parse_budget

        try:
            parse_budget(self.budget)
        except SelectionError as err:
            raise ConfigError(str(err)) from None
        for method in dict.fromkeys([*self.methods, *self.method_settings]):
            key = "methods" if method in self.methods else f"method_settings.{method}"
            try:
                cls = get_scorer_class(method)
            except RegistryError as err:
                raise ConfigError(f"{key}: {err}{did_you_mean(method, available())}") from None
            settings = self.method_settings.get(method) or {}
            check_settings(cls.config_cls, settings, f"method_settings.{method}.", method)
            from_dict(cls.config_cls, settings, prefix=f"method_settings.{method}.")
