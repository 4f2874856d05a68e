"""HTML building blocks of the report: escaping, tables, the page template (CSS and JS inline).

Every piece of text that comes from data (example texts, ids, source names, settings) goes
through `esc`; finished markup is wrapped in `Html`, so a helper can tell markup it may insert
as is from text it must escape. Nothing here reads files.
"""

from __future__ import annotations

import html
import json
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class Html(str):
    """Markup that is already safe to insert (built here from escaped parts)."""


def esc(value: Any) -> Html:
    """Text from data, escaped for element content and attribute values."""
    return Html(html.escape("" if value is None else str(value), quote=True))


def fmt(value: Any, digits: int = 4) -> str:
    """A number as people read it: ints as ints, floats to `digits` decimals (scientific when
    tiny or huge), NaN / None as '-', booleans as yes / no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{digits - 1}e}"
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return str(value)


def cell(value: Any) -> Html:
    """Markup as is, numbers formatted, anything else escaped."""
    if isinstance(value, Html):
        return value
    if _is_num(value):
        return Html(fmt(value))
    return esc(fmt(value) if isinstance(value, bool) or value is None else value)


def tag(name: str, content: Any = "", cls: str = "", **attrs: Any) -> Html:
    """`<name class=cls attrs>content</name>`; attribute values and non-Html content escaped."""
    parts = [name] + ([f'class="{esc(cls)}"'] if cls else [])
    for key, value in attrs.items():
        if value is None:
            continue
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{esc(value)}"')
    return Html(f"<{' '.join(parts)}>{cell(content)}</{name}>")


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(cell(p) for p in parts))


class Row(NamedTuple):
    """A table row with a CSS class (e.g. `pos` marks a labelled example)."""

    cells: Sequence[Any]
    cls: str = ""


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any] | Row], cls: str = "") -> Html:
    """A table; a column whose cells are all numbers (or '-') is right-aligned."""
    rows = [r if isinstance(r, Row) else Row(r) for r in rows]
    numeric = [bool(rows) and all(_is_num(r.cells[i]) or r.cells[i] in ("-", None) for r in rows if i < len(r.cells))
               and any(_is_num(r.cells[i]) for r in rows if i < len(r.cells)) for i in range(len(headers))]
    head = join(tag("th", h, cls="num" if numeric[i] else "") for i, h in enumerate(headers))
    body = [tag("tr", join(tag("td", v, cls="num" if i < len(numeric) and numeric[i] else "")
                           for i, v in enumerate(r.cells)), cls=r.cls) for r in rows]
    return tag("table", Html(f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"), cls=cls)


def _is_num(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def facts(pairs: Iterable[tuple[str, Any]]) -> Html:
    """A compact key: value list."""
    items = [tag("div", join([tag("dt", k), tag("dd", v)])) for k, v in pairs if v is not None]
    return tag("dl", join(items), cls="facts")


def details(summary: Any, content: Any, cls: str = "") -> Html:
    return tag("details", join([tag("summary", summary), content]), cls=cls)


def json_block(data: Any, summary: str = "settings (JSON)") -> Html:
    """Collapsible pretty JSON of a settings dict."""
    text = json.dumps(data, indent=1, ensure_ascii=False, default=str)
    return details(summary, tag("pre", text, cls="json"))


def clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def long_text(text: str, limit: int = 160) -> Html:
    """A one-line preview that opens to the full text (whitespace kept)."""
    text = str(text)
    if len(text) <= limit and "\n" not in text:
        return tag("span", text, cls="txt")
    return details(clip(text, limit), tag("div", text, cls="full"), cls="txt")


def note(text: Any) -> Html:
    return tag("p", text, cls="note")


CSS = """
:root{--fg:#1d2433;--muted:#5b6477;--line:#d8dde6;--bg:#f6f7f9;--acc:#ee7733;--blue:#4477aa}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#1d2433;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}header p{margin:0;color:#c9d0dc}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px;
 display:flex;flex-wrap:wrap;gap:6px 16px}
nav a{color:var(--blue);text-decoration:none;font-size:13px}nav a:hover{text-decoration:underline}
main{max-width:1200px;margin:0 auto;padding:16px 28px 60px}
section.report-section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 20px;margin:18px 0}
section.report-section>h2{margin:0 0 4px;font-size:19px}
.kind{display:inline-block;font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:#fff;
 background:var(--blue);border-radius:3px;padding:1px 6px;margin-right:6px;vertical-align:middle}
.sub{border-top:1px dashed var(--line);margin-top:14px;padding-top:6px}
h3{font-size:15px;margin:14px 0 6px}h4{font-size:13px;margin:10px 0 4px;color:var(--muted)}
.path{color:var(--muted);font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px;max-width:100%}
th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.pos td:first-child{box-shadow:inset 3px 0 0 var(--acc)}
dl.facts{display:flex;flex-wrap:wrap;gap:4px 18px;margin:6px 0 10px}
dl.facts div{display:flex;gap:6px}dt{color:var(--muted)}dd{margin:0;font-weight:500}
.plot{overflow-x:auto;margin:6px 0}.plot svg{max-width:100%;height:auto}
.id{white-space:nowrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.note{color:var(--muted);font-size:12.5px;margin:4px 0 8px}
.warn{color:#a33;font-size:12.5px}
details summary{cursor:pointer}details.txt summary{color:var(--fg)}
.full,.txt{white-space:pre-wrap;word-break:break-word}
pre.json{font-size:12px;background:var(--bg);padding:8px;max-height:320px;overflow:auto}
.ex{border:1px solid var(--line);border-radius:6px;padding:8px 10px;margin:8px 0}
.ex h4{margin:0 0 4px;color:var(--fg)}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-word;
 line-height:1.7}
.prompt{color:var(--muted)}
.snip{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word}
.hit{background:#ffd27a;border-radius:3px;padding:0 1px;font-weight:600}
.tok{border-radius:2px}
.tok.ri{background:#f4b6ae}.tok.kn{background:#b9d3f2}.tok.tr{background:#f7dc8f}
.tok.ri.kn{background:linear-gradient(#f4b6ae 50%,#b9d3f2 50%)}
.tok.ri.tr{background:linear-gradient(#f4b6ae 50%,#f7dc8f 50%)}
.tok.kn.tr{background:linear-gradient(#b9d3f2 50%,#f7dc8f 50%)}
.tok.ri.kn.tr{background:linear-gradient(#f4b6ae 33%,#b9d3f2 33% 66%,#f7dc8f 66%)}
.tok[data-why]::after{content:attr(data-why);font-size:9px;vertical-align:super;color:#6b3b2f;margin-left:1px}
body.plain .tok{background:none}body.plain .tok[data-why]::after{content:none}
.legend span{display:inline-block;padding:0 6px;margin-right:8px;border-radius:3px}
label.toggle{font-size:12.5px;color:var(--muted);user-select:none}
"""

# Kept minimal on purpose: hover texts are title attributes; this only wires the toggles.
JS = """
document.querySelectorAll('input[data-toggle]').forEach(function (box) {
  box.addEventListener('change', function () {
    document.body.classList.toggle(box.getAttribute('data-toggle'), !box.checked);
  });
});
"""


def page(title: str, subtitle: Html, nav: Sequence[tuple[str, str]], body: Html) -> str:
    """The whole self-contained document."""
    links = join(tag("a", label, href=f"#{anchor}") for anchor, label in nav)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
            f"<header><h1>{esc(title)}</h1><p>{subtitle}</p></header>"
            f"<nav>{links}</nav><main>{body}</main><script>{JS}</script></body></html>\n")
