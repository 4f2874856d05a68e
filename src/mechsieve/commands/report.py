"""`mechsieve report`: run folders of select / attribute / mask-tokens / experiment -> one HTML page."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "write one self-contained HTML page (plots, features, token masks, curves) from run folders"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="folders written by mechsieve select, attribute, mask-tokens or experiment")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--pool", "--data", action="append", default=[], metavar="FILE",
                   help="data file with the examples' texts, when the pool a run recorded has moved (repeatable)")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="model folder or alias whose tokenizer shows mask-tokens runs token by token "
                        "(default: the model the run recorded, when it is on this machine)")
    p.add_argument("--examples", type=int, default=5, help="top and bottom examples shown per selection (default 5)")
    p.add_argument("--title", default="mechsieve report", help="page title")


def run(args: argparse.Namespace) -> int:
    import sys

    from mechsieve.commands._common import print_outputs
    from mechsieve.report import ReportError, build_report

    pools = None
    if args.pool:
        from mechsieve.data.readers import read_pool

        pools = [read_pool(path) for path in args.pool]
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        from mechsieve.models.loading import ModelConfig, resolve_model_path

        folder, _ = resolve_model_path(ModelConfig(name=args.tokenizer))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        path = build_report(args.run_dirs, args.out, pools=pools, tokenizer=tokenizer, examples=args.examples,
                            title=args.title)
    except ReportError as err:
        print(f"mechsieve report: error: {err}", file=sys.stderr)
        return 2
    print(f"report of {len(args.run_dirs)} run folder(s), open it in a browser (works offline):")
    print_outputs({"report": path})
    return 0
