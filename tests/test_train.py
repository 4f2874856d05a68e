"""Training honours token masks: labels, collation, the loss and its gradient, adapters, files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mechsieve.data import read_pool, render_example
from mechsieve.models.loading import LoadedModel
from mechsieve.train import (
    IGNORE,
    TrainConfig,
    TrainItem,
    collate_items,
    items_from_examples,
    load_adapter,
    load_tokenized,
    masked_nll_sum,
    save_tokenized,
    train,
)
from mechsieve.train.loop import batch_nll_sum, lr_lambda, micro_batches

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"




def _loaded(make_model, tokenizer, arch="llama") -> LoadedModel:
    # The fixture's models are shared by the session: train on a copy.
    return LoadedModel(copy.deepcopy(make_model(arch)), tokenizer, {"kind": "test", "arch": arch})


def _items(tokenizer, n=6):
    pool = read_pool(SAMPLES / "gsm8k_train.jsonl", limit=n)
    return pool, items_from_examples(pool.examples, tokenizer)


def test_items_carry_the_response_mask(tokenizer):
    pool, items = _items(tokenizer, 3)
    for ex, it in zip(pool.examples, items):
        r = render_example(ex, tokenizer)
        np.testing.assert_array_equal(it.input_ids, r.input_ids)
        np.testing.assert_array_equal(it.labels, np.where(r.response_mask, r.input_ids, -100))
        assert (it.labels[: r.prompt_len] == IGNORE).all() and (it.labels != IGNORE).any()


def test_collation_and_batch_plan_keep_every_mask():
    rng = np.random.default_rng(0)
    items = []
    for _ in range(23):
        n = int(rng.integers(3, 40))
        ids = rng.integers(5, 400, size=n)
        labels = np.where(rng.random(n) < 0.6, ids, IGNORE)  # masks anywhere, not only a prefix
        labels[1] = ids[1]  # at least one target
        items.append(TrainItem(ids, labels))
    cfg = TrainConfig(max_tokens=120, max_batch=5, seed=3)
    stream = micro_batches(items, cfg)
    seen = []
    while True:
        epoch, idx = next(stream)
        if epoch > 0:
            break
        batch = collate_items(items, idx, pad_id=3)
        assert batch.input_ids.shape[0] * batch.input_ids.shape[1] <= max(120, batch.input_ids.shape[1])
        for row, i in enumerate(idx):
            n = len(items[i])
            np.testing.assert_array_equal(batch.labels[row, :n].numpy(), items[i].labels)
            np.testing.assert_array_equal(batch.input_ids[row, :n].numpy(), items[i].input_ids)
            assert (batch.labels[row, n:] == IGNORE).all() and (batch.attention_mask[row, n:] == 0).all()
        seen += idx
    assert sorted(seen) == list(range(23))  # one epoch = every item exactly once


def test_masked_loss_equals_hand_computed_mean(make_model, tokenizer):
    model = make_model("llama")
    rng = np.random.default_rng(1)
    items = []
    for n in (9, 14, 6):
        ids = rng.integers(6, 300, size=n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE
        labels[n // 2] = IGNORE  # a masked token inside the response
        items.append(TrainItem(ids, labels))
    batch = collate_items(items, [0, 1, 2], pad_id=3)
    with torch.no_grad():
        total, count = batch_nll_sum(model, batch)
    # By hand: each sequence alone, -log softmax at every kept position, one mean over all tokens.
    nll, kept = 0.0, 0
    for it in items:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(it.input_ids)[None]).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in range(1, len(it)):
            if it.labels[t] != IGNORE:
                nll -= float(logp[t - 1, it.labels[t]])
                kept += 1
    assert count == kept == sum(it.n_targets for it in items)
    assert float(total) / count == pytest.approx(nll / kept, rel=1e-5)


def test_masked_tokens_contribute_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = IGNORE
    labels[1, 4] = IGNORE
    total, n = masked_nll_sum(logits, labels)
    (total / n).backward()
    grad = logits.grad
    masked_next = labels[:, 1:] == IGNORE  # logits at t predict labels[t + 1]
    assert (grad[:, :-1][masked_next] == 0).all()
    assert (grad[:, -1] == 0).all()  # the last position predicts nothing
    assert (grad[:, :-1][~masked_next].abs().sum(-1) > 0).all()
    # The gradient equals that of the hand-written mean over kept positions only.
    ref = logits.detach().clone().requires_grad_(True)
    terms = [-torch.log_softmax(ref[b, t - 1], -1)[labels[b, t]] for b in range(2) for t in range(1, 7)
             if labels[b, t] != IGNORE]
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(grad, ref.grad, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_weights_tokens_like_one_big_batch(make_model, tokenizer):
    _, items = _items(tokenizer, 4)
    one = train(_loaded(make_model, tokenizer), items,
                TrainConfig(max_steps=1, max_tokens=100_000, lora_dropout=0.0), progress=False)
    two = train(_loaded(make_model, tokenizer), items,
                TrainConfig(max_steps=1, max_tokens=100_000, max_batch=2, grad_accum=2, lora_dropout=0.0),
                progress=False)
    assert one.tokens == two.tokens == sum(it.n_targets for it in items)
    assert one.loss_curve[0] == pytest.approx(two.loss_curve[0], rel=1e-5)


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
])
def test_lora_all_linear_trains_and_reloads_to_identical_logits(make_model, tokenizer, tmp_path, arch, expected):
    _, items = _items(tokenizer, 6)
    loaded = _loaded(make_model, tokenizer, arch)
    cfg = TrainConfig(max_steps=6, learning_rate=2e-2, max_tokens=4096, lora_r=4, lora_alpha=8)
    res = train(loaded, items, cfg, out_dir=tmp_path / "adapter", progress=False)
    assert set(loaded.model.peft_config["default"].target_modules) == expected
    assert not any("lm_head" in n for n, _ in loaded.model.named_modules() if "lora_A" in n)
    assert res.steps == 6 and len(res.loss_curve) == 6
    assert res.loss_curve[-1] < res.loss_curve[0] - 0.05
    saved = json.loads((tmp_path / "adapter" / "train.json").read_text())
    assert saved["loss_curve"] == res.loss_curve and saved["settings"]["train"]["lora_r"] == 4
    ids = torch.tensor(items[0].input_ids)[None]
    with torch.no_grad():
        trained = loaded.model(input_ids=ids).logits
        base = make_model(arch)(input_ids=ids).logits
    fresh = load_adapter(_loaded(make_model, tokenizer, arch), tmp_path / "adapter")
    with torch.no_grad():
        reloaded = fresh.model(input_ids=ids).logits
    assert torch.equal(trained, reloaded)
    assert (trained - base).abs().max() > 1e-3  # the adapter changed something


def test_full_finetune_saves_and_reloads(make_model, tokenizer, tmp_path):
    _, items = _items(tokenizer, 3)
    loaded = _loaded(make_model, tokenizer)
    res = train(loaded, items, TrainConfig(max_steps=2, full_finetune=True, learning_rate=1e-3),
                out_dir=tmp_path / "full", progress=False)
    assert res.settings["trainable_parameters"] == res.settings["parameters"]
    ids = torch.tensor(items[0].input_ids)[None]
    fresh = load_adapter(_loaded(make_model, tokenizer), tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)


def test_learning_rate_schedules():
    cos = lr_lambda(TrainConfig(schedule="cosine", warmup_steps=2), total_steps=10)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == 1.0 and cos(6) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    lin = lr_lambda(TrainConfig(schedule="linear"), total_steps=4)
    assert [lin(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_lambda(TrainConfig(schedule="constant"), 5)(4) == 1.0
    assert math.isclose(lr_lambda(TrainConfig(), 8)(2), 0.5 * (1 + math.cos(math.pi * 2 / 8)))


@pytest.mark.parametrize("kind", ["disk", "parquet", "jsonl"])
def test_tokenized_files_round_trip(tmp_path, kind):
    items = [TrainItem([1, 5, 6, 7], [-100, -100, 6, 7]), TrainItem([1, 9, 8], [-100, 9, -100])]
    if kind == "disk":
        path = save_tokenized(tmp_path / "tok", items, extra={"id": ["a", "b"]})
    else:
        import pandas as pd

        frame = pd.DataFrame({"input_ids": [it.input_ids.tolist() for it in items],
                              "labels": [it.labels.tolist() for it in items]})
        path = tmp_path / f"tok.{kind}"
        frame.to_parquet(path) if kind == "parquet" else frame.to_json(path, orient="records", lines=True)
    back = load_tokenized(path)
    assert len(back) == 2
    for a, b in zip(items, back):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_tokenized_missing_column_is_named(tmp_path):
    from mechsieve.data.readers import DataError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2]}) + "\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['labels'\]"):
        load_tokenized(path)


def test_cli_train_on_masked_tokenized_folder(model_dir, tokenizer, tmp_path, capsys):
    from mechsieve.cli import main

    _, items = _items(tokenizer, 4)
    # A token masker's output: some response tokens set to -100 as well.
    masked = [TrainItem(it.input_ids, np.where(np.arange(len(it)) % 3 == 0, IGNORE, it.labels)) for it in items]
    save_tokenized(tmp_path / "masked", masked)
    code = main(["train", "--model", str(model_dir), "--data", str(tmp_path / "masked"), "--steps", "2",
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0
    info = json.loads((tmp_path / "run" / "train.json").read_text())
    assert len(info["loss_curve"]) == 2
    assert info["tokens"] == 2 * sum(it.n_targets for it in masked)  # 1 micro-batch per step, all items
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    out = capsys.readouterr().out
    assert "tokenized items" in out and "outputs:" in out
    # The adapter evaluates through the CLI, and gives another loss than the base model.
    losses = []
    for extra in ([], ["--adapter", str(tmp_path / "run")]):
        code = main(["evaluate", "--model", str(model_dir), *extra, "--task", "loss", "--data",
                     str(SAMPLES / "gsm8k_target.jsonl"), "--limit", "2", "--out", str(tmp_path / f"ev{len(losses)}"),
                     "--quiet"])
        assert code == 0
        metrics = json.loads((tmp_path / f"ev{len(losses)}" / "metrics.json").read_text())["results"][0]["metrics"]
        losses.append(metrics["loss_per_token"])
    assert losses[0] != losses[1] and all(math.isfinite(v) for v in losses)


def test_cli_train_on_a_pool(model_dir, tmp_path):
    from mechsieve.cli import main

    code = main(["train", "--model", str(model_dir), "--data", str(SAMPLES / "gsm8k_train.jsonl"), "--limit", "3",
                 "--steps", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0 and (tmp_path / "run" / "train.json").exists()


def test_steps_per_epoch_divides_by_the_processes():
    from mechsieve.train.loop import steps_per_epoch

    items = [TrainItem(np.arange(4), np.arange(4)) for _ in range(7)]
    cfg = TrainConfig(max_batch=1)
    assert steps_per_epoch(items, cfg) == 7
    assert steps_per_epoch(items, cfg, world=2) == 4  # rank 0 takes buckets 0, 2, 4, 6
    assert steps_per_epoch(items, TrainConfig(max_batch=1, grad_accum=2), world=2) == 2


def test_two_processes_train_one_epoch_once_and_only_the_main_one_prints(model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): epochs=1 covers the data once between them (half the
    optimizer steps of one process, the same label tokens), and only rank 0 prints."""
    import os
    import shutil
    import subprocess
    import sys

    from mechsieve.cli import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}."})
                            + "\n" for i in range(8)))
    common = ["train", "--model", str(model_dir), "--data", str(pool), "--epochs", "1",
              "--set", "train.max_batch=1", "--set", "train.lora_r=2"]
    assert main([*common, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    one = json.loads((tmp_path / "one" / "train.json").read_text())
    assert one["steps"] == 8

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mechsieve", *common,
                           "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train.json").read_text())
    assert two["settings"]["processes"] == 2
    assert two["steps"] == one["steps"] // 2 == two["settings"]["steps_per_epoch"]
    assert two["tokens"] == one["tokens"]  # every label token once, as in the one-process epoch
    assert two["settings"]["epochs_seen"] == 1.0
    assert proc.stdout.count("read 8 examples") == 1
    assert proc.stdout.count("LoRA r=2: 4 steps") == 1
    assert proc.stdout.count("outputs:") == 1
    assert proc.stderr.count("train:   0%") == 1, proc.stderr[-3000:]  # one progress bar
