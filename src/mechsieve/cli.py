"""`mechsieve` command line: a thin shell over the Python API.

Each command is a module in `mechsieve.commands` with NAME, HELP, `add_arguments(parser)` and
`run(args) -> int`; this file only finds them, parses, and turns known errors into one clear
line (exit 2) instead of a traceback.

Around a command it also sets up what the run leaves to read afterwards: the `mechsieve` loggers
at `--log-level` (info by default: the training loss lines), printed to stderr beside the
progress bars, and a `RunLog` that keeps what the command printed in its run folder's log.txt
(store/runlog.py). Both are undone when the command returns, so calling `main` twice in one
process (tests, notebooks) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

LOG_LEVELS = ("debug", "info", "warning", "error")


def _command_modules():
    import mechsieve.commands as package

    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"mechsieve.commands.{name}") for name in names]


class HelpFormatter(argparse.HelpFormatter):
    """Aliases share one metavar in --help (`--out, --output_dir OUT`), as Python 3.13's argparse
    prints them, instead of repeating it after each spelling."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from mechsieve import __version__

    parser = argparse.ArgumentParser(
        prog="mechsieve",
        description="Curate fine-tuning data by reading the model's own internals.")
    parser.add_argument("--version", action="version", version=f"mechsieve {__version__}")
    add_log_level(parser, "info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        module.add_arguments(p)
        # after the command as well as before it (and after `sae train`'s own subcommand);
        # SUPPRESS: not given there, the global one stands
        for q in [p, *(c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values())]:
            add_log_level(q, argparse.SUPPRESS)
        handlers[module.NAME] = module.run
    return parser, handlers


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", "--log_level", choices=LOG_LEVELS, default=default, type=str.lower,
                        help="level of mechsieve's log lines on stderr and in the run folder's log.txt: debug, "
                        "info (default: includes the training loss lines), warning, error")


class _ConsoleHandler(logging.Handler):
    """Log lines on the stderr of the moment (the RunLog's tee), above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{record.name}: {level}{record.getMessage()}"


@contextmanager
def console_logging(level: str) -> Iterator[None]:
    """The `mechsieve` loggers at `level`, printed by one handler; as they were on exit."""
    logger = logging.getLogger("mechsieve")
    handler = _ConsoleHandler()
    handler.setFormatter(_Formatter())
    before = logger.level
    logger.setLevel(level.upper())
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from mechsieve.commands._common import USER_ERRORS, ConfigPrinted
    from mechsieve.store.runlog import RunLog

    words = list(sys.argv[1:] if argv is None else argv)
    with RunLog("mechsieve " + " ".join(words)) as run, console_logging(args.log_level):
        try:
            return int(handlers[args.command](args) or 0)
        except ConfigPrinted:
            return 0
        except USER_ERRORS as err:
            print(f"mechsieve {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"mechsieve {args.command}: interrupted; finished chunks are kept and a rerun resumes",
                  file=sys.stderr)
            return 130
        except Exception:
            import traceback

            run.note(traceback.format_exc())  # Python prints it to the terminal after main returns
            raise


if __name__ == "__main__":
    raise SystemExit(main())
