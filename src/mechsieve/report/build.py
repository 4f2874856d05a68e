"""`build_report`: run folders in, one self-contained HTML page out (written atomically).

Every folder is read and checked before anything is written, so a wrong folder leaves no page
behind; sections follow the order of the folders given, after an overview.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechsieve.report.html import Html, join, note, page, table, tag
from mechsieve.report.runs import (
    AttributionRun,
    ExperimentRun,
    Run,
    SelectionRun,
    TokenMaskRun,
    find_texts,
    find_tokenizer,
    load_run,
)
from mechsieve.report.sections import (
    Section,
    attribution_section,
    compare_selections,
    experiment_section,
    heading,
    masks_section,
    selection_section,
)

COMMAND = {"selection": "select", "attribution": "attribute", "masks": "mask-tokens", "experiment": "experiment"}


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, pools: Sequence[Any] | None = None,
                 tokenizer: Any = None, examples: int = 5, title: str = "mechsieve report") -> Path:
    """Write the report of `run_dirs` to `out` and return its path.

    pools: data.records.Pool objects holding the examples' texts (default: re-read the pool each
    run recorded); tokenizer: decodes mask-tokens datasets (default: the run's recorded model,
    when it is on this machine); examples: how many top / bottom examples a selection shows.
    Raises report.runs.ReportError for a folder that is not a mechsieve run folder.
    """
    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    sections = [_section(run, f"run-{i}", pools, tokenizer, examples) for i, run in enumerate(runs, start=1)]
    overview = overview_section(runs, sections)
    nav = [(overview.anchor, overview.title)]
    for s in sections:
        nav.append((s.anchor, s.title))
        nav.extend(s.subs)
    from mechsieve import __version__

    subtitle = Html(f"{len(runs)} run folder{'s' if len(runs) != 1 else ''} · written by mechsieve {__version__}")
    text = page(title, subtitle, nav, join([overview.render(), *(s.render() for s in sections)]))
    from mechsieve.store.atomic import write_text

    return write_text(out, text)


def _section(run: Run, anchor: str, pools: Sequence[Any] | None, tokenizer: Any, examples: int) -> Section:
    if isinstance(run, SelectionRun):
        pool = run.summary.get("pool") or {}
        texts = find_texts(run.ids, pool.get("path"), str(pool.get("format", "auto")), pool.get("fingerprint"),
                           list(pools) if pools else None)
        return selection_section(run, texts, anchor, examples)
    if isinstance(run, AttributionRun):
        texts = find_texts([r["id"] for r in run.rows], run.summary.get("pool"), pools=list(pools) if pools else None)
        return attribution_section(run, texts, anchor, max(examples, 20))
    if isinstance(run, TokenMaskRun):
        why = ""
        if tokenizer is None:
            tokenizer, why = find_tokenizer((run.summary.get("settings") or {}).get("model"))
        return masks_section(run, tokenizer, why, anchor)
    assert isinstance(run, ExperimentRun)
    primary, columns, lower = experiment_columns(run.results)
    return experiment_section(run, primary, columns, lower, anchor)


def experiment_columns(results: dict[str, Any]) -> tuple[list[str], list[str], set[str]]:
    """(primary metric columns, all metric columns, metrics where lower is better) of results.json."""
    from mechsieve.evaluate.tasks import LOWER_IS_BETTER
    from mechsieve.experiment.report import is_primary, metric_columns

    columns = metric_columns(results["rows"])
    try:
        from mechsieve.config import from_dict
        from mechsieve.experiment import ExperimentConfig

        cfg = from_dict(ExperimentConfig, results.get("config") or {})
        primary = [c for c in columns if is_primary(c, cfg)]
    except (ValueError, TypeError, KeyError):  # settings of another version: plot every metric
        primary = []
    return primary, columns, set(LOWER_IS_BETTER)


def overview_section(runs: Sequence[Run], sections: Sequence[Section]) -> Section:
    rows = []
    for i, (run, sec) in enumerate(zip(runs, sections), start=1):
        rows.append([i, tag("a", sec.title, href=f"#{sec.anchor}"), COMMAND[run.kind], _brief(run),
                     tag("span", str(run.path), cls="path")])
    parts = [heading("overview", "runs in this report", ""), table(["#", "section", "command", "what", "folder"], rows)]
    selections = [r for r in runs if isinstance(r, SelectionRun)]
    if len(selections) > 1:
        parts.append(tag("h3", "Selections side by side: selected / in pool, per source"))
        parts.append(compare_selections(selections))
    parts.append(note("Hover highlighted tokens and table cells for details; plots are inline SVG, so the page "
                      "works offline and prints as it shows."))
    return Section("overview", "overview", "overview", join(parts))


def _brief(run: Run) -> str:
    if isinstance(run, SelectionRun):
        return f"{run.method}: {int(run.selected.sum())} of {len(run.ids)} selected"
    if isinstance(run, AttributionRun):
        auc = (run.summary.get("metrics") or {}).get("auc_pr")
        return f"{run.summary.get('method', '?')}: {len(run.rows)} ranked" + (f", AUC-PR {auc:.3f}" if auc else "")
    if isinstance(run, TokenMaskRun):
        share = (run.summary.get("masked_share") or {}).get("union", 0.0)
        return f"{100 * float(share):.1f}% of {run.summary.get('eligible_tokens', '?')} response tokens masked"
    methods = list(run.results["summary"])
    return f"{len(methods)} methods ({', '.join(methods)}), {len(run.results['rows'])} runs"
