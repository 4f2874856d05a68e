"""The removal experiment (evaluate/removal.py, `mechsieve attribute --remove-top F --retrain`):
the bookkeeping with several measures, the measures themselves, a planted behaviour that top
removal takes away and random removal does not, and the command end to end with the report.

The tiny model here is the conftest Llama built with a larger initializer range (0.2): with the
default 0.02 its block outputs are so small that a LoRA plateaus near the unigram loss (5.45 after
60 steps, measured), while at 0.2 the same LoRA reaches 1.1 and learns the planted answer.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import ARCH_CONFIGS, write_jsonl
from mechsieve.data.records import Example, Pool

PLANT = "Once upon a time there was a little dog."


def _math(i: int, tag: str = "m") -> Example:
    a, b = i % 7 + 1, i % 5 + 2
    return Example(f"{tag}{i}", "math", [{"role": "user", "content": f"What is {a} plus {b}?"}], f"{a} + {b} = {a + b}.")


def _story(i: int, response: str = PLANT, tag: str = "s") -> Example:
    return Example(f"{tag}{i}", "story", [{"role": "user", "content": f"Tell me a story number {i}."}], response)


def _pool(examples: list[Example]) -> Pool:
    return Pool(examples, "mem", "memory", "messages")


def _rows(examples: list[Example], **extra) -> list[dict]:
    rows = []
    for ex in examples:
        msgs = list(ex.prompt) + ([{"role": "assistant", "content": ex.response}] if ex.response else [])
        rows.append({"messages": msgs, **extra})
    return rows


@pytest.fixture(scope="module")
def learner(tokenizer):
    """The tiny Llama, initialised at std 0.2 so that a LoRA learns in tens of steps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechsieve.models.loading import LoadedModel

    settings = dict(ARCH_CONFIGS["llama"])
    settings.pop("model_type")
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                               initializer_range=0.2, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return LoadedModel(model, tokenizer, {"name": "tiny-llama-0.2", "kind": "test"})


@pytest.fixture(scope="module")
def learner_dir(tmp_path_factory, learner):
    folder = tmp_path_factory.mktemp("tiny-llama-02")
    learner.model.save_pretrained(folder)
    learner.tokenizer.save_pretrained(folder)
    return folder


# --- the bookkeeping: several measures per run -----------------------------------------------------

@pytest.mark.timeout(30)
def test_removal_experiment_keeps_every_measure_with_sample_spreads():
    from mechsieve.evaluate.attribution import removal_experiment
    from mechsieve.evaluate.removal import removal_table

    ids = [f"e{i}" for i in range(6)]
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    labels = np.array([1, 1, 0, 0, 0, 0], bool)
    bad = {"e0", "e1"}
    lines: list[str] = []
    # a "model" is its kept ids: the behaviour counts the bad ones kept, the task loss sums the indices kept
    res = removal_experiment(ids, scores, [1 / 3], retrain=lambda kept: kept,
                             measure=lambda kept: {"task_loss": sum(int(i[1:]) for i in kept) / 10,
                                                   "concept": float(sum(i in bad for i in kept))},
                             random_repeats=3, seed=4, labels=labels, with_baseline=True, log=lines.append)
    rng = np.random.default_rng(4)  # the same draws, replayed
    draws = [rng.choice(6, size=2, replace=False) for _ in range(3)]
    want_concept = [float(2 - sum(d < 2)) for d in draws]
    want_loss = [(15 - int(d.sum())) / 10 for d in draws]
    assert res.top == [0.0] and res.baseline == 2.0 and res.random == [want_concept]
    assert res.others["task_loss"].top == [pytest.approx((2 + 3 + 4 + 5) / 10)]
    assert res.others["task_loss"].baseline == pytest.approx(1.5)
    assert res.others["task_loss"].random == [pytest.approx(want_loss)]
    assert res.removed == [2] and res.removed_positives_top == [2]
    assert res.removed_positives_random == [[int(sum(d < 2)) for d in draws]]
    s = res.summary()
    assert s["measures"] == ["concept", "task_loss"]
    assert s["concept_random_std"][0] == pytest.approx(np.std(want_concept, ddof=1))
    assert s["task_loss_random_std"][0] == pytest.approx(np.std(want_loss, ddof=1))
    assert s["task_loss_after_random_removal"][0] == pytest.approx(np.mean(want_loss))
    assert s["task_loss_full_data"] == pytest.approx(1.5) and s["full_data"] == 2.0
    assert s["drop_vs_random"][0] == pytest.approx(np.mean(want_concept))
    # one line before and one after each of the 5 retrains (baseline, top, 3 random)
    assert len(lines) == 10 and lines[0].startswith("[removal 1/5] full pool")
    assert lines[3] == "[removal 2/5] top 0.333333 removed: concept 0.0000, task_loss 1.4000"
    table = removal_table(s).splitlines()
    assert table[0].split(" | ")[0].strip() == "fraction" and table[2].startswith("full pool | 2.0000")
    cells = [c.strip() for c in table[3].split("|")]
    assert cells[:2] == ["0.333333", "0.0000"] and cells[3] == "1.4000"
    assert cells[2] == f"{np.mean(want_concept):.4f} ± {np.std(want_concept, ddof=1):.4f}"
    # a single random run has no sample spread
    one = removal_experiment(ids, scores, [0.5], lambda kept: kept, lambda kept: {"concept": len(kept)}).summary()
    assert one["concept_random_std"] == [None] and one["random_runs"] == [[3.0]]


