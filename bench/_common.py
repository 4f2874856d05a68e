"""What every benchmark records beside its figures: the command that made them.

Imported by the scripts in this folder (run as `python bench/<script>.py`, so bench/ is on the path).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Environment settings that change what a run reuses (the model and feature caches), so a rerun
# needs them to do the same work.
RECORDED_ENV = ("MECHSIEVE_CACHE",)


def command_line(script: str, argv: list[str] | None = None, runner: str = "") -> str:
    """`python bench/<script>.py ARGS` as typed from the repository root.

    ARGS are `argv`, else the process's own arguments; `runner` goes before `python` (a lock, say);
    any of RECORDED_ENV that is set goes in front as NAME=value; values and arguments are quoted
    for the shell where they need it, so the line reruns as recorded.
    """
    path = Path(script).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    args = sys.argv[1:] if argv is None else argv
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in RECORDED_ENV if os.environ.get(name)]
    return " ".join([*env, *([runner] if runner else []), shlex.join(["python", str(shown), *args])])
