"""Budgets and the selection math: how many examples, which end, ties, and unions over targets.

A budget is a fraction in (0, 1] of the pool, a count (int >= 1), a score threshold written
`score>=X` (also `>`, `<=`, `<`), or `full` (every example). Ranking is by score (descending for
`top`, ascending for `bottom`), ties broken by example id, so a selection does not depend on the
pool's order. A NaN score means "could not be scored": ranked last and never selected. With several targets (an [n, c] score matrix) the union of per-target top-k is taken
round-robin (best of target 1, best of target 2, ..., then the second best of each) and trimmed to
the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mechsieve.config import check_choice
from mechsieve.data.packed import CompactIds


class SelectionError(ValueError):
    """A budget that cannot be met or parsed, or a pool too small for it."""


_THRESHOLD = re.compile(r"^\s*score\s*(>=|<=|>|<)\s*([-+0-9.eE]+|[-+]?inf)\s*$")


@dataclass(frozen=True)
class Budget:
    """kind: fraction | count | threshold | full; value: the fraction, count or threshold; op for thresholds."""

    kind: Literal["fraction", "count", "threshold", "full"]
    value: float = 1.0
    op: str = ""

    def size(self, n: int) -> int:
        """Examples to select from a pool of `n` (thresholds: decided by the scores, -1 here)."""
        if n == 0:
            raise SelectionError("the pool is empty: nothing to select")
        if self.kind == "full":
            return n
        if self.kind == "fraction":
            return max(1, int(math.floor(self.value * n + 0.5)))
        if self.kind == "count":
            if self.value > n:
                raise SelectionError(f"budget of {int(self.value)} examples, but the pool has only {n}; "
                                     "lower the budget or give a fraction such as 0.1")
            return int(self.value)
        return -1

    def describe(self) -> str:
        if self.kind == "fraction":
            return f"{self.value:g} of the pool"
        if self.kind == "count":
            return f"{int(self.value)} examples"
        if self.kind == "threshold":
            return f"score {self.op} {self.value:g}"
        return "every example"


def parse_budget(budget: float | int | str | Budget) -> Budget:
    """0.1 -> 10%; 70 -> 70 examples; 'score>=0.5' -> threshold; 'full' -> all. Strings of numbers work too."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool):
        raise SelectionError(f"budget {budget!r}: give a fraction, a count, 'score>=X' or 'full'")
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text in ("full", "all"):
            return Budget("full")
        m = _THRESHOLD.match(text)
        if m:
            return Budget("threshold", float(m.group(2)), m.group(1))
        try:
            number = float(text)
        except ValueError:
            raise SelectionError(f"budget {budget!r} is not understood; give a fraction (0.1), a count (70), "
                                 "a threshold ('score>=0.5') or 'full'") from None
        budget = int(number) if number.is_integer() and ("." not in text and "e" not in text) else number
    if isinstance(budget, (int, np.integer)):
        if budget < 1:
            raise SelectionError(f"budget {budget} must be a count >= 1 (or a fraction in (0, 1])")
        return Budget("count", float(budget))
    value = float(budget)
    if not 0.0 < value <= 1.0:
        raise SelectionError(f"budget {value} must be a fraction in (0, 1] (or an integer count)")
    return Budget("fraction", value)


FEW_TIES = 4096
"""Tied ids `id_ranks` sorts as strs up to this many (~330 KB of them) even for a streamed pool:
sorting a few with Arrow costs more (~1 MB of RSS on its first use) than making them."""


def id_ranks(ids: Sequence[str], which: np.ndarray) -> np.ndarray:
    """[len(which)] int64 keys of the ids at positions `which` that order them as `sorted` orders
    the strs (code point by code point), equal ids by position (a repeat that `make_unique_ids`
    could not rename away: "a~2" in the data beside a renamed "a"). More than `FEW_TIES` of a
    streamed pool's (data.stream.CompactIds) from their bytes, without a str per id; any others by
    sorting the strs (the reference)."""
    if isinstance(ids, CompactIds) and len(which) > FEW_TIES:
        return ids.ranks(which)
    at = which.tolist()
    order = sorted(range(len(at)), key=lambda j: (ids[at[j]], at[j]))
    ranks = np.empty(len(at), dtype=np.int64)
    ranks[order] = np.arange(len(at))
    return ranks


def ranking(scores: np.ndarray, ids: Sequence[str], order: str = "top") -> np.ndarray:
    """Indices best first: by score (descending for top, ascending for bottom), ties by id. Only
    the ids of tied scores are compared (`id_ranks`): no list of every id is made."""
    check_choice("select.order", order, ("top", "bottom"))
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(ids):
        raise SelectionError(f"{scores.shape} scores for {len(ids)} examples")
    idx, run_start = _by_score(scores, order)
    tied = ~run_start  # in a run of two or more equal scores: not its first, or followed by one of it
    tied[:-1] |= ~run_start[1:]
    if tied.any():
        members = idx[tied]
        run = np.cumsum(run_start[tied])  # which run of ties, counted over the tied only
        idx[tied] = members[np.lexsort((id_ranks(ids, members), run))]
    return idx


def _by_score(scores: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices by score alone (a stable sort: tied scores in pool order), and along them [n] bool
    where each run of equal scores starts (NaN, "could not be scored": last, one run)."""
    missing = np.isnan(scores)
    key = np.where(missing, 0.0, -scores if order == "top" else scores)
    idx = np.lexsort((key, missing))
    key, missing = key[idx], missing[idx]
    run_start = np.ones(len(idx), dtype=bool)
    run_start[1:] = (key[1:] != key[:-1]) | (missing[1:] != missing[:-1])
    return idx, run_start


def union_ranking(per_target: np.ndarray, ids: Sequence[str], order: str = "top") -> np.ndarray:
    """Round-robin union of per-target rankings of [n, c] scores, each example once, best first."""
    per_target = np.asarray(per_target, dtype=np.float64)
    if per_target.ndim != 2 or per_target.shape[0] != len(ids):
        raise SelectionError(f"per-target scores of shape {per_target.shape} for {len(ids)} examples")
    orders = [ranking(per_target[:, c], ids, order) for c in range(per_target.shape[1])]
    if len(orders) == 1:
        return orders[0]
    turns = np.stack(orders, axis=1).ravel()  # the best of each target, then the second best of each, ...
    _, first = np.unique(turns, return_index=True)  # each example's first turn
    return turns[np.sort(first)]


@dataclass
class Choice:
    """order: indices best first; ranks: [n] 1 = best; selected: [n] bool."""

    order: np.ndarray
    ranks: np.ndarray
    selected: np.ndarray


def choose(scores: np.ndarray, ids: Sequence[str], budget: float | int | str | Budget,
           order: str = "top", per_target: np.ndarray | None = None) -> Choice:
    """Apply `budget` to `scores` (see module docstring); `per_target` switches to the union rule."""
    b = parse_budget(budget)
    n = len(ids)
    k = b.size(n)
    idx = union_ranking(per_target, ids, order) if per_target is not None else ranking(scores, ids, order)
    ranks = np.empty(n, dtype=np.int64)
    ranks[idx] = np.arange(1, n + 1)
    selected = np.zeros(n, dtype=bool)
    if b.kind == "threshold":
        s = np.asarray(scores, dtype=np.float64)
        ops = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}
        selected = ops[b.op](s, b.value)
    else:
        selected[idx[:k]] = True
        selected &= ~np.isnan(np.asarray(scores, dtype=np.float64))
    return Choice(idx, ranks, selected)
