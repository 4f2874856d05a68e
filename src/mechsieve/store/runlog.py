"""What a command printed, kept beside its outputs as FOLDER/log.txt.

The CLI runs each command inside a `RunLog`: `sys.stdout` and `sys.stderr` are wrapped by tees
that pass every write through unchanged and collect whole lines. When the command claims its
output folder (`OutputFolder.claim`, just before its first write), the lines so far go to
FOLDER/log.txt under a header naming the command line, and later lines follow as they come
(flushed line by line, so a killed run keeps what it printed). On exit the streams are put back.

Progress bars are kept as their last state: a bar redraws its line after a carriage return, so
of a line only the last non-blank part after a `\\r` is kept, and terminal escape sequences are
dropped; a bar drawn a thousand times leaves one line. A rerun that continues a folder (resume,
reuse) appends under a new header; a fresh run or `--overwrite` starts the file anew. A log.txt
that the folder held before and mechsieve did not write is left alone (no log is kept then); the
one it writes is listed in the folder's marker like its other files.

Nothing happens on import; outside a RunLog (the Python API) `attach` writes nothing.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

LOG_FILE = "log.txt"
MAX_BUFFERED = 100_000
"""Lines kept in memory until the command names its folder (older ones are dropped past this)."""
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ACTIVE: list[RunLog] = []


def visible_line(raw: str) -> str:
    """The text a terminal would show of `raw` (one line, no newline): the last non-blank part
    after a carriage return, without escape sequences or trailing blanks."""
    parts = [p.rstrip() for p in _ESCAPE.sub("", raw).split("\r")]
    shown = [p for p in parts if p.strip()]
    return shown[-1] if shown else ""


def _compact(partial: str) -> str:
    """An unfinished line cut to what can still be shown: from its last non-blank `\\r` part on
    (a bar redrawn for hours must not grow the buffer)."""
    if "\r" not in partial:
        return partial
    starts = [0] + [m.end() for m in re.finditer("\r", partial)]
    for start in reversed(starts):
        end = partial.find("\r", start)
        if partial[start: end if end >= 0 else None].strip():
            return partial[start:]
    return partial[starts[-1]:]


class _Tee:
    """A text stream that writes through to `stream` and hands the text to `sink` by name."""

    def __init__(self, stream: IO[str], sink: RunLog, name: str) -> None:
        self._stream = stream
        self._sink = sink
        self._name = name

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._sink.feed(self._name, text)
        return n

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer ...
        return getattr(self._stream, name)


class RunLog:
    """Tee the process's stdout and stderr for one command (see the module docstring)."""

    def __init__(self, header: str) -> None:
        self.header = header
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self._buffer: list[str] = []
        self._partial = {"stdout": "", "stderr": ""}
        self._lock = threading.RLock()
        self._streams: tuple[Any, Any] | None = None
        self._closed = False

    def __enter__(self) -> RunLog:
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self, "stdout")  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self, "stderr")  # type: ignore[assignment]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._streams is not None
        out, err = self._streams
        if isinstance(sys.stdout, _Tee) and sys.stdout._sink is self:
            sys.stdout = out
        if isinstance(sys.stderr, _Tee) and sys.stderr._sink is self:
            sys.stderr = err
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        with self._lock:
            for name in self._partial:
                if visible_line(self._partial[name]):
                    self._line(visible_line(self._partial[name]))
                self._partial[name] = ""
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def feed(self, name: str, text: str) -> None:
        """Text written to stream `name`: its finished lines are logged, the rest kept."""
        with self._lock:
            if self._closed:
                return
            *lines, rest = (self._partial[name] + text).split("\n")
            for raw in lines:
                self._line(visible_line(raw))
            self._partial[name] = _compact(rest)

    def note(self, text: str) -> None:
        """Lines for the log only (e.g. the traceback of a crash, which Python prints itself later)."""
        with self._lock:
            if not self._closed:
                for line in text.rstrip("\n").split("\n"):
                    self._line(line.rstrip())

    def _line(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._buffer.append(line)
            if len(self._buffer) > MAX_BUFFERED:
                del self._buffer[: len(self._buffer) - MAX_BUFFERED]

    def attach(self, folder: str | Path, append: bool) -> Path | None:
        """Keep the log in `folder` from now on (the first folder claimed wins); returns the file."""
        with self._lock:
            if self._file is not None or self._closed:
                return None
            self.path = Path(folder) / LOG_FILE
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._file.write(f"# {self.header}  ({stamp})\n")
            for line in self._buffer:
                self._file.write(line + "\n")
            self._buffer = []
            self._file.flush()
            return self.path


def waiting() -> bool:
    """Whether a command runs under the CLI's RunLog whose folder is not known yet."""
    return bool(_ACTIVE) and _ACTIVE[-1].path is None and not _ACTIVE[-1]._closed


def attach(folder: str | Path, append: bool = False) -> Path | None:
    """Start FOLDER/log.txt for the command running under the CLI's RunLog (nothing outside one,
    or once it has its folder)."""
    return _ACTIVE[-1].attach(folder, append) if waiting() else None


def current_log() -> Path | None:
    """The log.txt of the command now running, once its folder is claimed."""
    return _ACTIVE[-1].path if _ACTIVE else None
