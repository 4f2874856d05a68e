"""Experiments: each selection method and seed -> select, train (equal steps), evaluate, compare."""

from mechsieve.experiment.config import ExperimentConfig
from mechsieve.experiment.report import format_table, summarize
from mechsieve.experiment.runner import ExperimentResult, equal_steps, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "equal_steps", "format_table", "run_experiment", "summarize"]
