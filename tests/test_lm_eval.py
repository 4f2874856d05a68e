"""The lm-eval bridge and adapters that name their base model.

`mechsieve evaluate --lm-eval` scores a local multiple-choice task (a YAML written here over a
JSONL file) with lm-eval's HFLM around the model mechsieve loaded: the accuracy it reports is
checked against the choices' log-likelihoods from a direct forward pass, with the labels chosen
so that the expected accuracy is a known fraction. Adapters record their base model so that
lm-eval's own `--model hf --model_args pretrained=BASE,peft=ADAPTER` and peft's
AutoPeftModelForCausalLM load the pair from any folder. The lm-eval tests skip without the
`eval` extra (the Makefile's test install includes it).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_model
from mechsieve.config import ConfigError
from mechsieve.models.loading import LoadedModel

pytestmark = pytest.mark.timeout(300)
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'mechsieve[eval]')")
SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = [
    ("Natalia sold clips", ["to her friends", "in May", "def similar"]),
    ("Once upon a time", ["there was a dog", "the patient", "72"]),
    ("Write a function", ["to find the elements", "the answer", "ball"]),
    ("The patient presents with", ["fever and cough", "a little dog", "tuple lists"]),
    ("How many clips did", ["Natalia sell", "the park play", "42"]),
    ("You are a helpful", ["assistant", "red ball", "return tuple"]),
]


def choice_logliks(model, tokenizer) -> list[list[float]]:
    """log p(" " + choice | question) of every choice, by one forward pass over question + choice:
    the question tokenized alone, the choice as the tokens that follow it in the whole text
    (lm-eval's definition for causal models, written out)."""
    out = []
    with torch.no_grad():
        for question, choices in QUESTIONS:
            ctx = tokenizer(question)["input_ids"]
            row = []
            for choice in choices:
                whole = tokenizer(f"{question} {choice}")["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                row.append(float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole)))))
            out.append(row)
    return out


def normalised_best(lls: list[list[float]]) -> list[int]:
    """The choice of highest log-likelihood per character of each question (lm-eval's acc_norm)."""
    return [int(np.argmax(np.array(row) / [len(c) for c in QUESTIONS[i][1]])) for i, row in enumerate(lls)]


def labels_for(lls: list[list[float]], n_right: int) -> list[int]:
    """Gold labels: the model's choice for the first `n_right` questions; after them a choice that
    is neither the model's nor its length-normalised one."""
    best, norm = [int(np.argmax(row)) for row in lls], normalised_best(lls)
    return [b if i < n_right else next(k for k in range(3) if k not in (b, nb))
            for i, (b, nb) in enumerate(zip(best, norm))]


def write_task(folder: Path, labels: list[int], name: str = "tiny_mc") -> Path:
    """A multiple-choice lm-eval task over a local JSONL file (acc and acc_norm)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n"
                            for (q, c), y in zip(QUESTIONS, labels)))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def mean_stderr(hits: list[float]) -> float:
    return float(np.std(hits, ddof=1) / np.sqrt(len(hits)))


def sample_logliks(samples: list[dict]) -> list[list[float]]:
    rows = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in rows]


@needs_lm_eval
def test_lm_eval_scores_the_loaded_model_as_a_direct_forward_does(tokenizer, tmp_path):
    from mechsieve.evaluate.lm_eval_bridge import LmEvalConfig, run_lm_eval, summary_lines

    model = build_model("llama", len(tokenizer), seed=1)
    lls = choice_logliks(model, tokenizer)
    labels = labels_for(lls, n_right=4)
    tasks = write_task(tmp_path / "tasks", labels)
    norm = [int(b == y) for b, y in zip(normalised_best(lls), labels)]
    assert np.mean(norm) != 4 / 6  # so acc_norm is checked apart from acc
    loaded = LoadedModel(model, tokenizer, {"kind": "test"})

    torch.manual_seed(7)
    before = torch.get_rng_state()
    run = run_lm_eval(loaded, LmEvalConfig(tasks=["tiny_mc"], include=str(tasks), log_samples=True), progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # lm-eval's seeding is undone
    res = run.results["results"]["tiny_mc"]
    assert res["acc,none"] == pytest.approx(4 / 6, abs=1e-12)
    assert res["acc_stderr,none"] == pytest.approx(mean_stderr([1, 1, 1, 1, 0, 0]), abs=1e-9)
    assert res["acc_norm,none"] == pytest.approx(np.mean(norm), abs=1e-12)
    assert run.results["n-samples"]["tiny_mc"]["effective"] == 6 and run.results["n-shot"]["tiny_mc"] == 0
    np.testing.assert_allclose(sample_logliks(run.samples), lls, atol=1e-4)
    assert {s["task"] for s in run.samples} == {"tiny_mc"} and len(run.samples) == 6
    json.dumps(run.results)  # JSON as it is, no default= needed
    assert summary_lines(run.results) == [
        f"lm-eval tiny_mc: acc=0.6667 ± {mean_stderr([1, 1, 1, 1, 0, 0]):.4f}, "
        f"acc_norm={np.mean(norm):.4f} ± {mean_stderr(norm):.4f}  [6 docs, 0-shot]"]


def test_a_missing_lm_eval_fails_at_construction_with_the_install_command(monkeypatch, capsys, tmp_path):
    from mechsieve.cli import main
    from mechsieve.evaluate.lm_eval_bridge import LmEvalConfig

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mechsieve\[eval\]'"):
        LmEvalConfig(tasks=["arc_easy"])
    LmEvalConfig()  # no tasks: nothing needed
    # The command stops before it loads any model (this name is none).
    code = main(["evaluate", "--model", str(tmp_path / "no-model"), "--lm-eval", "arc_easy",
                 "--out", str(tmp_path / "ev"), "--quiet"])
    assert code == 2 and "pip install 'mechsieve[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_lm_eval_settings_are_checked(tmp_path):
    from mechsieve.evaluate.lm_eval_bridge import LmEvalConfig

    with pytest.raises(ConfigError, match="lm_eval.include"):
        LmEvalConfig(include=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="lm_eval.num_fewshot"):
        LmEvalConfig(num_fewshot=-1)
    with pytest.raises(ConfigError, match="lm_eval.batch_size"):
        LmEvalConfig(batch_size=0)


def test_base_model_records_name_what_other_tools_load():
    from mechsieve.train.adapter_meta import base_model_record

    alias = base_model_record({"kind": "alias", "name": "smollm2-135m-instruct", "hash": "ab12"}, "/c/models/x")
    assert alias.base_model_name_or_path == HUB_ID and alias.alias == "smollm2-135m-instruct"
    assert "Q4_1" in alias.note and alias.local_path == "/c/models/x" and alias.hash == "ab12"
    assert alias.lm_eval_model_args == f"pretrained={HUB_ID},peft=ADAPTER"
    folder = base_model_record({"kind": "folder", "path": "rel/model", "hash": "cd34"})
    assert folder.base_model_name_or_path == str(Path("rel/model").resolve()) and folder.kind == "folder"
    hub = base_model_record({"kind": "hub", "id": "org/model", "revision": "9f3e"})
    assert hub.lm_eval_model_args == "pretrained=org/model,revision=9f3e,peft=ADAPTER" and hub.revision == "9f3e"
    unknown = base_model_record({"kind": "test"})
    assert unknown.base_model_name_or_path is None and unknown.lm_eval_model_args is None


def _train_cli(model: str, out: Path, steps: int = 3) -> None:
    from mechsieve.cli import main

    code = main(["train", "--model", model, "--data", str(SAMPLES / "gsm8k_train.jsonl"), "--limit", "3",
                 "--steps", str(steps), "--lr", "0.05", "--out", str(out), "--quiet"])
    assert code == 0


def test_a_trained_adapter_loads_from_any_folder_by_its_recorded_base(model_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from mechsieve.models.loading import load_model
    from mechsieve.train import load_adapter

    monkeypatch.chdir(model_dir.parent)
    _train_cli(model_dir.name, tmp_path / "adapter")  # the model named by a relative path
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    meta = json.loads((tmp_path / "adapter" / "mechsieve_base.json").read_text())
    assert meta["kind"] == "folder" and meta["lm_eval_model_args"] == f"pretrained={model_dir.resolve()},peft=ADAPTER"
    assert "mechsieve_base.json" in json.loads((tmp_path / "adapter" / ".mechsieve.json").read_text())["files"]

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    ours = load_adapter(load_model(str(model_dir)), tmp_path / "adapter").model
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits)


def test_the_alias_records_its_hub_id_and_the_dequantisation(model_dir, tmp_path):
    from mechsieve.data import DataConfig, read_pool
    from mechsieve.data.render import RenderConfig
    from mechsieve.models.loading import load_model
    from mechsieve.train import TrainConfig, items_from_examples, train
    from mechsieve.train.adapter_meta import read_base_model
    from mechsieve.train.lora import save_trained, wrap_for_training

    # The alias's converted folder, as models/loading.py leaves it (SOURCE.json beside the weights).
    fake = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    shutil.copytree(model_dir, fake)
    (fake / "SOURCE.json").write_text(json.dumps({"alias": "smollm2-135m-instruct", "note": "dequantised from Q4_1"}))
    loaded = load_model(str(fake))
    pool = read_pool(DataConfig(path=str(SAMPLES / "gsm8k_train.jsonl"), limit=2))
    items = items_from_examples(pool.examples, loaded.tokenizer, RenderConfig())
    train(loaded, items, TrainConfig(max_steps=1), out_dir=tmp_path / "adapter", progress=False)  # no identity given
    rec = read_base_model(tmp_path / "adapter")
    assert rec.base_model_name_or_path == HUB_ID and rec.alias == "smollm2-135m-instruct" and "Q4_1" in rec.note
    assert rec.local_path == str(fake.resolve())
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID

    # Given the LoadedModel's identity, it is used as it is (its hash included).
    lora = wrap_for_training(load_model(str(fake)).model, TrainConfig())
    save_trained(lora, loaded.tokenizer, tmp_path / "given", full=False,
                 identity={"kind": "alias", "name": "smollm2-135m-instruct", "hash": "ab12"})
    rec = read_base_model(tmp_path / "given")
    assert rec.base_model_name_or_path == HUB_ID and rec.hash == "ab12" and rec.local_path == str(fake.resolve())


@needs_lm_eval
def test_evaluate_runs_lm_eval_on_base_plus_adapter(model_dir, tmp_path, monkeypatch, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mechsieve.cli import main
    from mechsieve.models.loading import load_model
    from mechsieve.train import load_adapter

    adapter = tmp_path / "adapter"
    _train_cli(str(model_dir), adapter)
    base_lls = choice_logliks(load_model(str(model_dir)).model, load_model(str(model_dir)).tokenizer)
    adapted = load_adapter(load_model(str(model_dir)), adapter)
    lls = choice_logliks(adapted.model, adapted.tokenizer)
    assert np.abs(np.array(lls) - np.array(base_lls)).max() > 1e-2  # the check below tells them apart
    tasks = write_task(tmp_path / "tasks", labels_for(lls, n_right=4))
    out = tmp_path / "ev"
    capsys.readouterr()
    code = main(["evaluate", "--model", str(model_dir), "--adapter", str(adapter), "--lm-eval", "tiny_mc",
                 "--lm-eval-include", str(tasks), "--lm-eval-limit", "5", "--lm-eval-fewshot", "0",
                 "--out", str(out), "--quiet", "--set", "lm_eval.log_samples=true"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "lm_eval.json").read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(4 / 5, abs=1e-12)  # 4 right of the first 5
    assert results["n-samples"]["tiny_mc"]["effective"] == 5 and results["n-shot"]["tiny_mc"] == 0
    assert results["mechsieve"]["adapter"] == str(adapter.resolve())
    samples = [json.loads(line) for line in (out / "lm_eval_samples.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(sample_logliks(samples), lls[:5], atol=1e-4)
    assert "lm-eval tiny_mc: acc=0.8000" in printed and "lm_eval.json" in printed
    assert not (out / "metrics.json").exists()  # no mechsieve task asked for

    # lm-eval's own loading, as `lm_eval --model hf --model_args <recorded>` does it, from another folder.
    meta = json.loads((adapter / "mechsieve_base.json").read_text())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=meta["lm_eval_model_args"].replace("ADAPTER", str(adapter)) + ",device=cpu",
        tasks=["tiny_mc"], limit=5, task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert theirs["results"]["tiny_mc"]["acc,none"] == pytest.approx(4 / 5, abs=1e-12)
    np.testing.assert_allclose(sample_logliks(theirs["samples"]["tiny_mc"]), lls[:5], atol=1e-4)
