"""Task metrics against hand computations: loss, answers, multiple choice, ROUGE-L, chrF."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mechsieve.data import DataConfig, Example, read_pool, render_example
from mechsieve.evaluate import (
    TaskConfig,
    choice_accuracy,
    chrf,
    evaluate_task,
    exact_match,
    extract_answer,
    generate_greedy,
    heldout_loss,
    parse_choice,
    rouge_l,
)
from mechsieve.models.loading import LoadedModel

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"




@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The answer is $18.", "18"),
    ("It costs $1,000.50 in total", "1000.5"),
    ("#### 72.0", "72"),
    ("x = -3.5 degrees", "-3.5"),
    ("between 10-20 items", "20"),  # a range, not minus twenty
    ("#### -12", "-12"),
    ("he had 3 apples.\n\n#### 3\n\nDone in 2 steps", "3"),  # #### wins over the last number
    ("#### \nthe total was 9", "9"),
    (".5 hours", "0.5"),
    ("answer: 007", "7"),
    ("The value is 12,000,000", "12000000"),
    ("#### 5,000 dollars", "5000"),
    ("score 4.50\n", "4.5"),
    ("no digits here", None),
    ("", None),
])
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_exact_match_compares_values():
    assert exact_match("so she has 1,000 left.", "...\n#### 1000")
    assert exact_match("The answer is 72.00", "#### 72")
    assert not exact_match("The answer is 71", "#### 72")
    assert not exact_match("I do not know", "#### 72")


def _examples(n=4):
    return read_pool(SAMPLES / "gsm8k_train.jsonl", limit=n).examples


def test_heldout_loss_matches_hand_computation(make_model, tokenizer):
    model = make_model("llama")
    examples = _examples(3)
    per_token_num, per_token_den, per_example = 0.0, 0, []
    for ex in examples:
        r = render_example(ex, tokenizer)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor(r.input_ids)[None]).logits[0].double(), -1)
        terms = [-float(logp[t - 1, r.input_ids[t]]) for t in range(1, len(r)) if r.response_mask[t]]
        per_token_num += sum(terms)
        per_token_den += len(terms)
        per_example.append(np.mean(terms))
    got = heldout_loss(model, tokenizer, examples, progress=False)
    assert got["tokens"] == per_token_den and got["examples"] == 3
    assert got["loss_per_token"] == pytest.approx(per_token_num / per_token_den, rel=1e-5)
    assert got["loss_per_example"] == pytest.approx(np.mean(per_example), rel=1e-5)
    small = heldout_loss(model, tokenizer, examples, max_tokens=64, progress=False)  # one per batch
    assert small["loss_per_token"] == pytest.approx(got["loss_per_token"], rel=1e-5)


MEDMCQA_ROW = {"question": "Concentration of tropicamide:", "realidx": "17360c6c",
               "options": {"A": "0.01", "B": "0.02", "C": "0.03", "D": "0.04"}, "answer_idx": "A", "answer": "0.01"}


def test_parse_choice_both_layouts(tmp_path):
    path = tmp_path / "medmcqa.jsonl"
    path.write_text(json.dumps(MEDMCQA_ROW) + "\n")
    c = parse_choice(read_pool(path).examples[0])
    assert c.letters == ["A", "B", "C", "D"] and c.options[1] == "0.02" and c.gold == "A"
    assert c.prompt[-1]["content"].endswith("C. 0.03\nD. 0.04")
    folded = read_pool(SAMPLES / "medqa.jsonl", limit=1).examples[0]
    c = parse_choice(folded)
    assert c.letters == ["A", "B", "C", "D"] and c.gold == "B"
    assert c.options[0] == "Disclose the error to the patient and put it in the operative report"
    assert c.prompt == folded.prompt  # options already listed in the question
    # medqa sample row 19 ends its question with a stray quote line after the options.
    odd = Example("q", "t", [{"role": "user", "content": 'Why?\nA. one\nB. two (2)\n"'}], 'B. two (2)\n"')
    c = parse_choice(odd)
    assert (c.letters, c.options, c.gold) == (["A", "B"], ["one", "two (2)"], "B")


def test_multiple_choice_matches_manual_scoring(make_model, tokenizer, tmp_path):
    model = make_model("llama")
    rows = [MEDMCQA_ROW, {"question": "Is the sky blue?", "options": {"A": "yes", "B": "no", "C": "maybe"},
                          "answer_idx": "B", "answer": "no"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_pool(path).examples
    res = choice_accuracy(model, tokenizer, examples, progress=False)
    hits, hits_norm = [], []
    for ex, got_scores in zip(examples, res["scores"]):
        c = parse_choice(ex)
        manual, per_char = [], []
        for letter, option in zip(c.letters, c.options):
            cand = Example("x", "mc", c.prompt, f"{letter}. {option}")
            r = render_example(cand, tokenizer)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor(r.input_ids)[None]).logits[0].double(), -1)
            total = sum(float(logp[t - 1, r.input_ids[t]]) for t in range(1, len(r)) if r.response_mask[t])
            manual.append(total)
            per_char.append(total / len(f"{letter}. {option}"))
        np.testing.assert_allclose(got_scores, manual, rtol=1e-5)
        hits.append(c.letters[int(np.argmax(manual))] == c.gold)
        hits_norm.append(c.letters[int(np.argmax(per_char))] == c.gold)
    assert res["accuracy"] == np.mean(hits) and res["accuracy_norm"] == np.mean(hits_norm)
    assert res["chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)


def test_multiple_choice_on_known_option_loglikelihoods(tokenizer, tmp_path, monkeypatch):
    """Accuracy by hand from stated option log-likelihoods. Question 1: the long right answer has
    the lower total (-6 < -2) but the higher per character (-6/30 > -2/5), so only accuracy_norm
    gets it; question 2: "B. not at all" wins both ways."""
    import mechsieve.evaluate.choice as choice

    rows = [{"question": "Which one?", "options": {"A": "the long and correct answer", "B": "no"},
             "answer_idx": "A", "answer": "the long and correct answer"},
            {"question": "Is it?", "options": {"A": "yes", "B": "not at all", "C": "maybe"},
             "answer_idx": "B", "answer": "not at all"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loglik = {"A. the long and correct answer": -6.0, "B. no": -2.0,
              "A. yes": -3.0, "B. not at all": -2.6, "C. maybe": -4.0}

    def known_logprobs(model, tok, items, *args, **kwargs):
        out = []
        for it in items:  # which option an item is, read from its response tokens
            option = tok.decode(it.input_ids[it.labels != -100], skip_special_tokens=True).strip()
            out.append(np.array([loglik[option] / 2, loglik[option] / 2]))  # two tokens: summed
        return out

    monkeypatch.setattr(choice, "label_logprobs", known_logprobs)
    res = choice_accuracy(None, tokenizer, read_pool(path).examples, progress=False)
    assert res["scores"] == [[-6.0, -2.0], [-3.0, -2.6, -4.0]]
    assert res["predictions"] == ["B", "B"] and res["gold"] == ["A", "B"]
    assert res["accuracy"] == 0.5 and res["accuracy_norm"] == 1.0
    assert res["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2) and res["examples"] == 2


def test_rouge_l_on_known_pairs():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = "the cat on the mat" (5 of 6 words).
    got = rouge_l(["the cat sat on the mat"], ["the cat is on the mat"], stemmer=False)
    assert got["rougeL_f1"] == pytest.approx(5 / 6)
    # 2 of 4 predicted words in order, 2 of 2 reference words: P = 1/2, R = 1, F = 2/3.
    got = rouge_l(["a b c d"], ["b d"], stemmer=False)
    assert (got["rougeL_precision"], got["rougeL_recall"], got["rougeL_f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert rouge_l(["x y"], ["x y"])["rougeL_f1"] == 1.0


def _chrf_reference(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF by its definition (Popović 2015): character n-gram precision and recall averaged over
    n = 1..6 (whitespace removed), then the F-beta score, x100."""
    hyp, ref = hyp.replace(" ", ""), ref.replace(" ", "")
    precs, recs = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        match = sum((h & r).values())
        precs.append(match / sum(h.values()))
        recs.append(match / sum(r.values()))
    p, r = np.mean(precs), np.mean(recs)
    return 100 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r) if p + r else 0.0


