"""The output-folder guard: a command writes only into a folder that is new, empty or its own.

Every command that writes a folder keeps a marker in it, `.mechsieve.json`: the command's name,
the entries (files and folders directly under the folder) it wrote, and whether the run finished.
Before it reads any data, a command checks its folder (`OutputFolder(...)`):

- missing or empty: used;
- no marker but other entries: refused, naming a few of them (mechsieve never deletes or
  replaces what it did not write);
- another command's marker: refused;
- this command's marker of an interrupted run: used, so the command resumes what it can;
- this command's marker of a finished run: used by commands that resume or reuse their own
  output (capture, sae train, experiment, demo), else refused unless `--overwrite`.

Just before its first write the command calls `claim(entries)`, which writes the marker (and,
under the CLI, starts log.txt: store/runlog.py); at the end `finish()` records what it wrote. Files beside the marked entries (a user's notes) are never
touched: `--overwrite` lets the run write over the marked entries, and nothing is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mechsieve.config import ConfigError
from mechsieve.store.atomic import write_json

MARKER = ".mechsieve.json"


class OutputFolderError(ConfigError):
    """An output folder that holds files this command did not write (or finished output that
    `--overwrite` was not given for)."""


def _entries(folder: Path) -> set[str]:
    # a marker's temporary file, left by a kill during its write, is ours and not a user's file
    return {p.name for p in folder.iterdir() if not (p.name.startswith(MARKER + ".") or p.name == MARKER)}


def _shown(folder: Path, names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    shown = [f"{n}/" if (folder / n).is_dir() else n for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of `folder`, or None when it has none."""
    path = Path(folder) / MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OutputFolderError(f"{path}: not a readable mechsieve marker ({err}); if the folder holds mechsieve "
                                "output, delete the marker and pick a new folder for the next run") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
        raise OutputFolderError(f"{path}: not a mechsieve marker (no command name in it); pick another folder")
    return marker


class OutputFolder:
    """The output folder of one command run; see the module docstring.

    `resumes`: the command resumes or reuses its own finished output (so a rerun needs no
    `--overwrite`). `flag`: how the user names the folder, for messages."""

    def __init__(self, path: str | Path, command: str, *, overwrite: bool = False, resumes: bool = False,
                 flag: str = "--out") -> None:
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.previous: dict[str, Any] | None = None
        self._foreign: set[str] = set()
        where = f"{flag} {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(f"{where} is a file, not a folder; pick an empty or new folder")
        if not self.path.exists():
            return
        marker = read_marker(self.path)
        others = _entries(self.path)
        if marker is None:
            if others:
                raise OutputFolderError(
                    f"{where}: the folder is not empty ({_shown(self.path, others)}) and holds no earlier "
                    f"output of mechsieve {command}; pick an empty or new folder (mechsieve never deletes or "
                    "replaces files it did not write)")
            return
        if marker["command"] != command:
            raise OutputFolderError(
                f"{where} holds the output of `mechsieve {marker['command']}`, not of `mechsieve {command}`; "
                "pick an empty or new folder")
        if marker.get("complete") and not (resumes or overwrite):
            raise OutputFolderError(
                f"{where} already holds the output of an earlier `mechsieve {command}` run; pass --overwrite to "
                f"replace its files (those listed in {MARKER}; other files there are kept), or pick an empty "
                "or new folder")
        self.previous = marker

    @property
    def previous_files(self) -> set[str]:
        return set(self.previous.get("files", [])) if self.previous else set()

    def claim(self, entries: Iterable[str] = ()) -> Path:
        """Create the folder and mark it as this command's (run under way) before the first write.
        `entries`: the files and folders directly under it that the run may write."""
        self.path.mkdir(parents=True, exist_ok=True)
        entries = set(entries)
        self._foreign = _entries(self.path) - self.previous_files
        clash = entries & self._foreign
        if clash:
            raise OutputFolderError(
                f"{self.path} holds {_shown(self.path, clash)}, which this command writes but its earlier run "
                "did not; move it away or pick an empty or new folder")
        from mechsieve.store import runlog

        # under the CLI, what the command prints goes to log.txt here from now on (a rerun that
        # continues the folder appends to it; a user's own log.txt is left alone)
        keep_log = runlog.waiting() and runlog.LOG_FILE not in self._foreign
        self._write(sorted(self.previous_files | entries | ({runlog.LOG_FILE} if keep_log else set())),
                    complete=False)
        if keep_log:
            runlog.attach(self.path, append=self.previous is not None and not self.overwrite)
        return self.path

    def finish(self) -> None:
        """Record the run as finished: the marker lists every entry but those that were there,
        not this command's, when the folder was claimed."""
        self._write(sorted(_entries(self.path) - self._foreign), complete=True)

    def _write(self, files: list[str], complete: bool) -> None:
        from mechsieve import __version__

        write_json(self.path / MARKER, {"command": self.command, "complete": complete, "files": files,
                                        "mechsieve": __version__})
