"""The prompt-only attribution baseline (bag of words out of fold, response length) on hand-made
pools: a marker word gives the label away, label-independent prompts, a hand-computed length
ranking, the out-of-fold property, and pools too small to stratify."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mechsieve.config import ConfigError
from mechsieve.data.readers import DataError
from mechsieve.data.records import Example
from mechsieve.evaluate.attribution import average_precision
from mechsieve.evaluate.prompt_baseline import (
    BagOfWordsSettings,
    _pipeline,
    out_of_fold_scores,
    prompt_only_baseline,
    prompt_only_baseline_for_pool,
    prompt_text,
)

pytestmark = pytest.mark.timeout(120)

TOPICS = ["apples", "trains", "prime numbers", "rivers", "tax"]


def _marker_pool(seed: int, n: int = 40, n_pos: int = 10) -> tuple[list[str], np.ndarray]:
    labels = np.zeros(n, dtype=bool)
    labels[np.random.default_rng(seed).permutation(n)[:n_pos]] = True
    prompts = [f"Please answer a question about {TOPICS[i % 5]}." + (" zebra" if labels[i] else "") for i in range(n)]
    return prompts, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_marker_word_in_the_prompt_gives_the_label_away(seed):
    prompts, labels = _marker_pool(seed)
    out = prompt_only_baseline(prompts, ["same answer"] * 40, labels, seed=seed)
    bow = out["bag_of_words"]
    # every positive out of fold outranks every negative: AP is 1 up to the float sum of its
    # recall steps (1.0 or 0.9999999999999999), not merely "high"
    assert bow["auc_pr"] == pytest.approx(1.0, abs=1e-12)
    assert bow["base_rate"] == 0.25 and bow["above_base_rate"] == pytest.approx(0.75, abs=1e-12)
    assert bow["precision@10"] == 1.0 and bow["recall@10"] == 1.0 and bow["precision@40"] == 0.25
    assert "precision@100" not in bow  # k larger than the pool is left out, as attribution_metrics does
    assert bow["folds"] == bow["folds_requested"] == 5 and "note" not in bow
    assert bow["vectorizer"]["token_pattern"] == BagOfWordsSettings().token_pattern
    # the margin is wide, not a knife edge: lowest positive logit far above the highest negative
    scores = out_of_fold_scores(prompts, labels, 5, seed)
    assert scores[labels].min() - scores[~labels].max() > 1.0
    # identical responses: one tie group of all 40, precision there 10/40 = the base rate
    length = out["response_length"]
    assert length["auc_pr"] == pytest.approx(0.25) and length["above_base_rate"] == pytest.approx(0.0)


def test_label_independent_prompts_stay_near_the_base_rate():
    # 10 prompt texts x 20 copies; 40 of the 200 examples labelled positive by a seeded
    # permutation, independently of which text they carry: the prompt holds no information
    texts = [f"Question {j}: tell me about {TOPICS[j % 5]} and item {j}" for j in range(10)]
    prompts = [t for t in texts for _ in range(20)]
    rng = np.random.default_rng(0)
    labels = np.zeros(200, dtype=bool)
    labels[rng.permutation(200)[:40]] = True
    assert {prompts[i] for i in np.flatnonzero(labels)} == set(texts)  # every text occurs in both classes
    bow = prompt_only_baseline(prompts, ["x"] * 200, labels, seed=0)["bag_of_words"]
    # every text carries both labels: the folds are grouped by text, and the 20 copies of a text
    # get one score (each text is unseen by the model that scores it), so the ranking is of 10 tie
    # groups and can only be read for its distance from the base rate: the test's margin, 0.1
    assert bow["groups"] == "by prompt text (10 texts carry both labels)"
    scores = out_of_fold_scores(prompts, labels, 5, 0)
    assert all(len(np.unique(scores[j * 20:(j + 1) * 20])) == 1 for j in range(10))
    assert abs(bow["above_base_rate"]) < 0.1
    assert bow["base_rate"] == 0.2


def test_response_length_hand_computed():
    # lengths in characters: 3, 6, 3, 11 (in whitespace tokens they would be 2, 1, 1, 2, AP 1.0)
    responses = ["a b", "abcdef", "xyz", "hello world"]
    labels = np.array([1, 0, 0, 1])
    out = prompt_only_baseline(["p one", "p two", "p three", "p four"], responses, labels, ks=(1, 2))
    length = out["response_length"]
    assert length["unit"] == "characters" and length["order"] == "longer first"
    # ranking 11 (pos) | 6 (neg) | 3, 3 tied (pos, neg): AP = 1/2 * 1/1 + 1/2 * 2/4 = 0.75
    assert length["auc_pr"] == pytest.approx(0.75)
    assert length["above_base_rate"] == pytest.approx(0.25)
    assert length["precision@1"] == 1.0 and length["precision@2"] == 0.5 and length["recall@2"] == 0.5
    # shorter first: 3, 3 tied (pos, neg) | 6 (neg) | 11 (pos): 1/2 * 1/2 + 1/2 * 2/4 = 0.5
    assert length["auc_pr_shorter_first"] == pytest.approx(0.5)
    # 2 positives and 2 negatives: two folds are all stratification allows
    bow = out["bag_of_words"]
    assert bow["folds"] == 2 and bow["folds_requested"] == 5 and "reduced from 5 to 2" in bow["note"]


def test_scores_are_out_of_fold():
    # each prompt is one token no other prompt has: a model that saw an example's label scores it
    # perfectly, out of fold its token is unseen, so every held-out example of a fold gets the
    # same score (the fold model's intercept)
    n = 50
    labels = np.zeros(n, dtype=bool)
    labels[np.random.default_rng(0).permutation(n)[:10]] = True
    prompts = [f"tok{i}" for i in range(n)]
    in_sample = _pipeline(BagOfWordsSettings(), 0).fit(prompts, labels).decision_function(prompts)
    assert average_precision(in_sample, labels) == pytest.approx(1.0)
    scores = out_of_fold_scores(prompts, labels, 5, 0)
    assert len(np.unique(scores)) <= 5
    bow = prompt_only_baseline(prompts, ["x"] * n, labels)["bag_of_words"]
    # stratified folds of 2 positives + 8 negatives, each one tie group: precision 2j/10j = 0.2 at
    # every threshold in whatever order the folds' intercepts fall, so AP is exactly the base rate
    assert bow["auc_pr"] != 1.0
    assert bow["auc_pr"] == pytest.approx(0.2) and bow["above_base_rate"] == pytest.approx(0.0)


def test_too_few_positives_reduce_folds_then_skip():
    prompts, _ = _marker_pool(0, n=30, n_pos=0)  # topic prompts, no marker yet
    labels = np.zeros(30, dtype=bool)
    labels[[3, 11, 20]] = True
    prompts = [p + (" zebra" if labels[i] else "") for i, p in enumerate(prompts)]
    bow = prompt_only_baseline(prompts, ["x"] * 30, labels)["bag_of_words"]
    assert bow["folds"] == 3 and bow["folds_requested"] == 5
    assert "3 positive and 27 negative" in bow["note"]
    assert bow["auc_pr"] == pytest.approx(1.0, abs=1e-12)

    one = np.zeros(30, dtype=bool)
    one[5] = True
    out = prompt_only_baseline(prompts, [f"r{'x' * i}" for i in range(30)], one)
    # example 5's prompt is also 5 negatives' prompt: the folds would be grouped, and 1 prompt has a positive
    assert "auc_pr" not in out["bag_of_words"] and "1 distinct prompts with a positive" in out["bag_of_words"]["skipped"]
    assert out["bag_of_words"]["folds_requested"] == 5  # the settings are still recorded
    # response_length needs no fitting: example 5 is the 25th longest of 30 -> AP = 1/25
    assert out["response_length"]["auc_pr"] == pytest.approx(1 / 25)

    none = prompt_only_baseline(prompts, ["x"] * 30, np.zeros(30, dtype=bool))
    assert "no" in none["bag_of_words"]["skipped"] and "positive" in none["response_length"]["skipped"]
    every = prompt_only_baseline(prompts, ["x"] * 30, np.ones(30, dtype=bool))
    assert "0 negative" in every["bag_of_words"]["skipped"] and every["response_length"]["auc_pr"] == 1.0


def test_empty_prompts_and_bad_inputs():
    labels = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    out = prompt_only_baseline([""] * 6, ["a", "bb", "a", "bb", "a", "bb"], labels)
    assert "empty" in out["bag_of_words"]["skipped"]
    assert out["response_length"]["auc_pr"] == pytest.approx(0.5)  # all three positives are the shortest
    with pytest.raises(ConfigError, match="folds=1"):
        prompt_only_baseline(["a"] * 6, ["a"] * 6, labels, folds=1)
    with pytest.raises(DataError, match="5 prompts"):
        prompt_only_baseline(["a"] * 5, ["a"] * 6, labels)
    with pytest.raises(ConfigError, match="class_weight"):
        BagOfWordsSettings(class_weight="auto")


def test_prompt_text_of_examples_and_the_pool_helper():
    chat = Example("a", "s", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}], "4")
    assert prompt_text(chat) == "Be brief.\nHi\nHello.\n2+2?"  # earlier turns count; roles and the response not
    parts = Example("b", "s", [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                             {"type": "text", "text": "here"}]}], "ok")
    assert prompt_text(parts) == "look\nhere"
    plain = Example("c", "s", "Just a string prompt", "resp")  # type: ignore[arg-type]
    assert prompt_text(plain) == "Just a string prompt"
    echoed = Example("d", "s", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "A")
    assert prompt_text(echoed) == "Q"  # a trailing assistant turn repeating the response is not prompt

    # the marker sits in the system message: the pool helper must carry it into the prompt text
    prompts, labels = _marker_pool(1)
    examples = [Example(str(i), "s", [{"role": "system", "content": "zebra" if labels[i] else "okapi"},
                                      {"role": "user", "content": p.replace(" zebra", "")}], "r" * (i + 1))
                for i, p in enumerate(prompts)]
    out = prompt_only_baseline_for_pool(examples, labels, seed=1)
    assert out["bag_of_words"]["auc_pr"] == pytest.approx(1.0, abs=1e-12)
    same = prompt_only_baseline([prompt_text(e) for e in examples], [e.response for e in examples], labels, seed=1)
    assert out == same
    # response lengths 1..40 in pool order: the length metric is a plain AP of those
    assert out["response_length"]["auc_pr"] == pytest.approx(average_precision(np.arange(1, 41.0), labels))


def test_importing_the_module_does_not_import_sklearn():
    code = ("import sys, mechsieve.evaluate.prompt_baseline; "
            "sys.exit(1 if any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_repeated_prompts_are_held_out_together():
    # 30 questions, each twice: once planted, once clean. Every copy of a question is held out with
    # the other, so both get one score, and the prompt cannot tell them apart: AP of 30 tied pairs
    # (one positive in each) in any order is 0.5, the base rate. Ungrouped folds score the copies
    # with different models, whose training set lacks one of the pair's labels.
    questions = [f"question {i} about topic{i % 7} with word{i}" for i in range(30)]
    prompts = [q for q in questions for _ in range(2)]
    labels = np.array([True, False] * 30)
    scores = out_of_fold_scores(prompts, labels, 5, 0)
    np.testing.assert_array_equal(scores[0::2], scores[1::2])
    bow = prompt_only_baseline(prompts, ["x"] * 60, labels)["bag_of_words"]
    assert bow["groups"] == "by prompt text (30 texts carry both labels)" and bow["folds"] == 5
    assert bow["auc_pr"] == pytest.approx(0.5) and bow["above_base_rate"] == pytest.approx(0.0)
    # unique prompts: plain stratified folds, recorded as such
    once = prompt_only_baseline(questions, ["x"] * 30, labels[:30])["bag_of_words"]
    assert once["groups"] == "none (no prompt text carries both labels)"
    # too few distinct prompts on one side: folds reduced, then skipped
    few = prompt_only_baseline(prompts[:6] + questions[3:], ["x"] * 33,
                               np.r_[labels[:6], np.zeros(27, dtype=bool)])["bag_of_words"]
    assert few["folds"] == 3 and "3 distinct prompts with a positive" in few["note"]
    two = prompt_only_baseline(["a", "a"] + questions[2:], ["x"] * 30,
                               np.r_[[True, False], np.zeros(28, dtype=bool)])["bag_of_words"]
    assert "1 distinct prompts with a positive" in two["skipped"]
