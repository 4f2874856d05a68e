"""One HTML section per run folder (selection with its IGDS / NAIT explanations, token masks,
attribution, experiment), built from the typed runs of `report.runs`. No file I/O here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechsieve.report import plots
from mechsieve.report.html import (
    Html,
    Row,
    details,
    esc,
    facts,
    fmt,
    join,
    json_block,
    long_text,
    note,
    table,
    tag,
)
from mechsieve.report.runs import AttributionRun, ExperimentRun, SelectionRun, Texts, TokenMaskRun

ATTR_NAMES = {"ri": "RI: little attention received (reasoning importance)",
              "kn": "KN: already known to the model (knowledge novelty)",
              "tr": "TR: far from the task's words (task relevance)",
              "el": "EL: the in-domain reference finds it no likelier than the base (excess loss)"}
LETTERS = {"ri": "R", "kn": "K", "tr": "T", "el": "E"}
BITS = {"ri": 1, "kn": 2, "tr": 4, "el": 8}


@dataclass
class Section:
    """A top-level part of the page; `subs` are (anchor, title) of its sub-sections for the nav."""

    anchor: str
    title: str
    kind: str
    body: Html
    subs: list[tuple[str, str]] = field(default_factory=list)

    def render(self) -> Html:
        return Html(f'<section class="report-section" id="{esc(self.anchor)}" data-kind="{esc(self.kind)}">'
                    f"{self.body}</section>")


def heading(kind: str, title: str, path: Any) -> Html:
    return join([tag("h2", join([tag("span", kind, cls="kind"), esc(title)])), tag("div", str(path), cls="path")])


def sub(anchor: str, kind: str, title: str, body: Any) -> Html:
    return Html(f'<div class="sub" id="{esc(anchor)}" data-kind="{esc(kind)}">{tag("h3", title)}{body}</div>')


def prompt_text(ex: Any) -> str:
    """The prompt of an Example as one string (roles named when there are several turns)."""
    if len(ex.prompt) == 1:
        return ex.prompt[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in ex.prompt)


def texts_note(texts: Texts) -> Html:
    if not texts.note:
        return Html("")
    return tag("p", texts.note, cls="warn" if texts.warning else "note")


# --- selection ------------------------------------------------------------------------------------

def selection_section(run: SelectionRun, texts: Texts, anchor: str, n_examples: int = 5) -> Section:
    s = run.summary
    settings = s.get("settings", {})
    pool = s.get("pool", {})
    chosen = s.get("selected", {})
    target = s.get("target") or {}
    timings = s.get("timings", {})
    model = s.get("model") or {}
    parts = [heading("select", f"selection: {run.method}", run.path), facts([
        ("method", run.method), ("budget", f"{settings.get('budget')} ({settings.get('budget_kind', '?')})"),
        ("order", settings.get("order")), ("seed", settings.get("seed")),
        ("selected", f"{int(run.selected.sum())} of {len(run.ids)}"),
        ("target", f"{target.get('examples')} examples" if target else None),
        ("model", model.get("name") or model.get("path") or model.get("id") if model else None),
        ("scoring time", f"{fmt(timings.get('score_total'))} s" if "score_total" in timings else None)])]
    parts.append(tag("h3", "Score distribution per source"))
    parts.append(note("Orange: selected; grey: not selected. Bins are shared across sources."))
    parts.append(plots.score_histograms(run.scores, run.sources, run.selected))
    parts.append(tag("h3", "Counts per source"))
    by_source = pool.get("by_source") or {}
    picked = chosen.get("by_source") or {}
    n_sel = max(int(run.selected.sum()), 1)
    names = list(dict.fromkeys([*by_source, *run.sources]))
    counts = {name: (int(by_source.get(name, run.sources.count(name))), int(picked.get(name, 0))) for name in names}
    parts.append(table(["source", "in pool", "selected", "share of the selection", "share of the source"],
                       [[name, p, c, f"{100 * c / n_sel:.1f}%", f"{100 * c / max(p, 1):.1f}%"]
                        for name, (p, c) in counts.items()]))
    order = np.argsort(run.ranks, kind="stable")
    parts.append(texts_note(texts))
    parts.append(tag("h3", f"Highest-ranked examples (selected first; order: {settings.get('order', '?')})"))
    parts.append(example_table(run, order[:n_examples], texts))
    parts.append(tag("h3", "Lowest-ranked examples"))
    parts.append(example_table(run, order[::-1][:n_examples][::-1], texts))
    subs = []
    ex = s.get("explanations") or {}
    if run.method == "igds" and ex.get("features") is not None:
        subs.append((f"{anchor}-igds", "IGDS task features"))
        parts.append(sub(subs[-1][0], "igds", "IGDS: task features", igds_body(ex)))
    if ex.get("layers") is not None and (ex.get("layer_terms") or ex.get("explained_variance")):
        subs.append((f"{anchor}-nait", "NAIT layers"))
        parts.append(sub(subs[-1][0], "nait", "NAIT: per-layer contribution to the score", nait_body(ex)))
    parts.append(details("timings (s)", table(["phase", "seconds"], [[k, v] for k, v in timings.items()])))
    parts.append(json_block({"settings": settings, "pool": pool, "target": target or None, "model": model or None}))
    return Section(anchor, f"select: {run.method} ({run.path.name})", "selection", join(parts), subs)


def example_table(run: SelectionRun, rows: Sequence[int], texts: Texts) -> Html:
    out = []
    for i in rows:
        ex = texts.by_id.get(run.ids[i])
        out.append(Row([int(run.ranks[i]), tag("span", run.ids[i], cls="id"), run.sources[i], float(run.scores[i]),
                        "yes" if run.selected[i] else "no",
                        long_text(prompt_text(ex)) if ex is not None else "-",
                        long_text(ex.response) if ex is not None else "-"], "pos" if run.selected[i] else ""))
    return table(["rank", "id", "source", "score", "selected", "prompt", "response"], out)


def compare_selections(runs: Sequence[SelectionRun]) -> Html:
    """Selected examples per source, one column per selection run (same pool or not)."""
    names = list(dict.fromkeys(s for run in runs for s in run.sources))
    header = ["source", *[f"{run.method} ({run.path.name})" for run in runs]]
    rows = []
    for name in names:
        cells: list[Any] = [name]
        for run in runs:
            mine = np.asarray(run.sources, dtype=object) == name
            cells.append(f"{int(run.selected[mine].sum())} / {int(mine.sum())}" if mine.any() else "-")
        rows.append(cells)
    return table(header, rows)


# --- IGDS -----------------------------------------------------------------------------------------

SNIPPET = re.compile(r"^(.*)\[\[(.*?)\]\](.*)$", re.DOTALL)


def snippet(text: str, act: float, example_id: str, feature: int) -> Html:
    """A top-activating snippet with its activating token highlighted (scorers/igds_steer.py
    `snippet_text` marks that token as [[token]])."""
    m = SNIPPET.match(text)
    if not m:
        return tag("div", text, cls="snip")
    left, hit, right = m.groups()
    title = f"latent {feature}: activation {fmt(act)} on this token (example {example_id})"
    return tag("div", join(["…", left, tag("span", hit, cls="hit", title=title), right, "  ",
                            tag("span", f"[{example_id}, act {fmt(act)}]", cls="note")]), cls="snip")


def igds_body(ex: dict[str, Any]) -> Html:
    sae = ex.get("sae") or {}
    training = ex.get("sae_training") or {}
    kept = ex.get("kept") or []
    parts = [facts([
        ("SAE", f"{sae.get('d_sae', '?')} latents over d={sae.get('d_in', '?')} "
                f"({sae.get('activation', '?')}{', k ' + str(sae['k']) if sae.get('k') else ''})"),
        ("layer", ex.get("layer")), ("position", ex.get("position")), ("dev metric", ex.get("metric")),
        ("recalled", len(ex.get("candidates") or [])), ("kept", len(kept)),
        ("base dev metric", ex.get("base_dev_metric")),
        ("SAE held-out FVU", training.get("heldout_fvu")),
        ("ablations", ", ".join(f"{k}={v}" for k, v in (ex.get("ablations") or {}).items()) or None)])]
    if ex.get("fallback"):
        parts.append(tag("p", "No candidate latent improved the dev metric; the best one was kept (fallback).",
                         cls="warn"))
    parts.append(note("Recall frequency: share of target prompts on which the latent fires; steering Δ: "
                      "improvement of the dev metric when the latent is scaled by α. Snippets: the pool examples "
                      "where the latent is strongest, the activating token highlighted (hover for its activation)."))
    features = ex.get("features") or []
    contrast = any("contrast_freq" in row for row in features)
    template = any("template_share" in row for row in features)  # share of top activations on template tokens
    rows = []
    for row in features:
        snips = [snippet(str(sn.get("text", "")), float(sn.get("act", 0.0)), str(sn.get("id", "")),
                         int(row.get("feature", -1))) for sn in row.get("snippets") or []]
        rows.append([int(row.get("feature", -1)), row.get("freq"), row.get("mean_act"),
                     *([row.get("contrast_freq", "-")] if contrast else []),
                     *([row.get("template_share", "-")] if template else []), row.get("delta", "-"),
                     row.get("best_alpha", "-"), join(snips) if snips else "(no pool example activates it)"])
    parts.append(table(["latent", "recall frequency", "mean activation", *(["contrast frequency"] if contrast else []),
                        *(["template share"] if template else []), "steering Δ", "α", "top-activating pool snippets"],
                       rows, cls="features"))
    return join(parts)


# --- NAIT -----------------------------------------------------------------------------------------

def nait_body(ex: dict[str, Any]) -> Html:
    layers = list(ex.get("layers") or [])
    terms = ex.get("layer_terms") or {}
    explained = ex.get("explained_variance") or {}
    parts = [facts([("capabilities", ", ".join(map(str, ex.get("capabilities") or [])) or None),
                    ("layers", len(layers)), ("directions", ex.get("directions"))])]
    if terms:
        parts.append(note("The score sums one term per layer (the example's activation drift projected on the "
                          "target direction). Bars: each layer's mean term over the pool and over the 10% of the "
                          "pool with the highest scores, i.e. which layers make examples rank high."))
    else:
        parts.append(note("This run does not record per-layer terms (a run made before they were saved); "
                          "only the explained variance of each layer's direction is shown."))
    parts.append(plots.layer_terms(layers, terms, explained))
    for name in dict.fromkeys([*terms, *explained]):
        t = terms.get(name, {})
        top = np.asarray(t.get("top_decile_mean", [np.nan] * len(layers)), dtype=np.float64)
        total = np.abs(top).sum()
        rows = [[layer, _at(t.get("pool_mean"), k), _at(t.get("top_decile_mean"), k),
                 f"{100 * abs(top[k]) / total:.1f}%" if total > 0 and np.isfinite(top[k]) else "-",
                 _at(explained.get(name), k)] for k, layer in enumerate(layers)]
        parts.append(details(f"layers of capability {name}",
                             table(["layer", "pool mean term", "top-10% mean term", "share of |top-10% score|",
                                    "explained variance"], rows)))
    return join(parts)


def _at(values: Sequence[float] | None, k: int) -> Any:
    return values[k] if values is not None and k < len(values) else "-"


# --- token masks (XTF) ----------------------------------------------------------------------------

def masks_section(run: TokenMaskRun, tokenizer: Any, why_no_tokens: str, anchor: str) -> Section:
    s = run.summary
    shares = s.get("masked_share") or {}
    masked = s.get("masked_tokens") or {}
    attrs = [a for a in ("ri", "kn", "tr", "el") if a in shares]
    parts = [heading("mask-tokens", "token masks (XTF)" if attrs != ["el"] else "token masks (excess loss)",
                     run.path), facts([
        ("examples", s.get("examples")), ("response tokens", s.get("eligible_tokens")),
        ("masked", f"{masked.get('union', '?')} ({100 * float(shares.get('union', 0)):.1f}%)"),
        *[(a.upper(), f"{masked.get(a, '?')} ({100 * float(shares.get(a, 0)):.1f}%)") for a in attrs],
        ("flagged by all", s.get("all_attributes")), ("render", s.get("render")),
        ("time", f"{s['seconds']} s" if "seconds" in s else None)])]
    parts.append(tag("h3", "Masked share per attribute"))
    if shares:
        parts.append(plots.mask_shares({**{a: shares[a] for a in attrs}, "union": shares.get("union", 0.0)}))
    overlaps = s.get("overlaps") or {}
    if overlaps:
        parts.append(tag("h3", "Overlaps between attributes"))
        parts.append(table(["attributes", "tokens flagged by both", "Jaccard"],
                           [[pair.upper().replace("&", " & "), v.get("tokens"), v.get("jaccard")]
                            for pair, v in overlaps.items()]))
    legend = join([tag("span", f"{LETTERS[a]} = {ATTR_NAMES[a]}", cls=f"tok {a}") for a in attrs])
    parts.append(tag("h3", "Most-masked examples"))
    parts.append(tag("p", join([legend, Html('<label class="toggle"><input type="checkbox" checked '
                                             'data-toggle="plain"> highlight masked tokens</label>')]), cls="legend"))
    if tokenizer is not None and run.examples:
        parts.append(note("Response tokens; hover any token for its scores (RI, KN, TR) and why it was masked."))
        parts.extend(mask_example(ex, tokenizer) for ex in run.examples)
    else:
        parts.append(note(f"Token view from summary.json ({why_no_tokens}); hover a masked token for its scores."))
        parts.extend(marked_example(m, attrs) for m in s.get("most_masked") or [])
    decision = s.get("decision") or {}
    parts.append(json_block({"settings": s.get("settings"), "decision": decision, "scoring": s.get("scoring")}))
    return Section(anchor, f"mask-tokens ({run.path.name})", "masks", join(parts))


def token_span(text: str, code: int, scores: dict[str, float] | list[dict[str, float]]) -> Html:
    """A response token (or a few that only decode together) with its scores as the hover text;
    masked ones get a class per attribute and the attribute letters."""
    names = [a for a, bit in BITS.items() if code & bit]
    per = scores if isinstance(scores, list) else [scores]
    hover = " | ".join(" · ".join(f"{a.upper()} {fmt(v)}" for a, v in sc.items()) for sc in per)
    if names:
        hover += " · masked: " + ", ".join(a.upper() for a in names)
        return tag("span", text, cls="tok " + " ".join(names), title=hover,
                   data_why="".join(LETTERS[a] for a in names))
    return tag("span", text, title=hover)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """(text, positions) per token, except that tokens holding parts of one character (byte-level
    BPE splits some UTF-8 characters) are joined until they decode cleanly (at most 4)."""
    ids = [int(t) for t in ids]
    out: list[tuple[str, list[int]]] = []
    k = 0
    while k < len(ids):
        end = k + 1
        text = tokenizer.decode(ids[k:end])
        if "\ufffd" in text:
            for stop in range(k + 2, min(len(ids), k + 4) + 1):
                joined = tokenizer.decode(ids[k:stop])
                if "\ufffd" not in joined:
                    text, end = joined, stop
                    break
        out.append((text, list(range(k, end))))
        k = end
    return out


def mask_example(ex: Any, tokenizer: Any) -> Html:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = ex.input_ids
    resp = np.flatnonzero(ex.response)
    start = int(resp[0]) if len(resp) else len(ids)
    prompt = tokenizer.decode([int(t) for t in ids[:start]], skip_special_tokens=True)
    shown = [int(p) for p in resp if int(ids[p]) not in special or ex.reasons[p]]
    spans = []
    for text, group in token_pieces(tokenizer, [ids[p] for p in shown]):
        where = [shown[g] for g in group]
        code = int(np.bitwise_or.reduce([int(ex.reasons[p]) for p in where]))
        spans.append(token_span(text, code, [{a: float(v[p]) for a, v in ex.scores.items()} for p in where]))
    n_masked = int((ex.reasons > 0).sum())
    head = tag("h4", f"{ex.id}: {n_masked} of {len(resp)} response tokens masked")
    return tag("div", join([head, details("prompt", tag("div", prompt, cls="tokens prompt")),
                            tag("div", join(spans), cls="tokens")]), cls="ex")


def marked_example(m: dict[str, Any], attrs: Sequence[str]) -> Html:
    """An entry of summary.json `most_masked`: its `marked` text (masked tokens as [[token]]^LETTERS,
    tokens/summary.py) cut back into spans using its list of masked tokens, in order."""
    text = str(m.get("marked", ""))
    spans: list[Any] = []
    cursor = 0
    for tok in m.get("tokens") or []:
        reasons = [r for r in tok.get("reasons") or [] if r in BITS]
        marker = f"[[{tok.get('token', '')}]]^{''.join(LETTERS[r] for r in reasons)}"
        at = text.find(marker, cursor)
        if at < 0:
            continue
        spans.append(text[cursor:at])
        code = sum(BITS[r] for r in reasons)
        spans.append(token_span(str(tok.get("token", "")), code,
                                {a: tok.get(a) if tok.get(a) is not None else float("nan") for a in attrs}))
        cursor = at + len(marker)
    spans.append(text[cursor:])
    head = tag("h4", f"{m.get('id')}: {m.get('masked')} of {m.get('eligible')} response tokens masked")
    return tag("div", join([head, tag("div", join(spans), cls="tokens")]), cls="ex")


# --- attribution ----------------------------------------------------------------------------------

def precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at each distinct score threshold, highest first; tied scores form one
    threshold, as in evaluate.attribution.average_precision (whose value is sum(diff(recall) * precision))."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    return tp[last] / (last + 1), tp[last] / max(int(labels.sum()), 1)


def attribution_section(run: AttributionRun, texts: Texts, anchor: str, n_examples: int = 20) -> Section:
    s = run.summary
    metrics = s.get("metrics") or {}
    det = s.get("details") or {}
    labelled = bool(run.rows) and all("label" in r for r in run.rows)
    parts = [heading("attribute", f"attribution: {s.get('method', '?')}", run.path), facts([
        ("method", s.get("method")), ("examples", s.get("examples", len(run.rows))),
        ("time", f"{s['wall_s']} s" if "wall_s" in s else None),
        ("concept layer", det.get("layer")), ("concept separation (AUC-ROC)", det.get("separation")),
        ("labelled", metrics.get("positives")), ("AUC-PR", metrics.get("auc_pr")),
        ("base rate", metrics.get("base_rate")), ("removed top", s.get("removed"))])]
    ks = [k for k in metrics if k.startswith("precision@")]
    if ks:
        parts.append(table(["k", "precision@k", "recall@k"],
                           [[k.split("@")[1], metrics[k], metrics.get(k.replace("precision", "recall"), "-")]
                            for k in ks]))
    if labelled:
        scores = np.asarray([r["score"] for r in run.rows])
        labels = np.asarray([r["label"] for r in run.rows])
        precision, recall = precision_recall(scores, labels)
        ap = float((np.diff(np.r_[0.0, recall]) * precision).sum())
        parts.append(tag("h3", "Precision-recall"))
        parts.append(plots.pr_curve(recall, precision, float(labels.mean()), ap,
                                    np.cumsum(labels) / max(int(labels.sum()), 1)))
        ranks = [r["rank"] for r in run.rows if r["label"]]
        parts.append(note(f"Labelled examples sit at ranks {', '.join(map(str, ranks[:60]))}"
                          f"{' ...' if len(ranks) > 60 else ''} of {len(run.rows)}."))
    if run.removal:
        parts.append(tag("h3", "Removal curve"))
        parts.append(plots.removal_curve(run.removal))
    parts.append(tag("h3", f"Ranked list (top {min(n_examples, len(run.rows))} of {len(run.rows)})"))
    parts.append(texts_note(texts))
    parts.append(ranking_table(run.rows[:n_examples], texts, labelled))
    return Section(anchor, f"attribute: {s.get('method', '?')} ({run.path.name})", "attribution", join(parts))


def ranking_table(rows: Sequence[dict[str, Any]], texts: Texts, labelled: bool) -> Html:
    out = []
    for r in rows:
        ex = texts.by_id.get(r["id"])
        cells = [r["rank"], tag("span", r["id"], cls="id"), r["score"], *(["yes" if r["label"] else "no"] if labelled else []),
                 long_text(prompt_text(ex)) if ex is not None else "-", long_text(ex.response) if ex is not None else "-"]
        out.append(Row(cells, "pos" if labelled and r["label"] else ""))
    return table(["rank", "id", "score", *(["label"] if labelled else []), "prompt", "response"], out)


# --- experiment -----------------------------------------------------------------------------------

def experiment_section(run: ExperimentRun, primary: list[str], columns: list[str], lower_is_better: set[str],
                       anchor: str) -> Section:
    res = run.results
    summary, rows = res["summary"], res["rows"]
    cfg = res.get("config") or {}
    hits = res.get("cache_hits") or {}
    parts = [heading("experiment", "experiment: methods compared", run.path), facts([
        ("methods", ", ".join(m for m in summary)), ("seeds", ", ".join(map(str, cfg.get("seeds", [])))),
        ("budget", cfg.get("budget")), ("steps per run", res.get("steps")), ("steps from", res.get("steps_from")),
        ("pool", (res.get("pool") or {}).get("examples")),
        ("cache reuse", ", ".join(f"{k} {v}" for k, v in hits.items()) or None),
        ("written by", res.get("written_by"))])]
    against = "; Δ against full data" if "full" in summary else ""
    parts.append(tag("h3", f"Comparison (mean ± std over seeds{against})"))
    parts.append(comparison_table(summary, primary or columns, lower_is_better))
    others = [c for c in columns if c not in primary] if primary else []
    if others:
        parts.append(details(f"other evaluation columns ({len(others)})",
                             comparison_table(summary, others, lower_is_better, directions=False)))
    parts.append(tag("h3", "Plots (error bars: std over seeds; dots: single seeds; dashed: full data)"))
    parts.append(plots.experiment_bars(summary, rows, primary or columns[:6], lower_is_better))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    parts.append(details(f"all runs ({len(rows)} rows)", table(keys, [[r.get(k) for k in keys] for r in rows])))
    parts.append(json_block(cfg, "experiment settings (JSON)"))
    return Section(anchor, f"experiment ({run.path.name})", "experiment", join(parts))


def comparison_table(summary: dict[str, dict[str, Any]], columns: list[str], lower_is_better: set[str],
                     directions: bool = True) -> Html:
    """One row per method, `mean ± std (Δ vs full)` per column; with `directions`, the best mean
    (not counting the untrained base model) in bold and each header saying which way is better."""
    best: dict[str, float] = {}
    for col in columns if directions else []:
        means = [st[col]["mean"] for m, st in summary.items() if m != "base" and isinstance(st.get(col), dict)]
        if len(set(means)) > 1:  # a best only where the methods differ
            best[col] = min(means) if col.split("/")[-1] in lower_is_better else max(means)
    rows = []
    for method, st in summary.items():
        chosen = st.get("selected")
        cells: list[Any] = [method, st.get("runs"), chosen["mean"] if isinstance(chosen, dict) else "-"]
        for col in columns:
            v = st.get(col)
            if not isinstance(v, dict):
                cells.append("-")
                continue
            text = fmt(v["mean"]) + (f" ± {fmt(v['std'])}" if v.get("n", 1) > 1 else "")
            if method != "full" and "delta_vs_full" in v:
                text += f" (Δ {v['delta_vs_full']:+.4f})"
            cells.append(tag("b", text) if method != "base" and v["mean"] == best.get(col) else esc(text))
        rows.append(cells)
    heads = ["method", "runs", "selected",
             *[f"{c} ({'lower' if c.split('/')[-1] in lower_is_better else 'higher'} is better)" if directions else c
               for c in columns]]
    return table(heads, rows)
