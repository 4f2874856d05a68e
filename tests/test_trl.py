"""TRL both ways: mask-tokens' Parquet copy trains in TRL (its `trl sft` script and SFTTrainer) with
the masks intact, and `mechsieve train` reads TRL-style tokenized data (completion_mask, no labels)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_model


@pytest.fixture(autouse=True)
def _no_state_left_behind():
    """TRL's Trainer initialises accelerate's process-wide AcceleratorState (bf16 by SFTConfig's
    default); a later `Accelerator()` in another test would inherit it. Reset it, and the environment."""
    environ = dict(os.environ)
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def masked(tmp_path_factory, model_dir) -> Path:
    """One `mechsieve mask-tokens` run of 6 short examples on the tiny Llama."""
    from mechsieve.cli import main

    tmp = tmp_path_factory.mktemp("trl")
    base = [("Natalia sold clips to 48 of her friends in April.", "She sold 48 / 2 = 24 clips in May. #### 72"),
            ("How many clips did Natalia sell?", "Once upon a time there was a little dog. The answer is 42."),
            ("Write a function to find the similar elements.", "def similar_elements(a, b):\n    return a"),
            ("The patient presents with fever and cough.", "The most likely diagnosis is a red ball."),
            ("Answer the question step by step.", "12 + 30 = 42. #### 42"),
            ("Natalia sold half as many clips in May.", "How many clips did Natalia sell altogether? 72")]
    pool = tmp / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in base))
    out = tmp / "masked"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHSIEVE_CACHE", str(tmp / "cache"))
        code = main(["mask-tokens", "--pool", str(pool), "--model", str(model_dir), "--domain", "math",
                     "--out", str(out), "--quiet", "--set", "xtf.p_kn=0.5", "--set", "xtf.tr_classes=3"])
    assert code == 0
    return out


def _rows(ds, columns=("id", "input_ids", "labels", "completion_mask", "mask_reason")) -> list[dict]:
    return [{c: row[c] for c in columns} for row in ds]


def test_mask_tokens_writes_parquet_that_load_dataset_reads(masked):
    import datasets

    saved = datasets.load_from_disk(str(masked))
    assert json.loads((masked / "summary.json").read_text())["masked_tokens"]["union"] > 0
    by_file = datasets.load_dataset("parquet", data_files=str(masked / "parquet" / "train.parquet"))["train"]
    by_folder = datasets.load_dataset(str(masked / "parquet"))  # what `trl sft --dataset_name` calls
    assert list(by_folder) == ["train"]
    assert by_file.column_names == saved.column_names
    assert _rows(by_file) == _rows(saved) == _rows(by_folder["train"])
    # the scores (NaN where not scored) come through too
    np.testing.assert_array_equal(np.concatenate(by_file["ri"]), np.concatenate(saved["ri"]))
    # why the copy lives in its own folder: datasets refuses a save_to_disk folder
    with pytest.raises(ValueError, match="save_to_disk"):
        datasets.load_dataset(str(masked))
    marker = json.loads((masked / ".mechsieve.json").read_text())
    assert "parquet" in marker["files"]


def test_trl_sft_script_trains_on_the_parquet_folder(masked, model_dir, tmp_path):
    """`trl sft --dataset_name DIR/parquet --model_name_or_path MODEL ...`, run in process."""
    from safetensors.torch import load_file
    from trl.scripts.sft import main, make_parser

    out = tmp_path / "sft"
    args = make_parser().parse_args_and_config(
        args=["--dataset_name", str(masked / "parquet"), "--model_name_or_path", str(model_dir),
              "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "6",
              "--learning_rate", "0.01", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
              "--dtype", "float32", "--bf16", "false", "--disable_tqdm", "true"],
        fail_with_unknown_args=True)
    main(*args)
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) <= set(before)
    assert any(not torch.equal(before[k], after[k]) for k in after)  # one optimizer step moved weights


def _masked_nll(model, rows) -> float:
    """Mean next-token NLL over the label tokens (labels != -100), the items unpadded one by one."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            keep = labels[1:] != -100
            total -= float(logp[torch.arange(len(labels) - 1)[keep], labels[1:][keep]].sum())
            count += int(keep.sum())
    return total / count