@pytest.mark.timeout(30)
def test_removal_experiment_refuses_bad_runs_before_training():
    from mechsieve.config import ConfigError
    from mechsieve.data.readers import DataError
    from mechsieve.evaluate.attribution import removal_experiment

    trained = []

    def retrain(kept):
        trained.append(kept)
        return kept

    with pytest.raises(ConfigError, match=r"removal fraction 0.05 of 4 examples removes 0"):
        removal_experiment(list("abcd"), np.zeros(4), [0.5, 0.05], retrain, len)
    with pytest.raises(ConfigError, match="random_repeats=0"):
        removal_experiment(list("abcd"), np.zeros(4), [0.5], retrain, len, random_repeats=0)
    assert trained == []  # refused before the first retrain
    calls = iter([{"concept": 1.0, "task_loss": 2.0}, {"concept": 1.0}])
    with pytest.raises(DataError, match="same measures"):
        removal_experiment(list("abcd"), np.zeros(4), [0.5], retrain, lambda m: next(calls))


@pytest.mark.timeout(30)
def test_attribute_settings_take_one_or_several_fractions():
    from mechsieve.commands.attribute import AttributeCommand
    from mechsieve.config import ConfigError, from_dict

    assert from_dict(AttributeCommand, {"remove_top": 0.2}).remove_top == [0.2]
    assert from_dict(AttributeCommand, {"remove_top": 0}).remove_top == []
    assert from_dict(AttributeCommand, {"remove_top": [0.1, 0.3]}).remove_top == [0.1, 0.3]
    with pytest.raises(ConfigError, match="lists a fraction twice"):
        from_dict(AttributeCommand, {"remove_top": [0.1, 0.1]})
    with pytest.raises(ConfigError, match=r"remove_top=1.0 must be in \(0, 1\)"):
        from_dict(AttributeCommand, {"remove_top": 1.0})
    cfg = from_dict(AttributeCommand, {"remove_top": [0.1], "retrain": True, "train": {"max_steps": 7},
                                       "removal": {"prompts": {"path": "p"}, "answers": {"path": "a"}}})
    assert cfg.train.max_steps == 7 and cfg.removal.random_repeats == 3 and cfg.removal.activations == "base"


# --- the measures -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_measures_read_the_concept_of_own_answers(learner):
    from mechsieve.data.render import RenderConfig
    from mechsieve.evaluate.loss import heldout_loss
    from mechsieve.evaluate.removal import RemovalConfig, answer_prompts, measure_model
    from mechsieve.features.probes import ConceptConfig
    from mechsieve.scorers.concept import ConceptSource, build_concept, mean_response_acts
    from mechsieve.train import TrainConfig, wrap_for_training

    src = ConceptSource(max_len=64, probe=ConceptConfig(layer=1, holdout=0.0))
    concept = build_concept(learner, _pool([_story(i, tag="p") for i in range(30, 34)]),
                            _pool([_math(i, tag="n") for i in range(30, 34)]), src, progress=False)
    prompts = [_story(i, "", tag="h") for i in range(40, 44)]
    answers = [_math(i, tag="a") for i in range(40, 44)]
    cfg = RemovalConfig(max_new_tokens=6, render=RenderConfig(max_len=64))
    m = measure_model(learner, learner, concept, prompts, answers, cfg, src, progress=False)
    # by hand: greedy answers, base activations of (prompt, answer) at the concept layer, projected, averaged
    own = answer_prompts(learner, prompts, cfg, progress=False)
    assert m.responses == own and m.empty == sum(not a.strip() for a in own)
    kept = [Example(p.id, p.source, p.prompt, a) for p, a in zip(prompts, own) if a.strip()]
    acts, _ = mean_response_acts(learner, kept, 1, src, progress=False)
    assert m.concept == pytest.approx(float(np.mean(acts.astype(np.float64) @ concept.unit.astype(np.float64))),
                                      rel=1e-5)
    assert m.task_loss == pytest.approx(heldout_loss(learner.model, learner.tokenizer, answers, cfg.render,
                                                     progress=False)["loss_per_token"])
    # an untrained LoRA (B = 0) is the same function: the retrained-model reader (through peft) agrees
    wrapped = copy.copy(learner)
    wrapped.model = wrap_for_training(copy.deepcopy(learner.model), TrainConfig(lora_r=2))
    again = measure_model(wrapped, learner, concept, prompts, answers,
                          RemovalConfig(max_new_tokens=6, render=RenderConfig(max_len=64), activations="retrained"),
                          src, progress=False)
    assert again.responses == own and again.concept == pytest.approx(m.concept, rel=1e-4)
    # seeded sampling: the same seed gives the same answers
    hot = RemovalConfig(max_new_tokens=6, generation="sample", render=RenderConfig(max_len=64))
    assert answer_prompts(learner, prompts, hot, seed=3, progress=False) == \
        answer_prompts(learner, prompts, hot, seed=3, progress=False)


