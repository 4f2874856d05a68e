"""The experiment runner on a tiny model: two methods x two seeds, equal steps, outputs, cache."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from mechsieve.config import from_dict
from mechsieve.experiment import ExperimentConfig, equal_steps, run_experiment, summarize

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"




def _config(model_dir: Path, out: Path, **extra) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "pool": {"path": str(SAMPLES / "gsm8k_train.jsonl"), "limit": 10},
        "methods": ["random", "full"],
        "seeds": [0, 1],
        "budget": 0.5,
        "steps": 2,
        "train": {"max_tokens": 2048, "lora_r": 4, "learning_rate": 1e-2},
        "eval": [{"task": "loss", "data": {"path": str(SAMPLES / "gsm8k_target.jsonl"), "limit": 3}}],
        "out": str(out),
        **extra,
    }


def test_runner_two_methods_two_seeds_then_rerun_from_cache(model_dir, tmp_path, capsys, monkeypatch):
    cfg = from_dict(ExperimentConfig, _config(model_dir, tmp_path / "exp"))
    first = run_experiment(cfg, progress=False, log=lambda _: None)
    rows = first.rows
    assert [(r["method"], r["seed"]) for r in rows] == [("base", None), ("random", 0), ("full", 0),
                                                       ("random", 1), ("full", 1)]
    assert all(r["steps"] == 2 for r in rows[1:])  # equal training budget
    assert [r["selected"] for r in rows[1:]] == [5, 10, 5, 10]
    assert first.cache_hits == {"selection": 0, "train": 0, "eval": 0}
    key = "gsm8k_target-loss/loss_per_token"
    assert all(math.isfinite(r[key]) for r in rows)
    assert rows[2][key] != rows[0][key]  # training moved the loss
    # Random draws differ between seeds; full data is the same set, trained under another seed.
    sel = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert sel["steps"] == 2 and sel["steps_from"] == "steps"
    summary = sel["summary"]
    assert summary["full"][key]["delta_vs_full"] == 0.0
    vals = [rows[1][key], rows[3][key]]
    assert summary["random"][key]["mean"] == pytest.approx(sum(vals) / 2)
    assert summary["random"][key]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    with open(tmp_path / "exp" / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 5 and float(table[1][key]) == pytest.approx(rows[1][key])
    png = (tmp_path / "exp" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerun through the CLI: every step comes from the cache, training is never called.
    import mechsieve.train as train_module

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was retrained")

    monkeypatch.setattr(train_module, "train", no_training)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(_config(model_dir, tmp_path / "exp")))
    from mechsieve.cli import main

    assert main(["experiment", "--config", str(tmp_path / "exp.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reused from cache: 4 selection(s), 4 training run(s), 5 evaluation(s)" in out
    assert "every run trains for 2 optimizer steps" in out
    assert "±" in out and "random" in out and "results.png" in out
    again = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [r[key] for r in again["rows"]] == [r[key] for r in rows]


def test_equal_steps_from_epochs_over_the_budget(model_dir, tmp_path):
    cfg = from_dict(ExperimentConfig, _config(model_dir, tmp_path, steps=0,
                                              train={"epochs": 2, "max_tokens": 100, "max_batch": 2}))
    lengths = [50, 50, 40, 40, 30, 30, 20, 20, 10, 10]
    # max_batch=2 and 2 x 50 <= 100: 5 micro-batches for 10 examples -> 0.5 per example;
    # budget 0.5 -> 5 examples, 2 epochs -> ceil(2 * 5 * 0.5) = 5 steps.
    steps, why = equal_steps(cfg, lengths)
    assert steps == 5 and "5 examples" in why
    cfg = from_dict(ExperimentConfig, _config(model_dir, tmp_path, steps=0, train={"max_steps": 7}))
    assert equal_steps(cfg, lengths) == (7, "train.max_steps")


def test_summary_delta_and_config_errors(model_dir, tmp_path):
    rows = [{"method": "full", "seed": 0, "t/loss_per_token": 2.0}, {"method": "full", "seed": 1, "t/loss_per_token": 4.0},
            {"method": "nait", "seed": 0, "t/loss_per_token": 1.0}]
    s = summarize(rows)
    assert s["full"]["t/loss_per_token"] == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)), "n": 2,
                                             "delta_vs_full": 0.0}
    assert s["nait"]["t/loss_per_token"]["delta_vs_full"] == -2.0
    from mechsieve.config import ConfigError

    with pytest.raises(ConfigError, match="eval is empty"):
        from_dict(ExperimentConfig, {**_config(model_dir, tmp_path), "eval": []})
    with pytest.raises(ConfigError, match="twice"):
        from_dict(ExperimentConfig, {**_config(model_dir, tmp_path), "methods": ["random", "random"]})


def test_an_edited_eval_file_is_evaluated_again(model_dir, tmp_path):
    """The eval cache is keyed by the eval data's content: edit the file, and the rerun evaluates
    it (selections and training still come from the cache)."""
    rows = [json.loads(line) for line in (SAMPLES / "gsm8k_target.jsonl").read_text().splitlines()[:3]]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(ExperimentConfig, _config(model_dir, tmp_path / "exp", methods=["random"], seeds=[0], steps=1,
                                              eval=[{"task": "loss", "name": "ev", "data": {"path": str(eval_file)}}]))
    first = run_experiment(cfg, progress=False, log=lambda _: None)
    assert first.cache_hits == {"selection": 0, "train": 0, "eval": 0}
    same = run_experiment(cfg, progress=False, log=lambda _: None)
    assert same.cache_hits == {"selection": 1, "train": 1, "eval": 2}
    rows[0]["answer"] = "Something else entirely, then #### 7"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = run_experiment(cfg, progress=False, log=lambda _: None)
    assert edited.cache_hits == {"selection": 1, "train": 1, "eval": 0}
    key = "ev/loss_per_token"
    assert [r[key] for r in edited.rows] != [r[key] for r in first.rows]
    assert [r[key] for r in same.rows] == [r[key] for r in first.rows]


def test_runner_scores_the_forward_only_methods_of_a_seed_in_one_shared_pass(model_dir, tmp_path, monkeypatch):
    """loss and ifd (y|x is the loss feature) and rds share seed 0's pass; seed 1 reads the cached
    features and runs no pool pass at all; the selections are those select_examples makes."""
    import mechsieve.capture.shared as shared
    from mechsieve.data.readers import read_pool
    from mechsieve.models.loading import load_model
    from mechsieve.select import select_examples

    passes = []
    real = shared.run_forward
    monkeypatch.setattr(shared, "run_forward", lambda *a, **k: passes.append(1) or real(*a, **k))
    target = {"path": str(SAMPLES / "gsm8k_target.jsonl"), "limit": 4}
    cfg = from_dict(ExperimentConfig, _config(model_dir, tmp_path / "exp", methods=["loss", "ifd", "rds", "random"],
                                              target=target, eval_base=False, steps=1))
    result = run_experiment(cfg, progress=False, log=lambda _: None)
    # seed 0: the example pass (loss, ifd's y|x, rds's pool states) and ifd's response-alone pass;
    # plus rds's target pass in its prepare, each seed; seed 1: no pool pass
    assert len(passes) == 2 + 1 + 1
    features = list((tmp_path / "exp" / "cache" / "features").iterdir())
    assert len(features) == 3  # response loss of y|x, of y alone, pooled states
    loaded = load_model(str(model_dir))
    pool = read_pool(from_dict(type(cfg.pool), {**_config(model_dir, tmp_path)["pool"]}))
    for method in ("loss", "ifd", "rds"):
        alone = select_examples(method, pool, 0.5, target=read_pool(from_dict(type(cfg.pool), target)),
                                loaded=loaded, progress=False)
        picked = [r["selected"] for r in result.rows if r["method"] == method]
        assert picked == [len(alone.ids)] * 2
