"""Attribution metrics on hand-made rankings, the removal experiment, and the probe scorers
(vector-filter = a manual projection; projection-diff) on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import probe_pool as _pool
from mechsieve.evaluate.attribution import (
    attribution_metrics,
    average_precision,
    precision_at_k,
    ranks,
    recall_curve,
    removal_experiment,
)


def test_average_precision_hand_values():
    # ranking: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    labels = np.array([1, 0, 1, 0])
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores, np.array([0, 0, 0, 1])) == pytest.approx(0.25)
    assert average_precision(-scores, np.array([0, 0, 0, 1])) == pytest.approx(1.0)
    # a tie between a positive and a negative at the top is one threshold: precision 1/2 there
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])) == pytest.approx(0.5)
    assert np.isnan(average_precision(scores, np.zeros(4)))


def test_average_precision_matches_sklearn_on_random_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)
    labels = rng.random(60) < 0.3
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_precision_at_k_recall_and_ranks():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    labels = np.array([0, 1, 0, 0, 1])  # order: 1(pos) 3 2 4(pos) 0
    assert precision_at_k(scores, labels, 1) == 1.0
    assert precision_at_k(scores, labels, 3) == pytest.approx(1 / 3)
    np.testing.assert_allclose(recall_curve(scores, labels), [0.5, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(ranks(scores), [5, 1, 3, 2, 4])
    m = attribution_metrics(scores, labels, ks=(2, 40))
    assert m["precision@2"] == 0.5 and m["recall@2"] == 0.5 and "precision@40" not in m
    assert m["base_rate"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="k=9"):
        precision_at_k(scores, labels, 9)
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([np.nan, 1.0]), np.array([1, 0]))


def test_removal_experiment_with_a_counting_trainer():
    ids = [f"e{i}" for i in range(10)]
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([9, 8, 1, 2, 3, 4, 5, 6, 7, 0], float)
    bad = {"e0", "e1"}
    # a "model" trained on kept ids shows the behaviour in proportion to the bad examples kept
    res = removal_experiment(ids, scores, [0.2], retrain=lambda kept: sum(i in bad for i in kept) / 2,
                             measure=float, random_repeats=3, seed=0, labels=labels, with_baseline=True)
    assert res.baseline == 1.0 and res.top == [0.0] and res.removed_positives_top == [2]
    assert all(r >= 0.0 for r in res.random[0]) and len(res.random[0]) == 3
    assert res.summary()["drop_vs_random"][0] == pytest.approx(np.mean(res.random[0]))


# --- probe scorers on the tiny model -------------------------------------------------------






def _write(pool, path):
    from mechsieve.data.writers import example_to_messages, write_jsonl

    write_jsonl(path, [example_to_messages(e) for e in pool.examples])
    return str(path)


def test_vector_filter_equals_manual_projection(loaded, tmp_path):
    from mechsieve.data.render import RenderConfig, render_example
    from mechsieve.scorers.registry import make_scorer

    pos, neg, pool = _pool(4, "p"), _pool(5, "n"), _pool(6, "x")
    neg.examples = neg.examples[1:]
    cfg = {"positive": _write(pos, tmp_path / "p.jsonl"), "negative": _write(neg, tmp_path / "n.jsonl"),
           "probe": {"layer": 1, "holdout": 0.0}, "max_len": 64}
    res = make_scorer("vector-filter", cfg).score(pool, loaded=loaded, progress=False)

    def mean_resp(ex):  # hidden_states[l + 1] is the output of block l (l below the last block)
        r = render_example(ex, loaded.tokenizer, RenderConfig(max_len=64))
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.from_numpy(r.input_ids)[None], output_hidden_states=True).hidden_states
        return hs[2][0][torch.from_numpy(r.response_mask)].double().mean(0)

    v = torch.stack([mean_resp(e) for e in pos.examples]).mean(0) - torch.stack([mean_resp(e) for e in neg.examples]).mean(0)
    manual = torch.stack([mean_resp(e) @ (v / v.norm()) for e in pool.examples]).numpy()
    np.testing.assert_allclose(res.scores, manual, rtol=1e-4, atol=1e-5)
    assert res.explanations["layer"] == 1
    # the concept is cached: a second scorer gives the same numbers without refitting
    again = make_scorer("vector-filter", cfg).score(pool, loaded=loaded, progress=False)
    np.testing.assert_allclose(again.scores, res.scores)


def test_projection_diff_matches_its_parts_and_sampling_is_seeded(loaded, tmp_path):
    from mechsieve.data.records import Example
    from mechsieve.features.probes import load_concept
    from mechsieve.scorers.concept import (
        ConceptSource,
        build_concept,
        mean_response_acts,
        sample_responses,
    )
    from mechsieve.scorers.registry import make_scorer

    pos, neg, pool = _pool(4, "p"), _pool(4, "n", shift=1), _pool(4, "x")
    from mechsieve.features.probes import ConceptConfig

    src = ConceptSource(max_len=64, probe=ConceptConfig(layer=1, holdout=0.0))
    concept = build_concept(loaded, pos, neg, src, progress=False)
    from mechsieve.features.probes import save_concept

    save_concept(tmp_path / "c", concept)
    cfg = {"concept_dir": str(tmp_path / "c"), "max_len": 64, "temperature": 0.0, "max_new_tokens": 6}
    a = make_scorer("projection-diff", cfg).score(pool, loaded=loaded, seed=5, progress=False)
    c = load_concept(tmp_path / "c")
    own = sample_responses(loaded, pool.examples, 6, 0.0, 0, max_len=64, progress=False)
    acts, _ = mean_response_acts(loaded, pool.examples, 1, src, progress=False)
    sampled = [Example(e.id, e.source, e.prompt, y) for e, y in zip(pool.examples, own)]
    acts2, _ = mean_response_acts(loaded, sampled, 1, src, progress=False)
    np.testing.assert_allclose(a.scores, c.score(acts) - c.score(acts2), rtol=1e-5, atol=1e-6)
    # sampling with a temperature is seeded: same seed, same scores
    # sampling with a temperature is seeded: same seed, same responses
    hot = [sample_responses(loaded, pool.examples, 6, 1.0, 3, max_len=64, progress=False) for _ in range(2)]
    assert hot[0] == hot[1]


def test_concept_scorers_need_a_concept(loaded):
    from mechsieve.scorers.base import ScorerError
    from mechsieve.scorers.registry import make_scorer

    with pytest.raises(ScorerError, match="--concept POS NEG"):
        make_scorer("vector-filter", {}).score(_pool(), loaded=loaded, progress=False)


def test_attribute_command_ranks_labels_and_filters(model_dir, tmp_path, capsys):
    import json

    from mechsieve.cli import main
    from mechsieve.data.readers import read_pool
    from mechsieve.data.writers import example_to_messages, write_jsonl

    pool = _pool(10, "x")
    rows = [{**example_to_messages(e), "planted": i % 5 == 0} for i, e in enumerate(pool.examples)]
    pool_file = write_jsonl(tmp_path / "pool.jsonl", rows)
    pos, neg = _write(_pool(4, "p"), tmp_path / "p.jsonl"), _write(_pool(4, "n", shift=1), tmp_path / "n.jsonl")
    out = tmp_path / "out"
    assert main(["attribute", "--method", "vector-filter", "--model", str(model_dir), "--pool", str(pool_file),
                 "--concept", pos, neg, "--layer", "1", "--out", str(out), "--remove-top", "0.2",
                 "--label-field", "planted", "--quiet", "--set", "scorer.max_len=64"]) == 0
    ranking = [json.loads(x) for x in (out / "ranking.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in ranking] == list(range(1, 11))
    assert all(a["score"] >= b["score"] for a, b in zip(ranking, ranking[1:]))
    assert sum(r["label"] for r in ranking) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "vector-filter" and summary["removed"] == 2
    assert 0.0 < summary["metrics"]["auc_pr"] <= 1.0
    kept = read_pool(str(out / "filtered.jsonl"))
    assert {e.id for e in kept.examples} == {r["id"] for r in ranking[2:]}
    assert "ranking" in capsys.readouterr().out
    # a method needing a concept, given none, is a user error (exit 2), not a traceback
    assert main(["attribute", "--method", "vector-filter", "--model", str(model_dir), "--pool", str(pool_file),
                 "--out", str(tmp_path / "out2"), "--quiet"]) == 2
    assert "a concept is needed" in capsys.readouterr().err


def test_attribute_label_field_parses_csv_strings(model_dir, tmp_path, capsys):
    """A CSV's labels are strings: "0" and "False" are negatives, not truthy (every example a
    positive would make AUC-PR read 1)."""
    import csv
    import json

    from mechsieve.cli import main

    values = ["1", "0", "False", "True", "no", "YES", " 0 ", "false", "0", "1"]
    path = tmp_path / "pool.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer", "planted"])
        for i, value in enumerate(values):
            writer.writerow([f"What is {i} plus {i}?", f"{i} + {i} = {2 * i}", value])
    pos, neg = _write(_pool(4, "p"), tmp_path / "p.jsonl"), _write(_pool(4, "n", shift=1), tmp_path / "n.jsonl")
    argv = ["attribute", "--method", "vector-filter", "--model", str(model_dir), "--pool", str(path),
            "--concept", pos, neg, "--layer", "1", "--label-field", "planted", "--quiet", "--set", "scorer.max_len=64"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    ranking = [json.loads(x) for x in (tmp_path / "out" / "ranking.jsonl").read_text().splitlines()]
    assert sum(r["label"] for r in ranking) == 4  # rows 0, 3, 5 and 9
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["positives"] == 4 and summary["metrics"]["base_rate"] == 0.4
    # the prompt-only baselines stand beside the method: 4 positives allow 4 stratified folds
    base = summary["prompt_only_baseline"]
    assert base["bag_of_words"]["folds"] == 4 and base["bag_of_words"]["base_rate"] == 0.4
    assert base["response_length"]["unit"] and base["response_length"]["positives"] == 4
    first = capsys.readouterr().err  # this tiny concept does not separate: the gate warns, once
    assert first.count("not linearly readable here") == 1
    # a value that is not a label is refused, naming the file:line, the example, the field and the value
    values[6] = "maybe"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer", "planted"])
        for i, value in enumerate(values):
            writer.writerow([f"What is {i} plus {i}?", f"{i} + {i} = {2 * i}", value])
    assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:8: example " in err and "has planted='maybe', which is not a label" in err
    assert "1/true/yes or 0/false/no" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    assert main([*argv[:-5], "--label-field", "plantd", "--quiet", "--set", "scorer.max_len=64",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "no record has the field 'plantd'" in capsys.readouterr().err


def test_parse_label_values():
    import numpy as np

    from mechsieve.commands.attribute import parse_label

    assert [parse_label(v) for v in (True, False, 1, 0, 1.0, np.int64(0), np.bool_(True), "Yes", "FALSE", "1")] == [
        True, False, True, False, True, False, True, True, False, True]
    assert [parse_label(v) for v in (2, -1, 0.5, "", "maybe", None, "t", [1])] == [None] * 8
