"""The HTML report: run folders of select / attribute / mask-tokens / experiment -> one page.

- runs.py      recognise and read run folders (the only file reads), example texts, tokenizers
- sections.py  one HTML section per run (selection + IGDS / NAIT, token masks, attribution, experiment)
- plots.py     matplotlib (Agg) figures as inline SVG
- html.py      escaping, tables, the page template with its CSS and the little JS
- build.py     `build_report(run_dirs, out)`: assemble and write atomically
"""

from mechsieve.report.build import build_report
from mechsieve.report.runs import ReportError, detect_kind, load_run

__all__ = ["ReportError", "build_report", "detect_kind", "load_run"]
