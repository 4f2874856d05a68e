"""What every benchmark shares: data sources and seeded pools, one fine-tune-and-evaluate, seeds
and sample std, and the result writer (command, commit, machine, wall time; atomic; fixed keys).

The scripts in bench/ run as `python bench/<script>.py`, so bench/ is on the path and this
package imports as `harness`.
"""

from .finetune import MODEL, EvalSettings, FinetuneResult, evaluate, finetune_and_eval
from .results import LOCK, RESULTS, ROOT, Results, command_line, portable
from .sources import (
           B1_SOURCES,
           DATA,
           heldout_gsm8k,
           path_of,
           raw_rows,
           read_source,
           story_sentences,
)
from .stats import SEEDS, beats_by, mean_std, spread

__all__ = ["B1_SOURCES", "DATA", "LOCK", "MODEL", "RESULTS", "ROOT", "SEEDS", "EvalSettings", "FinetuneResult",
           "Results", "beats_by", "command_line", "evaluate", "finetune_and_eval", "heldout_gsm8k", "mean_std",
           "path_of", "portable", "raw_rows", "read_source", "spread", "story_sentences"]