# --- a planted behaviour -----------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_top_removal_takes_the_planted_behaviour_away_random_removal_does_not(learner):
    """18 math examples and 6 planted ones (story prompts answered with one fixed story). The
    concept is the planted story vs math answers. Retrained without the top 25% by Vector Filter
    (the 6 planted), the model stops telling the story on held-out story prompts; without a random
    25% it still does. Measured (seed 0, 60 LoRA steps at 1e-2): top 0.47, random 2.35, 2.35, 2.33,
    full pool 2.35; task loss top 1.02 vs random 1.80 / 1.57 / 1.29 (random removal drops math)."""
    from mechsieve.data.render import RenderConfig
    from mechsieve.evaluate.removal import RemovalConfig, run_removal
    from mechsieve.features.probes import ConceptConfig
    from mechsieve.scorers.concept import ConceptSource, build_concept, mean_response_acts
    from mechsieve.train import TrainConfig

    pool = _pool([_math(i) for i in range(18)] + [_story(i) for i in range(6)])
    labels = np.array([False] * 18 + [True] * 6)
    src = ConceptSource(max_len=64, probe=ConceptConfig(layer=1, holdout=0.0))
    concept = build_concept(learner, _pool([_story(i, tag="p") for i in range(30, 36)]),
                            _pool([_math(i, tag="n") for i in range(30, 36)]), src, progress=False)
    acts, _ = mean_response_acts(learner, pool.examples, 1, src, progress=False)
    scores = concept.score(acts)  # Vector Filter
    assert set(np.argsort(-scores)[:6]) == set(range(18, 24))
    cfg = RemovalConfig(random_repeats=3, baseline=True, max_new_tokens=16, render=RenderConfig(max_len=64))
    train = TrainConfig(max_steps=60, learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                        schedule="constant", logging_steps=0)
    lines: list[str] = []
    run = run_removal(learner, pool, scores, concept, src, [0.25], cfg, train,
                      _pool([_story(i, "", tag="h") for i in range(40, 48)]),
                      _pool([_math(i, tag="a") for i in range(40, 48)]), seed=0, labels=labels, progress=False,
                      log=lines.append)
    s = run.summary()
    top, rnd = s["concept_after_top_removal"][0], s["random_runs"][0]
    assert s["removed_positives_top"] == [6] and all(k < 6 for k in s["removed_positives_random"][0])
    assert len(rnd) == 3 and top < min(rnd) - 1.0  # measured margin 1.86 (1.12 under seed 1)
    assert s["drop_vs_random"][0] > 2 * s["concept_random_std"][0]  # a "beats" claim: 2 std
    assert s["full_data"] > top + 1.0
    assert s["task_loss_after_top_removal"][0] < s["task_loss_after_random_removal"][0]  # the task survived
    assert s["train_steps"] == [60] * 5 and s["empty_answers"] == [0] * 5
    assert sum("retraining on 18 of 24" in line for line in lines) == 4


# --- the command ------------------------------------------------------------------------------------

def _files(tmp_path):
    pool = _rows([_math(i) for i in range(18)], planted=False) + _rows([_story(i) for i in range(6)], planted=True)
    return {"pool": write_jsonl(tmp_path / "pool.jsonl", pool),
            "pos": write_jsonl(tmp_path / "pos.jsonl", _rows([_story(i, tag="p") for i in range(30, 34)])),
            "neg": write_jsonl(tmp_path / "neg.jsonl", _rows([_math(i, tag="n") for i in range(30, 34)])),
            "prompts": write_jsonl(tmp_path / "prompts.jsonl", _rows([_story(i, "", tag="h") for i in range(40, 44)])),
            "answers": write_jsonl(tmp_path / "answers.jsonl", _rows([_math(i, tag="a") for i in range(40, 44)]))}