def test_chrf_on_known_pairs():
    assert chrf(["Das ist ein Test."], ["Das ist ein Test."])["chrf"] == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"])["chrf"] == 0.0
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    assert chrf([hyp], [ref])["chrf"] == pytest.approx(_chrf_reference(hyp, ref), rel=1e-9)


def test_batched_greedy_generation_equals_one_by_one(make_model, tokenizer):
    model = make_model("llama")
    examples = _examples(3)
    batched = generate_greedy(model, tokenizer, examples, max_new_tokens=6, progress=False)
    single = [generate_greedy(model, tokenizer, [ex], max_new_tokens=6, progress=False)[0] for ex in examples]
    assert batched == single and any(batched)


def test_tasks_read_through_the_readers(make_model, tokenizer):
    loaded = LoadedModel(make_model("llama"), tokenizer, {"kind": "test"})
    data = DataConfig(path=str(SAMPLES / "gsm8k_target.jsonl"), limit=3)
    loss = evaluate_task(loaded, TaskConfig(task="loss", data=data), progress=False)
    direct = heldout_loss(loaded.model, tokenizer, read_pool(SAMPLES / "gsm8k_target.jsonl", limit=3).examples,
                          progress=False)
    assert loss["metrics"]["loss_per_token"] == pytest.approx(direct["loss_per_token"])
    assert loss["name"] == "gsm8k_target-loss"


def test_exact_match_task_on_known_generations(make_model, tokenizer, monkeypatch):
    """The model really generates (the task's call is exercised), then known texts are scored
    against the references' answers 10, 34 and 5250: one hit, one wrong, one without a number."""
    import mechsieve.evaluate.generate as generate

    texts = ["The car went 10.0 meters.", "#### 35", "I cannot tell."]
    real, generated = generate.generate_greedy, []

    def known_texts(*args, **kwargs):
        generated.append(real(*args, **kwargs))
        return texts

    monkeypatch.setattr(generate, "generate_greedy", known_texts)
    loaded = LoadedModel(make_model("llama"), tokenizer, {"kind": "test"})
    data = DataConfig(path=str(SAMPLES / "gsm8k_target.jsonl"), limit=3)
    em = evaluate_task(loaded, TaskConfig(task="exact_match", data=data, max_new_tokens=4), progress=False,
                       keep_outputs=True)
    assert len(generated) == 1 and len(generated[0]) == 3
    assert em["metrics"] == {"accuracy": 1 / 3, "examples": 3, "no_answer": 1}
    assert em["outputs"]["extracted"] == ["10", "35", None]
    assert em["outputs"]["gold"] == ["10", "34", "5250"]
    assert em["outputs"]["generated"] == texts
