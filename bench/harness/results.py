"""The JSON a benchmark writes: its figures under fixed keys, and beside each phase where it came from.

Layout of every file in bench/results/ (`Results` writes it):

    {"benchmark": "...", "model": "...",
     "provenance": {PHASE: [{"command", "commit", "dirty", "machine", "finished", "wall_s"}, ...]},
     PHASE: {...its figures...}, ..., "targets": {...}}

A phase is a fixed key (`select`, `train`, `sae`, ...), the same whichever way the script was
invoked. `Results.phase(name, merge=...)` returns that phase's dict (kept from the file when
merging, new otherwise); `Results.save()` writes the whole file atomically (the library's
`write_text`: a temporary file renamed onto it), so a run stopped mid-write never leaves a torn file. Provenance is a list per
phase: a merging run appends its entry, a replacing run starts the list anew. Absolute paths are
written relative to the repository (or as `~/...`, `<tmp>/...`), so a committed file names no
machine.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# MECHSIEVE_BENCH_RESULTS points a trial run elsewhere, so it leaves the committed figures alone.
RESULTS = Path(os.environ.get("MECHSIEVE_BENCH_RESULTS") or ROOT / "bench" / "results")
LOCK = "flock /tmp/mechsieve-bench.lock"
# Environment settings that change what a run reuses (the model and feature caches), so a rerun
# needs them to do the same work.
RECORDED_ENV = ("MECHSIEVE_CACHE",)
# Top-level folders of the repository: a path through one of them is shown from there on.
REPO_DIRS = ("bench", "runs", "src", "tests", "configs", "examples")


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


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine() -> dict[str, Any]:
    """What the figures ran on; `load_1min` says whether the cores were shared (2 cores here)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    device="cuda" if torch.cuda.is_available() else "cpu")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    return info


def portable(value: Any) -> Any:
    """`value` with absolute paths rewritten: the repository's relative to it, the home folder as
    `~`, temporary folders as `<tmp>`; anything else as it is. Walks dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    for base, shown in ((ROOT.parent / "shared", "../shared"), (ROOT, ""),
                        (Path(tempfile.gettempdir()), "<tmp>"), (Path.home(), "~")):
        if value == str(base) or value.startswith(str(base) + "/"):
            rest = value[len(str(base)):].lstrip("/")
            return "/".join(p for p in (shown, rest) if p) or "."
    parts = Path(value).parts  # another checkout of this repository: from its top-level folder on
    for i, part in enumerate(parts[1:], start=1):
        if part in REPO_DIRS and i > 1:
            return "/".join(parts[i:])
    return value


class Results:
    """One benchmark's JSON file: read once, phases set under fixed keys, saved atomically."""

    def __init__(self, name: str, benchmark: str, model: str | None = None, path: Path | None = None,
                 script: str | None = None, argv: list[str] | None = None, runner: str = LOCK):
        self.path = path or RESULTS / f"{name}.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data["benchmark"] = benchmark
        if model is not None:
            self.data["model"] = model
        self.data.setdefault("provenance", {})
        self.command = command_line(script or sys.argv[0], argv, runner=runner)
        self._started: dict[str, float] = {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def phase(self, name: str, merge: bool = False) -> dict[str, Any]:
        """The dict of phase `name`, to fill in: the saved one when merging, else a new one.
        Starts the phase's clock; `save()` stamps its provenance."""
        if not merge or not isinstance(self.data.get(name), dict):
            self.data[name] = {}
            self.data["provenance"][name] = []
        self._started[name] = time.perf_counter()
        entry = {"command": self.command, **git_commit(), "finished": False,
                 "load_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
        self.data["provenance"].setdefault(name, []).append(entry)
        return self.data[name]

    def set(self, key: str, value: Any) -> None:
        """A top-level entry that is not a phase (pool description, settings)."""
        self.data[key] = value

    def drop(self, name: str) -> None:
        """Forget phase `name` (figures and provenance): what it measured no longer holds."""
        self.data.pop(name, None)
        self.data["provenance"].pop(name, None)
        self._started.pop(name, None)

    def targets(self) -> dict[str, Any]:
        return self.data.setdefault("targets", {})

    def save(self, finished: str | None = None) -> Path:
        """Write the file atomically. With `finished`, that phase's run is marked done with its
        wall time and the machine (a phase saved mid-run reads `finished: false`)."""
        for name, t0 in self._started.items():
            entry = self.data["provenance"][name][-1]
            if entry.get("finished"):  # its clock stopped when it finished, not at a later phase's save
                continue
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            if name == finished:
                entry.update(finished=True, machine=machine())
        from mechsieve.store.atomic import write_text  # temporary file renamed onto it; umask modes

        return write_text(self.path, json.dumps(portable(self.data), indent=1, default=str) + "\n")
