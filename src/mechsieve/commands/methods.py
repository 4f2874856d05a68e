"""`mechsieve methods`: the registered scoring methods, one line each; `methods NAME`: its settings.

The settings are read off the method's config dataclass (`Scorer.config_cls`): each field's type
as annotated, its default and its docstring, nested sections with dotted keys as `--set` takes
them.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

NAME = "methods"
HELP = "list the registered scoring methods, or show one method's settings (types, defaults, docs)"
WIDTH = 100
"""Characters of one listing line; a longer summary is shortened."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="NAME", help="a method to show the settings of, e.g. nait")


def summary(cls: type) -> str:
    """The first paragraph of the class docstring, on one line."""
    import inspect

    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def run(args: argparse.Namespace) -> int:
    from mechsieve.commands._common import method_class
    from mechsieve.scorers.registry import available, get_scorer_class

    if args.name is None:
        names = available()
        width = max(len(n) for n in names)
        for name in names:
            line = textwrap.shorten(summary(get_scorer_class(name)), WIDTH - width - 4, placeholder=" ...")
            print(f"  {name.ljust(width)}  {line}")
        print("settings of one: mechsieve methods NAME")
        return 0
    show(args.name, method_class(args.name, key=None))
    return 0


def show(name: str, cls: type) -> None:
    from mechsieve.config import describe_settings

    print(f"{name}: {summary(cls)}")
    needs = [what for what, flag in (("the model (--model)", cls.needs_model),
                                     ("a target pool (--target)", cls.needs_target)) if flag]
    print(f"reads {' and '.join(needs) if needs else 'only the pool'}; selects the {cls.default_order} "
          f"scores first; {'shards' if cls.shardable else 'does not shard'} on --engine ray")
    settings = describe_settings(cls.config_cls)
    if not settings:
        print("settings: none")
        return
    print(f"settings (select: --set scorer.KEY=VALUE; experiment: method_settings.{name}.KEY):")
    for s in settings:
        if s.section:
            head = f"  {s.key}: {s.type} (section)"
        elif s.default is dataclasses.MISSING:
            head = f"  {s.key}: {s.type} (required)"
        else:
            head = f"  {s.key}: {s.type} = {s.default!r}"
        print(head)
        if s.doc:
            print(textwrap.indent(textwrap.fill(" ".join(s.doc.split()), WIDTH - 6), " " * 6))