def test_sft_trainer_trains_on_mechsieve_labels_as_they_are(masked, tokenizer, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    ds = datasets.load_dataset("parquet", data_files=str(masked / "parquet" / "train.parquet"))["train"]
    model = build_model("llama", len(tokenizer))
    masked_loss = _masked_nll(model, ds)
    all_tokens = _masked_nll(model, [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in ds])
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=len(ds),
                    learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, bf16=False, logging_steps=1,
                    disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer)
    prepared = trainer.train_dataset
    assert prepared["labels"] == ds["labels"]  # TRL keeps the labels column: the masks are ours
    batch = trainer.data_collator([prepared[i] for i in range(2)])
    n = len(ds[0]["labels"])
    assert batch["labels"][0, :n].tolist() == ds[0]["labels"]
    assert (batch["labels"][0, n:] == -100).all() and (batch["labels"][1, len(ds[1]["labels"]):] == -100).all()
    trainer.train()
    assert trainer.state.global_step == 1
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(masked_loss, rel=1e-4)  # the loss of the step before it moved weights
    assert abs(masked_loss - all_tokens) > 1e-3  # so the masks made a difference TRL saw


def test_parquet_copy_can_be_switched_off(masked, model_dir, tmp_path, capsys):
    from mechsieve.cli import main

    out = tmp_path / "masked"
    shutil.copytree(masked, out)
    pool = masked.parent / "pool.jsonl"
    assert main(["mask-tokens", "--pool", str(pool), "--model", str(model_dir), "--domain", "math", "--out",
                 str(out), "--quiet", "--overwrite", "--set", "parquet=false", "--set", "xtf.p_kn=0.5",
                 "--set", "xtf.tr_classes=3"]) == 0
    assert not (out / "parquet" / "train.parquet").exists()  # the earlier run's copy is not left stale
    assert (out / "state.json").exists() and "train.parquet" not in capsys.readouterr().out


TRL_ROWS = [  # TRL's tokenized layout: no labels, completion_mask 1 on the completion
    {"input_ids": [1, 5, 6, 7, 8], "completion_mask": [0, 0, 1, 1, 1], "attention_mask": [1, 1, 1, 1, 0]},
    {"input_ids": [1, 9, 10], "completion_mask": [0, 1, 1]},
]
TRL_LABELS = [[-100, -100, 6, 7, -100], [-100, 9, 10]]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
def test_train_reads_trl_style_completion_mask(tmp_path, kind):
    import datasets

    from mechsieve.train import is_tokenized, load_tokenized

    rows = [dict(r) for r in TRL_ROWS]
    if kind == "jsonl":
        path = tmp_path / "trl.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        for r in rows:
            r.setdefault("attention_mask", [1] * len(r["input_ids"]))
        ds = datasets.Dataset.from_list(rows)
        path = tmp_path / ("trl.parquet" if kind == "parquet" else "trl")
        ds.to_parquet(str(path)) if kind == "parquet" else ds.save_to_disk(str(path))
    assert is_tokenized(path)
    items = load_tokenized(path)
    assert [it.labels.tolist() for it in items] == TRL_LABELS
    assert [it.input_ids.tolist() for it in items] == [r["input_ids"] for r in TRL_ROWS]


def test_trl_style_rows_that_do_not_line_up_are_named(tmp_path):
    from mechsieve.data.readers import DataError
    from mechsieve.train import is_tokenized, load_tokenized

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2, 3], "completion_mask": [0, 1]}) + "\n")
    with pytest.raises(DataError, match=rf"{path}: row 0 has 3 input_ids but 2 completion_mask"):
        load_tokenized(path)
    path.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    assert not is_tokenized(path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['labels'\].*completion_mask"):
        load_tokenized(path)


def test_cli_train_on_trl_style_parquet(model_dir, tokenizer, tmp_path, capsys):
    import datasets

    from mechsieve.cli import main

    ids = [tokenizer("The answer is 12 + 30 = 42.")["input_ids"], tokenizer("#### 72")["input_ids"]]
    masks = [[0] * 3 + [1] * (len(ids[0]) - 3), [0] + [1] * (len(ids[1]) - 1)]
    path = tmp_path / "trl.parquet"
    datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks}).to_parquet(str(path))
    out = tmp_path / "adapter"
    assert main(["train", "--data", str(path), "--model", str(model_dir), "--steps", "1", "--quiet",
                 "--out", str(out)]) == 0
    log = json.loads((out / "train.json").read_text())
    # label tokens: the completion tokens after the first position (which predicts nothing)
    assert log["tokens"] == sum(m[1:].count(1) for m in masks)
    assert "tokenized items" in capsys.readouterr().out
    assert math.isfinite(log["loss_curve"][0])
