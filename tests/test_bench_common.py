"""The command line each benchmark records beside its figures (bench/_common.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_common", BENCH / "_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_command_line_is_relative_to_the_repo_root(monkeypatch):
    monkeypatch.delenv("MECHSIEVE_CACHE", raising=False)
    monkeypatch.setattr(sys, "argv", ["/anywhere/targeted_selection.py", "--methods", "less"])
    assert common.command_line(str(BENCH / "targeted_selection.py")) == \
        "python bench/targeted_selection.py --methods less"
    assert common.command_line(str(BENCH / "token_noise.py"), ["--phase", "train"]) == \
        "python bench/token_noise.py --phase train"
    assert common.command_line(str(BENCH / "token_noise.py"), []) == "python bench/token_noise.py"


def test_command_line_names_the_cache_folder_before_the_runner(monkeypatch):
    monkeypatch.setenv("MECHSIEVE_CACHE", "/tmp/fresh cache")
    got = common.command_line(str(BENCH / "train_smoke.py"), ["--steps", "20", "--note", "a b"], runner="flock /tmp/l")
    assert got == "MECHSIEVE_CACHE='/tmp/fresh cache' flock /tmp/l python bench/train_smoke.py --steps 20 --note 'a b'"
