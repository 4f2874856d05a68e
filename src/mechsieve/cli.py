"""`mechsieve` command line: a thin shell over the Python API.

Each command is a module in `mechsieve.commands` with NAME, HELP, `add_arguments(parser)` and
`run(args) -> int`; this file only finds them, parses, and turns known errors into one clear
line (exit 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        module.add_arguments(p)
        handlers[module.NAME] = module.run
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from mechsieve.commands._common import USER_ERRORS, ConfigPrinted

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


if __name__ == "__main__":
    raise SystemExit(main())
