"""`mechsieve demo` end to end on a tiny model (20 blocks: the demo captures blocks 0, 9, 19, -1)."""

import json

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
    steps = [line.split("]")[0] + "]" for line in printed.splitlines() if line.startswith("[")]
    assert steps == [f"[{i}]" for i in range(1, 8)]
    assert (out / "report.html").exists() and str(out / "report.html") in printed

    # the mixed pool is one file (96 bundled samples: GSM8K, MedQA, MBPP), recorded by every run,
    # so the report command finds every text from the run folders alone
    rows = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and {r["source"] for r in rows} == {"gsm8k_train", "medqa", "mbpp"}
    summary = json.loads((out / "select-nait" / "summary.json").read_text())
    assert summary["pool"]["path"] == str(out / "pool.jsonl") and summary["pool"]["examples"] == 96
    folders = [str(out / name) for name in ("select-nait", "select-random", "select-igds", "mask-tokens")]
    assert main(["report", *folders, "--out", str(tmp_path / "again.html")]) == 0
    said = capsys.readouterr()
    assert "not shown" not in said.out + said.err and "are not in" not in said.out + said.err
