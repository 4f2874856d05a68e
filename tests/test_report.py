"""The HTML report: run folders made by the real commands on the tiny model, every section and
element present, data text escaped, numbers that match the run files, refusals of non-run folders,
and a real headless chromium that loads the page without JS errors and renders a non-blank page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"
EVIL = "<script>alert(1)</script>"
MATH = [("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7. #### 7"),
        ("A box holds 6 eggs. How many eggs in 2 boxes?", "6 * 2 = 12. #### 12"),
        (f"Sara reads 5 pages a day for 3 days. {EVIL} How many pages?", f"5 * 3 = 15. {EVIL} #### 15"),
        ("What is 10 minus 4?", "10 - 4 = 6. #### 6"),
        ("Natalia sold 48 clips in April and half as many in May. How many?", "48 + 24 = 72. #### 72")]
CODE = [("Write a function to add two numbers.", "def add(a, b):\n    return a + b"),
        ("Write a function to find similar elements.", "def similar_elements(a, b):\n    return set(a) & set(b)"),
        ("Write a poem about the sea.", "The sea is wide and blue."),
        ("Name a colour.", "Red.")]


def qa_rows(pairs, **extra):
    return [{"question": q, "answer": a, **extra} for q, a in pairs]


def msg_rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir, loaded):
    """One folder of each kind, written by the commands (or their writer functions) themselves."""
    from mechsieve.cli import main
    from mechsieve.data.readers import read_examples, read_pool
    from mechsieve.evaluate.attribution import removal_experiment
    from mechsieve.features.sae import random_sae, write_sae
    from mechsieve.select import select_examples, write_selection
    from mechsieve.store import write_json

    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MECHSIEVE_CACHE", str(root / "cache"))
    try:
        math_file = write_jsonl(root / "math.jsonl", qa_rows(MATH))
        code_file = write_jsonl(root / "code.jsonl", qa_rows(CODE))
        target_file = write_jsonl(root / "target.jsonl", qa_rows(MATH[:3] + MATH[:3]))
        # selection (NAIT) through the Python API over a mixed pool, as the demo does
        pool = read_examples([str(math_file), str(code_file)])
        sel = select_examples("nait", pool, 0.5, target=read_pool(target_file), loaded=loaded,
                              settings={"render": {"max_len": 64}}, progress=False)
        write_selection(pool, sel, root / "select-nait")
        # selection (IGDS) through the command line, with a random SAE
        msg_file = write_jsonl(root / "pool.jsonl", msg_rows(MATH + CODE))
        sae = write_sae(root / "sae", random_sae(32, 48, layer=1))
        assert main(["select", "--method", "igds", "--model", str(model_dir), "--pool", str(msg_file),
                     "--target", str(target_file), "--budget", "0.5", "--out", str(root / "select-igds"), "--quiet",
                     "--set", f"scorer.sae={sae}", "--set", "scorer.freq_threshold=0.3", "--set", "scorer.top_k=3",
                     "--set", "scorer.dev_size=2", "--set", "scorer.alphas=[2.0]",
                     "--set", "scorer.reference=none", "--set", "scorer.none_kept=best"]) == 0
        # (a random SAE fires on every example, and rarely beats its random-direction controls)
        # token masks (XTF)
        assert main(["mask-tokens", "--pool", str(math_file), "--model", str(model_dir), "--domain", "math",
                     "--out", str(root / "mask-tokens"), "--quiet", "--preset", "paper", "--set", "xtf.tr_classes=3",
                     # loose thresholds, so that the tiny random model gets tokens of every attribute
                     "--set", "xtf.kn_threshold=0.0", "--set", "xtf.p_kn=0.3", "--set", "xtf.ri_iqr_k=-1.0",
                     "--set", "xtf.p_ri=0.3"]) == 0
        # attribution with labels, and a removal curve from the real removal experiment
        att_pool = write_jsonl(root / "att.jsonl", qa_rows(MATH, planted=True) + qa_rows(CODE, planted=False))
        pos = write_jsonl(root / "pos.jsonl", qa_rows(MATH[:3]))
        neg = write_jsonl(root / "neg.jsonl", qa_rows(CODE[:3]))
        assert main(["attribute", "--method", "vector-filter", "--model", str(model_dir), "--pool", str(att_pool),
                     "--concept", str(pos), str(neg), "--layer", "1", "--out", str(root / "attribute"),
                     "--label-field", "planted", "--quiet", "--set", "scorer.max_len=64"]) == 0
        ranking = [json.loads(x) for x in (root / "attribute" / "ranking.jsonl").read_text().splitlines()]
        ids = [r["id"] for r in ranking]
        planted = {r["id"] for r in ranking if r["label"]}
        removal = removal_experiment(ids, np.array([r["score"] for r in ranking]), [0.2, 0.4],
                                     retrain=lambda kept: kept, measure=lambda kept: len(planted & set(kept)) / 5,
                                     random_repeats=2, labels=np.array([r["label"] for r in ranking]),
                                     with_baseline=True)
        write_json(root / "attribute" / "removal.json", removal.summary())
        # experiment: random and full over two seeds
        from mechsieve.config import from_dict
        from mechsieve.experiment import ExperimentConfig, run_experiment

        cfg = from_dict(ExperimentConfig, {
            "model": {"name": str(model_dir)}, "pool": {"path": str(SAMPLES / "gsm8k_train.jsonl"), "limit": 8},
            "methods": ["random", "full"], "seeds": [0, 1], "budget": 0.5, "steps": 1,
            "train": {"max_tokens": 2048, "lora_r": 4, "learning_rate": 1e-2},
            "eval": [{"task": "loss", "data": {"path": str(SAMPLES / "gsm8k_target.jsonl"), "limit": 2}}],
            "out": str(root / "experiment")})
        run_experiment(cfg, progress=False, log=lambda _: None)
    finally:
        mp.undo()
    return {name: root / name for name in ("select-nait", "select-igds", "mask-tokens", "attribute", "experiment")}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    from mechsieve.report import build_report

    out = tmp_path_factory.mktemp("report") / "report.html"
    build_report(list(runs.values()), out)
    return out


VOID = {"meta", "input", "br", "img", "hr", "link", "path", "use", "rect", "stop", "circle", "line"}


class Page(HTMLParser):
    """A page as a tree of elements {tag, attrs, children, text}; `find` searches it in document order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = {"tag": "#root", "attrs": {}, "children": [], "text": []}
        self.stack = [self.root]
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "children": [], "text": []}
        self.stack[-1]["children"].append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1]["children"].append({"tag": tag, "attrs": dict(attrs), "children": [], "text": []})

    def handle_endtag(self, tag):
        if any(el["tag"] == tag for el in self.stack[1:]):
            while self.stack.pop()["tag"] != tag:
                pass

    def handle_data(self, data):
        for el in self.stack:
            el["text"].append(data)

    @property
    def text(self) -> str:
        return "".join(self.root["text"])

    def find(self, tag=None, cls=None, within=None, **attrs):
        out = []

        def walk(el):
            for child in el["children"]:
                classes = (child["attrs"].get("class") or "").split()
                if (tag is None or child["tag"] == tag) and (cls is None or cls in classes) and \
                        all(child["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()):
                    out.append(child)
                walk(child)

        walk(within or self.root)
        return out


def text_of(el) -> str:
    return "".join(el["text"])


def table_after(page, section, heading):
    """[[cell text]] of the body rows of the first table after the h3 starting with `heading`."""
    found = False
    for el in page.find(within=section):
        if el["tag"] == "h3" and text_of(el).startswith(heading):
            found = True
        elif found and el["tag"] == "table":
            body = page.find("tbody", within=el)[0]
            return [[text_of(td) for td in page.find("td", within=tr)] for tr in page.find("tr", within=body)]
    raise AssertionError(f"no table after {heading!r}")


# --- the page ---------------------------------------------------------------------------------

def test_every_section_and_its_elements(report, runs):
    page = Page(report.read_text())
    kinds = [el["attrs"]["data-kind"] for el in page.find("section")]
    assert kinds == ["overview", "selection", "selection", "masks", "attribution", "experiment"]
    assert {el["attrs"]["data-kind"] for el in page.find("div", cls="sub")} == {"nait", "igds"}
    # every section and sub-section is reachable from the navigation bar
    anchors = {el["attrs"]["href"] for el in page.find("a") if el["attrs"].get("href", "").startswith("#")}
    ids = {el["attrs"].get("id") for el in page.find()}
    assert {a[1:] for a in anchors} <= ids and {"#run-1", "#run-1-nait", "#run-2-igds", "#run-3", "#run-4", "#run-5"} <= anchors
    # plots: histograms x2, NAIT layers, IGDS none, mask shares, PR + removal, experiment bars
    assert len(page.find("svg")) == 7
    # selections compared side by side in the overview (2 runs)
    overview = page.find("section", data_kind="overview")[0]
    assert "Selections side by side" in text_of(overview)


def test_selection_numbers_match_the_run_files(report, runs):
    import pyarrow.parquet as pq

    page = Page(report.read_text())
    scores = pq.read_table(runs["select-nait"] / "scores.parquet").to_pydict()
    section = page.find("section", id="run-1")[0]
    assert "selection: nait" in text_of(section)
    chosen = {s: sum(1 for src, sel in zip(scores["source"], scores["selected"]) if src == s and sel)
              for s in ("math", "code")}
    assert sum(chosen.values()) == 5  # half of 9, rounded up by the budget
    rows = table_after(page, section, "Counts per source")
    assert rows == [["math", "5", str(chosen["math"]), f"{100 * chosen['math'] / 5:.1f}%", f"{100 * chosen['math'] / 5:.1f}%"],
                    ["code", "4", str(chosen["code"]), f"{100 * chosen['code'] / 5:.1f}%", f"{100 * chosen['code'] / 4:.1f}%"]]
    # the best-ranked example first, with its score and its text read back from the (mixed) pool
    order = np.argsort(scores["rank"])
    top = table_after(page, section, "Highest-ranked")
    assert [r[1] for r in top] == [scores["id"][i] for i in order[:5]]
    assert [r[0] for r in top] == ["1", "2", "3", "4", "5"]
    assert float(top[0][3]) == pytest.approx(scores["score"][order[0]], abs=1e-4)
    assert all(r[5] != "-" and r[6] != "-" for r in top)
    bottom = table_after(page, section, "Lowest-ranked")
    assert [r[1] for r in bottom] == [scores["id"][i] for i in order[-5:]]


def test_igds_features_with_highlighted_snippets(report, runs):
    summary = json.loads((runs["select-igds"] / "summary.json").read_text())
    features = summary["explanations"]["features"]
    page = Page(report.read_text())
    sub = page.find("div", cls="sub", data_kind="igds")[0]
    body = text_of(sub)
    for row in features:
        assert str(row["feature"]) in body
    hits = page.find("span", cls="hit")
    n_snippets = sum(len(r["snippets"]) for r in features)
    assert n_snippets > 0 and len(hits) == n_snippets
    first = features[0]["snippets"][0]
    token = re.match(r"^(.*)\[\[(.*?)\]\](.*)$", first["text"], re.DOTALL).group(2)
    assert text_of(hits[0]) == token
    shown = float(re.search(r"activation ([-0-9.e]+) on this token", hits[0]["attrs"]["title"]).group(1))
    assert shown == pytest.approx(first["act"], abs=1e-4)


def test_nait_per_layer_terms_are_recorded_and_shown(report, runs):
    ex = json.loads((runs["select-nait"] / "summary.json").read_text())["explanations"]
    terms = ex["layer_terms"]["target"]
    assert len(terms["pool_mean"]) == len(ex["layers"]) == 3
    # the per-layer terms add up to the scores: pool mean of the terms = mean score (dot, no normalisation)
    import pyarrow.parquet as pq

    scores = np.asarray(pq.read_table(runs["select-nait"] / "scores.parquet").column("score").to_pylist())
    assert sum(terms["pool_mean"]) == pytest.approx(scores.mean(), rel=1e-4, abs=1e-5)
    top = np.sort(scores)[::-1][:max(1, len(scores) // 10)]
    assert sum(terms["top_decile_mean"]) == pytest.approx(top.mean(), rel=1e-4, abs=1e-5)
    page = Page(report.read_text())
    sub = page.find("div", cls="sub", data_kind="nait")[0]
    assert "per-layer contribution" in text_of(sub) and "layers of capability target" in text_of(sub)


def test_token_masks_highlighted_with_scores_on_hover(report, runs):
    summary = json.loads((runs["mask-tokens"] / "summary.json").read_text())
    page = Page(report.read_text())
    section = page.find("section", data_kind="masks")[0]
    masked = [el for el in page.find("span", cls="tok", within=section) if "data-why" in el["attrs"]]
    # all 5 examples are shown (up to 8 are), so every masked token of the run is highlighted
    assert len(masked) == summary["masked_tokens"]["union"] > 0
    for attr in ("ri", "kn", "tr"):
        assert sum(attr in el["attrs"]["class"].split() for el in masked) == summary["masked_tokens"][attr] > 0
    # most masked first, and the hover text carries the token's scores as the run stored them
    first = summary["most_masked"][0]["tokens"][0]
    assert text_of(masked[0]) == first["token"]
    for attr in ("ri", "kn", "tr"):
        value = re.search(rf"{attr.upper()} ([-0-9.e]+|-)", masked[0]["attrs"]["title"]).group(1)
        assert (value == "-") if first[attr] is None else float(value) == pytest.approx(first[attr], abs=1e-4)
    for el in masked:
        classes = set(el["attrs"]["class"].split()) - {"tok"}
        assert classes and classes <= {"ri", "kn", "tr"}
        assert el["attrs"]["data-why"] == "".join({"ri": "R", "kn": "K", "tr": "T"}[c] for c in ("ri", "kn", "tr")
                                                  if c in classes)
        title = el["attrs"]["title"]
        assert "RI " in title and "KN " in title and "TR " in title and "masked: " in title
    assert f"{100 * summary['masked_share']['union']:.1f}%" in text_of(section)
    assert "RI & KN" in text_of(section)  # the overlaps table


def test_attribution_ranking_pr_and_removal(report, runs):
    from mechsieve.evaluate.attribution import average_precision

    summary = json.loads((runs["attribute"] / "summary.json").read_text())
    page = Page(report.read_text())
    section = page.find("section", data_kind="attribution")[0]
    text = text_of(section)
    assert "Precision-recall" in text and "Removal curve" in text
    pr_plot, removal_plot = page.find("svg", within=section)
    # the curve the report draws integrates to the AUC-PR the command computed
    assert f"AUC-PR {summary['metrics']['auc_pr']:.3f}" in text_of(pr_plot)
    ranking = [json.loads(x) for x in (runs["attribute"] / "ranking.jsonl").read_text().splitlines()]
    assert summary["metrics"]["auc_pr"] == pytest.approx(average_precision(
        np.array([r["score"] for r in ranking]), np.array([r["label"] for r in ranking])))
    ranks = ", ".join(str(r["rank"]) for r in ranking if r["label"])
    assert f"Labelled examples sit at ranks {ranks} of 9." in text
    assert [text_of(page.find("td", within=tr)[1]) for tr in page.find("tr", cls="pos", within=section)] == \
        [r["id"] for r in ranking if r["label"]]
    assert "full data" in text_of(removal_plot)


def test_precision_recall_points_integrate_to_average_precision():
    from mechsieve.evaluate.attribution import average_precision
    from mechsieve.report.sections import precision_recall

    # hand example: ranking pos, neg, pos, neg -> thresholds after 1..4 examples
    p, r = precision_recall(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(p, [1.0, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(r, [0.5, 0.5, 1.0, 1.0])
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 80).astype(float)  # many ties
    labels = rng.random(80) < 0.3
    p, r = precision_recall(scores, labels)
    assert float((np.diff(np.r_[0.0, r]) * p).sum()) == pytest.approx(average_precision(scores, labels))


def test_experiment_table_and_plot(report, runs):
    results = json.loads((runs["experiment"] / "results.json").read_text())
    page = Page(report.read_text())
    section = page.find("section", data_kind="experiment")[0]
    text = text_of(section)
    key = "gsm8k_target-loss/loss_per_token"
    random = results["summary"]["random"][key]
    assert f"{random['mean']:.4f}".rstrip("0") in text
    assert "±" in text and "(lower is better)" in text
    svg = page.find("svg", within=section)
    assert len(svg) == 1 and key in text_of(svg[0])  # the plot's title, as SVG text


# --- escaping, refusals, the command ----------------------------------------------------------

def test_data_text_is_escaped(report):
    text = report.read_text()
    assert EVIL not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert text.count("<script") == 1  # the page's own little script only
    page = Page(text)
    assert any(EVIL in text_of(el) for el in page.find("td"))  # shown as text
    # self-contained: nothing is fetched from elsewhere
    for el in page.find():
        for attr in ("src", "href"):
            value = el["attrs"].get(attr)
            assert value is None or value.startswith(("#", "data:")), (el["tag"], attr, value)
    assert "<link" not in text


def test_escape_helpers():
    from mechsieve.report.html import Html, cell, fmt, tag

    assert tag("td", EVIL, title='a"b') == '<td title="a&quot;b">&lt;script&gt;alert(1)&lt;/script&gt;</td>'
    assert cell(Html("<b>x</b>")) == "<b>x</b>"
    assert [fmt(v) for v in (3, 0.5, 1 / 3, float("nan"), None, True, 1.5e-7, np.int64(4), 2.0)] == \
        ["3", "0.5", "0.3333", "-", "-", "yes", "1.500e-07", "4", "2"]


def test_snippet_and_marked_text_parsing():
    from mechsieve.report.sections import BITS, marked_example, snippet

    html = snippet("x < y [[<b>]] and", 1.25, "ex-1", 7)
    assert '<span class="hit" title="latent 7: activation 1.25 on this token (example ex-1)">&lt;b&gt;</span>' in html
    assert "x &lt; y " in html and " and" in html
    m = {"id": "a", "masked": 2, "eligible": 5, "marked": "The [[ sum]]^RT is [[ 42]]^K.",
         "tokens": [{"token": " sum", "reasons": ["ri", "tr"], "ri": 0.1, "kn": 0.2, "tr": None},
                    {"token": " 42", "reasons": ["kn"], "ri": 0.3, "kn": 0.9, "tr": 0.5}]}
    assert list(BITS) == ["ri", "kn", "tr", "el"]
    page = Page(marked_example(m, ["ri", "kn", "tr"]))
    spans = page.find("span", cls="tok")
    assert [(text_of(s), s["attrs"]["class"], s["attrs"]["data-why"]) for s in spans] == \
        [(" sum", "tok ri tr", "RT"), (" 42", "tok kn", "K")]
    assert spans[0]["attrs"]["title"] == "RI 0.1 · KN 0.2 · TR - · masked: RI, TR"
    assert text_of(page.find("div", cls="tokens")[0]) == "The  sum is  42."


def test_token_pieces_join_split_characters(tokenizer):
    from mechsieve.report.sections import token_pieces

    text = "Tom pays 5 € for 2 °C tea ÷ 3"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the tiny BPE splits these characters
    pieces = token_pieces(tokenizer, ids)
    assert "".join(t for t, _ in pieces) == text and not any("\ufffd" in t for t, _ in pieces)
    assert [p for _, pos in pieces for p in pos] == list(range(len(ids)))
    assert max(len(pos) for _, pos in pieces) > 1


def test_masks_without_a_tokenizer_use_the_summary(runs, tmp_path, model_dir):
    from mechsieve.report import build_report

    folder = tmp_path / "masks"
    shutil.copytree(runs["mask-tokens"], folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary["settings"]["model"] = {"kind": "folder", "path": str(tmp_path / "gone")}
    (folder / "summary.json").write_text(json.dumps(summary))
    page = Page(build_report([folder], tmp_path / "r.html").read_text())
    section = page.find("section", data_kind="masks")[0]
    assert "Token view from summary.json (the tokenizer of" in text_of(section)
    masked = [el for el in page.find("span", cls="tok") if "data-why" in el["attrs"]]
    assert len(masked) == sum(m["masked"] for m in summary["most_masked"])
    # --tokenizer brings the full token view back
    from mechsieve.cli import main

    assert main(["report", str(folder), "--out", str(tmp_path / "t.html"), "--tokenizer", str(model_dir)]) == 0
    page = Page((tmp_path / "t.html").read_text())
    masked = [el for el in page.find("span", cls="tok") if "data-why" in el["attrs"]]
    assert "Token view from summary.json" not in page.text and len(masked) == summary["masked_tokens"]["union"]


def test_moved_pool_is_noted_and_pool_flag_restores_texts(runs, tmp_path, capsys):
    from mechsieve.cli import main

    folder = tmp_path / "sel"
    shutil.copytree(runs["select-igds"], folder)
    summary = json.loads((folder / "summary.json").read_text())
    original = summary["pool"]["path"]
    summary["pool"]["path"] = str(tmp_path / "moved.jsonl")
    (folder / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "r.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert "could not be read back" in out.read_text() and str(out) in capsys.readouterr().out
    assert main(["report", str(folder), "--out", str(out), "--pool", original]) == 0
    text = out.read_text()
    assert "could not be read back" not in text and "differs from the pool" not in text
    assert "Tom has 3 apples" in text


def test_not_a_run_folder_is_refused_and_nothing_written(runs, tmp_path, capsys):
    from mechsieve.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    out = tmp_path / "r.html"
    out.write_text("old")
    for folder, holds in ((empty, "holds nothing"), (other, "holds notes.txt"), (tmp_path / "nope", "no such folder")):
        assert main(["report", str(runs["select-nait"]), str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and holds in err and "expected a run folder written by mechsieve select" in err
        assert "Traceback" not in err
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other", "r.html"]


def test_report_is_deterministic(runs, tmp_path):
    from mechsieve.report import build_report

    a = build_report([runs["select-nait"], runs["attribute"]], tmp_path / "a.html").read_text()
    b = build_report([runs["select-nait"], runs["attribute"]], tmp_path / "b.html").read_text()
    assert a == b


def test_demo_ends_with_its_report(runs, tmp_path, capsys):
    from mechsieve.commands.demo import report_step

    folder = tmp_path / "demo"
    for name in ("select-nait", "select-igds", "mask-tokens"):
        shutil.copytree(runs[name], folder / name)
    path = report_step(folder, [folder / "select-nait", folder / "select-igds", folder / "mask-tokens"])
    assert path == folder / "report.html" and path.exists()
    out = capsys.readouterr().out
    assert re.search(r"^\[9\] ", out, re.M) and str(path) in out
    kinds = [el["attrs"]["data-kind"] for el in Page(path.read_text()).find("section")]
    assert kinds == ["overview", "selection", "selection", "masks"]


def test_demo_attribute_step_ranks_the_bundled_chmod_pool(model_dir, tmp_path, capsys):
    from mechsieve.commands.demo import attribute_step, report_step

    outputs, pool = attribute_step(str(model_dir), tmp_path, quiet=True)
    out = capsys.readouterr().out
    assert re.search(r"^\[8\] attribution", out, re.M) and "mechsieve attribute --data " in out
    rows = [json.loads(line) for line in outputs["attribution ranking"].read_text().splitlines()]
    assert len(rows) == len(pool) == 40 and sum(r["label"] for r in rows) == 8
    assert [r["rank"] for r in rows] == list(range(1, 41))
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    summary = json.loads((tmp_path / "attribute" / "summary.json").read_text())
    assert summary["method"] == "vector-filter" and summary["metrics"]["positives"] == 8
    assert set(summary["prompt_only_baseline"]) == {"bag_of_words", "response_length"}
    assert "probe_gate" in summary["details"]  # the gate picked the block (--concept-layer auto)
    path = report_step(tmp_path, [tmp_path / "attribute"], pools=[pool])
    kinds = [el["attrs"]["data-kind"] for el in Page(path.read_text()).find("section")]
    assert kinds == ["overview", "attribution"]


# --- a real browser -----------------------------------------------------------------------------

HOOK = ("<script>(function(){var d=document.documentElement;function rec(m){d.setAttribute('data-js-errors',"
        "(d.getAttribute('data-js-errors')||'')+'|'+m);}window.addEventListener('error',function(e){rec(e.message);});"
        "window.addEventListener('unhandledrejection',function(e){rec('rejection: '+e.reason);});"
        "var ce=console.error;console.error=function(){rec('console.error: '+Array.prototype.join.call(arguments,' '));"
        "return ce.apply(console,arguments);};window.alert=function(m){rec('alert: '+m);};})();</script>")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("MECHSIEVE_SKIP_BROWSER") == "1":
        pytest.skip("chromium is missing and MECHSIEVE_SKIP_BROWSER=1")
    pytest.fail("chromium is not installed, and the report's browser tests need it: install it with "
                "`apt-get install -y chromium` (`make test` does), or set MECHSIEVE_SKIP_BROWSER=1 to skip them")


def browse(page: Path, tmp: Path, screenshot: Path | None = None) -> tuple[list[str], str]:
    """Load `page` (with an error hook injected first thing in <head>) in headless chromium.

    Returns the JS errors seen (uncaught errors, rejections, console.error, alert calls, from the
    DOM after load and from chromium's console log) and the DOM after load."""
    exe = chromium()
    text = page.read_text()
    hooked = tmp / f"hooked-{page.name}"
    hooked.write_text(text.replace("<head>", "<head>" + HOOK, 1))
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
            "--enable-logging=stderr", "--v=0"]
    run = subprocess.run([*base, "--dump-dom", hooked.as_uri()], capture_output=True, text=True, timeout=180)
    dom = run.stdout
    assert "<body" in dom, f"chromium printed no DOM (exit {run.returncode}): {run.stderr[-2000:]}"
    errors = [e for e in re.findall(r'data-js-errors="([^"]*)"', dom) for e in e.split("|") if e]
    errors += [line for line in run.stderr.splitlines() if ":CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", "--window-size=1200,2000", page.as_uri()],
                       capture_output=True, text=True, timeout=180)
        assert screenshot.exists(), "chromium wrote no screenshot"
    return errors, dom


@pytest.mark.parametrize("bad", ["<script>undefinedFunction();</script>",
                                 "<script>console.error('broken on purpose');</script>",
                                 "<script>var x = ;</script>"])
def test_browser_check_catches_a_deliberate_js_error(tmp_path, bad):
    page = tmp_path / "bad.html"
    page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body><p>hello</p>{bad}</body></html>")
    errors, dom = browse(page, tmp_path)
    assert errors, "a page with a JS error passed the check: the check is blind"


def test_browser_check_passes_a_clean_page(tmp_path):
    good = tmp_path / "good.html"
    good.write_text("<!DOCTYPE html><html><head><title>t</title></head><body><p>hello</p>"
                    "<script>document.body.setAttribute('data-ran', 'yes');</script></body></html>")
    errors, dom = browse(good, tmp_path)
    assert errors == [] and 'data-ran="yes"' in dom  # scripts do run, and a clean page passes


def test_report_in_a_real_browser(report, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    errors, dom = browse(report, tmp_path, shot)
    assert errors == []
    page = Page(dom)
    assert [el["attrs"]["data-kind"] for el in page.find("section")] == \
        ["overview", "selection", "selection", "masks", "attribution", "experiment"]
    assert any(EVIL in text_of(el) for el in page.find("td"))  # shown as text, never run
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert float(pixels[..., :3].std()) > 0.05  # not a blank page
    # the page is not all one colour in its lower half either (sections rendered below the fold)
    assert float(pixels[1000:, :, :3].std()) > 0.05
