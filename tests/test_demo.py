"""`mechsieve demo` end to end on a tiny model (20 blocks: the demo captures blocks 0, 9, 19, -1)."""

import json
import math

import pyarrow.parquet as pq

from conftest import build_model
from mechsieve.cli import main


def test_demo_runs_every_step_and_its_report_has_every_text(tmp_path, tokenizer, capsys):
    folder = tmp_path / "tiny20"
    from transformers import AutoModelForCausalLM

    config = build_model("llama", len(tokenizer)).config
    config.num_hidden_layers = 20  # same tiny widths, 20 blocks
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "demo"

    assert main(["demo", "--model", str(folder), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    steps = [line.split("]")[0] + "]" for line in lines if line.startswith("[")]
    assert steps == [f"[{i}]" for i in range(1, 10)]
    assert (out / "report.html").exists() and str(out / "report.html") in printed
    # [8] attribution: `mechsieve attribute` on the bundled chmod pool, its command printed
    assert "mechsieve attribute --data " in printed and "--label-field planted" in printed
    ranking = [json.loads(line) for line in (out / "attribute" / "ranking.jsonl").read_text().splitlines()]
    assert len(ranking) == 40 and sum(r["label"] for r in ranking) == 8

    # the mixed pool is one file (96 bundled samples: GSM8K, MedQA, MBPP), recorded by every run,
    # so the report command finds every text from the run folders alone; read back, it keeps its sources
    rows = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and {r["source"] for r in rows} == {"gsm8k_train", "medqa", "mbpp"}
    summary = json.loads((out / "select-nait" / "summary.json").read_text())
    assert summary["pool"]["path"] == str(out / "pool.jsonl") and summary["pool"]["examples"] == 96
    assert summary["pool"]["by_source"] == {"gsm8k_train": 32, "medqa": 32, "mbpp": 32}
    for method in ("nait", "random", "igds"):
        scores = pq.read_table(out / f"select-{method}" / "scores.parquet").to_pydict()
        by_source = json.loads((out / f"select-{method}" / "summary.json").read_text())["selected"]["by_source"]
        chosen = {s: sum(1 for src, sel in zip(scores["source"], scores["selected"]) if sel and src == s)
                  for s in ("gsm8k_train", "medqa", "mbpp")}
        assert by_source == chosen and sum(chosen.values()) == 10
    # per method, the selected examples per source are printed under the three source names
    header = next(i for i, line in enumerate(lines) if "selected per source:" in line and "gsm8k_train" in line)
    assert lines[header].split(":")[1].split() == ["gsm8k_train", "medqa", "mbpp"]
    nait_counts = json.loads((out / "select-nait" / "summary.json").read_text())["selected"]["by_source"]
    assert lines[header + 1].split()[:4] == ["nait", *map(str, nait_counts.values())]

    # IGDS: the tiny random model has no latent whose steering beats its controls; the robust
    # default stops there, and the demo says so in one line and goes on with keep=top
    stop = [line for line in lines if "IGDS stopped" in line]
    assert len(stop) == 1 and "keep=top" in stop[0] and "random-direction controls" in stop[0]
    igds = json.loads((out / "select-igds" / "summary.json").read_text())
    explanations = igds["explanations"]
    assert igds["settings"]["scorer"]["keep"] == "top" and len(explanations["kept"]) == 4
    assert explanations["sae_training"]["reused"] == str(out / "sae")  # the second try reused the SAE
    for row in explanations["features"]:  # each kept latent: its template share and top tokens printed
        line = next(x for x in lines if f"latent {row['feature']:>4}  freq" in x)
        assert f"template {row['template_share']:.0%}" in line and "(kept by keep=top)" in line
        for sn in row["snippets"]:
            token = sn["text"][sn["text"].find("[[") + 2:sn["text"].rfind("]]")]
            assert repr(token) in line

    # the closed loop: LoRA on the NAIT and random selections, same size, same steps; held-out loss
    results = json.loads((out / "loop" / "results.json").read_text())
    loop = {r["method"]: r for r in results["rows"]}
    key = "gsm8k_heldout/loss_per_token"
    assert list(loop) == ["base", "nait", "random"]
    assert loop["nait"]["selected"] == loop["random"]["selected"] == 10
    assert loop["nait"]["steps"] == loop["random"]["steps"] == 8 and loop["base"]["steps"] == 0
    assert all(math.isfinite(r[key]) for r in loop.values())
    assert loop["nait"][key] != loop["base"][key] and loop["random"][key] != loop["base"][key]
    # the base row is the plain held-out loss of the untouched model on the bundled test answers
    from mechsieve.commands.demo import sample_path
    from mechsieve.data import read_pool
    from mechsieve.data.render import RenderConfig
    from mechsieve.evaluate.loss import heldout_loss

    model = AutoModelForCausalLM.from_pretrained(folder)
    heldout = read_pool(sample_path("gsm8k_heldout.jsonl"))
    want = heldout_loss(model, tokenizer, heldout.examples, RenderConfig(max_len=384), progress=False)
    assert abs(loop["base"][key] - want["loss_per_token"]) < 1e-6
    assert loop["base"]["gsm8k_heldout/tokens"] == want["tokens"]
    for method in ("base", "nait", "random"):
        assert f"{loop[method][key]:.4f}" in printed
    assert f"NAIT's selection minus random's: {loop['nait'][key] - loop['random'][key]:+.4f}" in printed

    page = (out / "report.html").read_text()
    assert 'data-kind="experiment"' in page and "written by" in page and "mechsieve demo" in page
    assert 'data-kind="attribution"' in page  # the attribution ranking, texts from the chmod pool
    assert "template share" in page  # the IGDS feature table has its column
    assert f"{loop['nait'][key]:.4f}"[:5] in page

    folders = [str(out / name) for name in ("select-nait", "select-random", "select-igds", "mask-tokens", "loop",
                                            "attribute")]
    assert main(["report", *folders, "--out", str(tmp_path / "again.html")]) == 0
    said = capsys.readouterr()
    assert "not shown" not in said.out + said.err and "are not in" not in said.out + said.err


def test_igds_fallback_goes_on_with_keep_top_once_and_says_why():
    import numpy as np

    from mechsieve.commands.demo import igds_fallback
    from mechsieve.scorers.igds import none_kept_message

    stop = none_kept_message(np.array([0.002, -0.001]), np.array([0.005, np.nan]))
    line, settings = igds_fallback(stop, {})
    assert settings == {"keep": "top"} and "keep=top" in line
    assert "1 of 2 candidate latents improved the dev metric" in line and "Stopping" not in line
    assert igds_fallback(stop, {"keep": "top"}) is None  # keep=top cannot stop there: nothing left to try
    recall = ("igds: no SAE latent passed frequency recall on 16 probe inputs at position=mean_all (latents left "
              "after each test: frequency 40, contrast 0); lower igds.freq_threshold")
    line, settings = igds_fallback(recall, {})
    assert settings == {"reference": "none", "keep": "top"} and "contrast 0)" in line and "lower igds" not in line
    assert igds_fallback(recall, {"reference": "none", "keep": "top"}) is None
    assert igds_fallback("igds: the SAE x does not say which layer it reads; set igds.layer", {}) is None
