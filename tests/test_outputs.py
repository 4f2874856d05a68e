"""Output folders: no command deletes or replaces what it did not write.

Every command that writes a folder is run at a folder holding a user's files (refused, exit 2,
the files still there), and at a folder holding its own earlier output with those files placed
beside it (rerun, with --overwrite where the command does not resume: the files still there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from mechsieve.cli import main
from mechsieve.store.outputs import MARKER, OutputFolder, OutputFolderError

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"
PAIRS = [("Natalia sold clips to 48 of her friends in April.", "She sold 48 / 2 = 24 clips in May. #### 72"),
         ("How many clips did Natalia sell?", "The answer is 12 + 30 = 42."),
         ("Write a function to find the similar elements.", "def similar_elements(a, b):\n    return a"),
         ("Answer the question step by step.", "12 + 30 = 42. #### 42")]


@pytest.fixture
def files(tmp_path):
    rows = [{"question": q, "answer": a} for q, a in PAIRS * 2]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    pos = write_jsonl(tmp_path / "pos.jsonl", [{"question": q, "answer": a} for q, a in PAIRS[:2]])
    neg = write_jsonl(tmp_path / "neg.jsonl", [{"question": q, "answer": a} for q, a in PAIRS[2:]])
    exp = tmp_path / "exp.yaml"
    exp.write_text(json.dumps({"pool": {"path": str(pool)}, "methods": ["random"], "budget": 2, "steps": 1,
                               "eval_base": False, "train": {"lora_r": 2},
                               "eval": [{"task": "loss", "data": {"path": str(pool), "limit": 2}}]}))
    return {"pool": str(pool), "pos": str(pos), "neg": str(neg), "exp": str(exp)}


# command -> (argv without --out, whether a rerun on its own output needs --overwrite)
def commands(model: str, f: dict[str, str]) -> dict[str, tuple[list[str], bool]]:
    q = ["--quiet"]
    return {
        "select": (["select", "--method", "random", "--budget", "2", "--pool", f["pool"], *q], True),
        "capture": (["capture", "--model", model, "--pool", f["pool"], "--layers", "0", "--reductions",
                     "last_prompt", *q], False),
        "attribute": (["attribute", "--model", model, "--pool", f["pool"], "--concept", f["pos"], f["neg"],
                       "--layer", "1", "--set", "scorer.max_len=64", *q], True),
        "mask-tokens": (["mask-tokens", "--model", model, "--pool", f["pool"], "--domain", "math", "--set",
                         "xtf.tr_classes=3", "--set", "xtf.p_kn=0.5", *q], True),
        "train": (["train", "--model", model, "--data", f["pool"], "--steps", "1", "--lora-r", "2", *q], True),
        "sae": (["sae", "train", "--model", model, "--pool", f["pool"], "--layer", "1", "--d-sae", "16", "--k", "2",
                 "--set", "sae.buffer_tokens=64", "--set", "sae.batch_size=16", *q], False),
        "experiment": (["experiment", "--model", model, "--config", f["exp"], *q], False),
        "evaluate": (["evaluate", "--model", model, "--task", "loss", "--data", f["pool"], "--limit", "2", *q], True),
        "demo": (["demo", "--model", model, *q], False),
    }


def _foreign(out: Path) -> None:
    (out / "old_run").mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "old_run" / "x").write_text("x\n")


def _kept(out: Path) -> bool:
    return (out / "notes.txt").read_text() == "mine\n" and (out / "old_run" / "x").read_text() == "x\n"


@pytest.mark.parametrize("name", ["select", "capture", "attribute", "mask-tokens", "train", "sae", "experiment",
                                  "evaluate", "demo"])
def test_a_folder_of_other_files_is_refused_and_kept(name, model_dir, files, tmp_path, capsys):
    argv, _ = commands(str(model_dir), files)[name]
    out = tmp_path / "out"
    _foreign(out)
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: the folder is not empty (notes.txt, old_run/)" in err or (
        name == "experiment" and f"out {out}: the folder is not empty (notes.txt, old_run/)" in err)
    assert "pick an empty or new folder" in err and len(err.strip().splitlines()) == 1
    assert _kept(out) and sorted(p.name for p in out.iterdir()) == ["notes.txt", "old_run"]
    if name not in ("experiment", "demo"):
        assert main([*argv, "--out", str(out), "--overwrite"]) == 2  # not its output: --overwrite is no licence
        assert _kept(out) and sorted(p.name for p in out.iterdir()) == ["notes.txt", "old_run"]


@pytest.mark.parametrize("name", ["select", "capture", "attribute", "mask-tokens", "train", "sae", "experiment",
                                  "evaluate"])
def test_a_rerun_over_its_own_output_keeps_files_placed_beside_it(name, model_dir, files, tmp_path, capsys):
    argv, needs_overwrite = commands(str(model_dir), files)[name]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    marker = json.loads((out / MARKER).read_text())
    command = "sae train" if name == "sae" else name
    assert marker["command"] == command and marker["complete"] is True
    written = set(marker["files"])
    assert written and written == {p.name for p in out.iterdir()} - {MARKER}
    _foreign(out)
    capsys.readouterr()
    if needs_overwrite:
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"already holds the output of an earlier `mechsieve {command}` run; pass --overwrite" in err
        assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    else:
        assert main([*argv, "--out", str(out)]) == 0
    assert _kept(out)
    again = json.loads((out / MARKER).read_text())
    assert again["complete"] is True and set(again["files"]) == written  # the user's files are not claimed
    if name == "mask-tokens":  # the tokenized set, swapped in beside the user's files, still trains
        assert main(["train", "--model", str(model_dir), "--data", str(out), "--steps", "1", "--quiet",
                     "--out", str(tmp_path / "adapter")]) == 0


def test_a_mask_tokens_folder_keeps_foreign_files_through_save(tokenizer, tmp_path):
    """`save_tokenized` swaps the dataset's files in; it never replaces the folder."""
    import numpy as np

    from mechsieve.train import TrainItem, load_tokenized, save_tokenized

    out = tmp_path / "ds"
    _foreign(out)
    items = [TrainItem(np.arange(5), np.array([-100, -100, 2, 3, 4])) for _ in range(3)]
    save_tokenized(out, items)
    save_tokenized(out, items[:2])
    assert _kept(out) and len(load_tokenized(out)) == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_another_commands_folder_is_refused(model_dir, files, tmp_path, capsys):
    argv, _ = commands(str(model_dir), files)["capture"]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    select, _ = commands(str(model_dir), files)["select"]
    before = sorted(p.name for p in out.iterdir())
    assert main([*select, "--out", str(out), "--overwrite"]) == 2
    assert "holds the output of `mechsieve capture`, not of `mechsieve select`" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_an_interrupted_run_is_continued_without_overwrite(model_dir, files, tmp_path, monkeypatch, capsys):
    import mechsieve.select as select_module

    argv, _ = commands(str(model_dir), files)["select"]
    out = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(select_module, "write_selection", stopped)
        assert main([*argv, "--out", str(out)]) == 130
    assert json.loads((out / MARKER).read_text())["complete"] is False
    _foreign(out)
    assert main([*argv, "--out", str(out)]) == 0  # nothing finished was there to protect
    assert _kept(out) and (out / "selected.jsonl").exists()
    assert json.loads((out / MARKER).read_text())["complete"] is True


def test_the_guard_on_its_own(tmp_path):
    new = OutputFolder(tmp_path / "a" / "b", "select")
    assert not (tmp_path / "a").exists()  # checking writes nothing
    new.claim(["summary.json"])
    (tmp_path / "a" / "b" / "summary.json").write_text("{}")
    new.finish()
    assert json.loads((tmp_path / "a" / "b" / MARKER).read_text())["files"] == ["summary.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        OutputFolder(tmp_path / "file", "select")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(6):
        (many / f"f{i}").write_text("x")
    with pytest.raises(OutputFolderError, match=r"\(f0, f1, f2, f3 and 2 more\)"):
        OutputFolder(many, "select")
    # a marker's own temporary file (a kill during its write) does not make a folder foreign
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / f"{MARKER}.abc.tmp").write_text("")
    OutputFolder(empty, "select").claim()
    # a user's file under a name the command writes, beside its earlier output: refused
    guard = OutputFolder(tmp_path / "a" / "b", "select", overwrite=True)
    (tmp_path / "a" / "b" / "scores.parquet").write_text("mine")
    with pytest.raises(OutputFolderError, match="holds scores.parquet, which this command writes"):
        guard.claim(["summary.json", "scores.parquet"])