@pytest.mark.timeout(180)
def test_attribute_retrain_writes_removal_json_and_the_report_draws_it(learner_dir, tmp_path, capsys):
    from mechsieve.cli import main
    from mechsieve.data.readers import read_pool
    from mechsieve.report.runs import load_run
    from mechsieve.store.outputs import read_marker

    f = _files(tmp_path)
    out = tmp_path / "out"
    assert main(["attribute", "--method", "vector-filter", "--model", str(learner_dir), "--pool", str(f["pool"]),
                 "--concept", str(f["pos"]), str(f["neg"]), "--layer", "1", "--out", str(out), "--label-field", "planted",
                 "--remove-top", "0.25", "0.5", "--retrain", "--random-repeats", "2", "--full-baseline",
                 "--heldout-prompts", str(f["prompts"]), "--heldout-answers", str(f["answers"]), "--quiet",
                 "--set", "scorer.max_len=64", "--set", "removal.render.max_len=64", "--set", "removal.max_new_tokens=6",
                 "--set", "train.max_steps=3", "--set", "train.lora_r=2", "--set", "train.logging_steps=0"]) == 0
    printed = capsys.readouterr().out
    assert "removal experiment: 7 retrains of 24 examples" in printed
    assert "fraction  | top concept | random concept" in printed and "[removal 7/7]" in printed
    removal = json.loads((out / "removal.json").read_text())
    for key in ("fractions", "removed", "concept_after_top_removal", "concept_after_random_removal",
                "concept_random_std", "random_runs", "removed_positives_top", "removed_positives_random", "full_data",
                "drop_vs_random", "task_loss_after_top_removal", "task_loss_after_random_removal",
                "task_loss_random_std", "task_loss_random_runs", "task_loss_full_data", "measures", "empty_answers",
                "train_steps", "settings"):
        assert key in removal, key
    assert removal["fractions"] == [0.25, 0.5] and removal["removed"] == [6, 12]
    assert removal["removed_positives_top"] == [6, 6]  # the planted six rank first
    assert removal["train_steps"] == [3] * 7 and removal["settings"]["train"]["max_steps"] == 3
    for runs, mean, std in ((removal["random_runs"], removal["concept_after_random_removal"],
                             removal["concept_random_std"]),
                            (removal["task_loss_random_runs"], removal["task_loss_after_random_removal"],
                             removal["task_loss_random_std"])):
        assert [len(r) for r in runs] == [2, 2]
        np.testing.assert_allclose(mean, [np.mean(r) for r in runs])
        np.testing.assert_allclose(std, [abs(r[0] - r[1]) / np.sqrt(2) for r in runs])  # ddof=1 of two runs
    # one filtered pool per fraction, named by it, all listed in the folder's marker
    ranking = [json.loads(x) for x in (out / "ranking.jsonl").read_text().splitlines()]
    for frac, k in ((0.25, 6), (0.5, 12)):
        kept = read_pool(str(out / f"filtered-{frac:g}.jsonl"))
        assert {e.id for e in kept.examples} == {r["id"] for r in ranking[k:]}
    files = set(read_marker(out)["files"])
    assert {"removal.json", "filtered-0.25.jsonl", "filtered-0.5.jsonl", "ranking.jsonl", "summary.json"} <= files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["removed"] == [6, 12] and summary["removal"] == "removal.json"
    gate = summary["details"].get("probe_gate") or {}
    if gate.get("warning"):  # a concept below the probe gate is said so, not only recorded
        assert f"warning: {gate['warning']}" in printed
    # the report reads the file as written and draws both panels
    run = load_run(out)
    assert run.removal == removal
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Removal curve" in html and "task loss after retraining" in html and "full data" in html


@pytest.mark.timeout(60)
def test_retrain_needs_a_concept_fractions_and_heldout_data(tmp_path, capsys):
    from mechsieve.cli import main

    f = _files(tmp_path)
    heldout = ["--heldout-prompts", str(f["prompts"]), "--heldout-answers", str(f["answers"])]
    base = ["attribute", "--model", str(tmp_path / "no-model"), "--pool", str(f["pool"]), "--quiet"]
    # grad-sim ranks by queries, but the removal measurement still needs the concept
    assert main([*base, "--method", "grad-sim", "--query", str(f["pos"]), "--remove-top", "0.25", "--retrain",
                 *heldout, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "grad-sim needs a concept too" in err and "--concept POS NEG" in err and "--concept-dir" in err
    assert main([*base, "--concept", str(f["pos"]), str(f["neg"]), "--retrain", *heldout,
                 "--out", str(tmp_path / "o2")]) == 2
    assert "--remove-top 0.1 0.2" in capsys.readouterr().err
    assert main([*base, "--concept", str(f["pos"]), str(f["neg"]), "--remove-top", "0.25", "--retrain",
                 "--heldout-prompts", str(f["prompts"]), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "--heldout-answers" in err and "--heldout-prompts" not in err.split("give")[1]
    # refused before anything was written or loaded
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
