"""Selection: budgets (fraction, count, threshold, full), top or bottom, unions over targets."""

from mechsieve.select.budget import (
    Budget,
    SelectionError,
    choose,
    parse_budget,
    ranking,
    union_ranking,
)
from mechsieve.select.pipeline import Selection, select_examples, select_many, write_selection

__all__ = ["Budget", "Selection", "SelectionError", "choose", "parse_budget", "ranking", "select_examples",
           "select_many", "union_ranking", "write_selection"]
