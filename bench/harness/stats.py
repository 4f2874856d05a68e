"""Seeds and spreads: every benchmark's repeated runs use SEEDS, and report mean and sample std
(ddof=1, the library's `mean_std`, as the experiment runner's tables do)."""

from __future__ import annotations

from collections.abc import Iterable

from mechsieve.experiment.report import mean_std

SEEDS = (0, 1, 2)
"""Seeds of a benchmark's random baselines and repeated fine-tunes."""


def spread(values: Iterable[float], digits: int = 5) -> dict:
    """`{"mean", "std", "n", "values"}` over seeds; std is the sample std (ddof=1)."""
    vals = [float(v) for v in values]
    mean, std = mean_std(vals)
    return {"mean": round(mean, digits), "std": round(std, digits), "n": len(vals), "std_ddof": 1,
            "values": [round(v, digits) for v in vals]}


def beats_by(value: float, others: dict, k: float = 2.0, lower: bool = True) -> bool:
    """Whether `value` is better than `others["mean"]` by more than `k` sample std (lower is
    better unless `lower=False`)."""
    margin = k * others["std"]
    return value < others["mean"] - margin if lower else value > others["mean"] + margin


__all__ = ["SEEDS", "beats_by", "mean_std", "spread"]
