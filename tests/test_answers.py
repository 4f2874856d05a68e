"""Answers beyond GSM8K: LaTeX / boxed / fraction / scientific answers through math-verify
(`answer: math`), and GSM8K's reading unchanged."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import write_jsonl
from mechsieve.config import ConfigError
from mechsieve.data.readers import DataConfig
from mechsieve.evaluate import TaskConfig, evaluate_task, exact_match, extract_answer
from mechsieve.evaluate.math_answers import expand_scientific, extract_math_answer, math_match

CASES = [  # text, GSM8K reading (today's, kept), math reading
    (r"\boxed{\frac{3}{4}}", "4", "3/4"),
    ("x = 3/4", "4", "3/4"),
    ("1e3", "3", "1000"),
    ("#### 72", "72", "72"),
]


@pytest.mark.parametrize("text,gsm8k,math", CASES)
def test_math_answers_read_latex_fractions_and_scientific(text, gsm8k, math):
    assert extract_math_answer(text) == math
    assert extract_answer(text) == gsm8k  # the GSM8K reader is unchanged


@pytest.mark.parametrize("text,expected", [
    (r"so $x = \frac{3}{4}$", "3/4"),  # an equation's right-hand side
    (r"The total is $\dfrac{-3}{4}$, i.e. \boxed{0.75}", "0.75"),  # boxed wins over what precedes it
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K's marker still holds the answer
    ("#### \nthe total was 9", "9"),  # a marker with nothing after it: the text before
    ("2.5E-4 grams", "0.00025"),
    ("The answer is 72.00", "72"),
    ("I do not know", None),
    ("", None),
])
def test_math_answer_extraction(text, expected):
    assert extract_math_answer(text) == expected


def test_scientific_notation_is_written_out_only_where_it_is_a_number():
    assert expand_scientific("1e3 and 2.5E-4, 7e+2") == "1000 and 0.00025, 700"
    assert expand_scientific("x1e3, 0x1e3, e3, 1e3x, \\1e3, 1e400") == "x1e3, 0x1e3, e3, 1e3x, \\1e3, 1e400"


def test_math_match_compares_as_math():
    assert math_match(r"\boxed{\frac{3}{4}}", "0.75")
    assert math_match("x = 3/4", r"The answer is $\boxed{\frac{3}{4}}$.")
    assert math_match("1e3", "...\n#### 1,000")
    assert math_match("The answer is 72.00", "#### 72")
    assert not math_match(r"\boxed{\frac{3}{5}}", "0.75")
    assert not math_match("I do not know", "#### 72")
    # the GSM8K reader, for contrast: 3/4 reads as 4 on both sides
    assert exact_match(r"\boxed{\frac{1}{4}}", "#### 4") and not exact_match(r"\boxed{\frac{3}{4}}", "0.75")


def _pool(tmp_path):
    rows = [{"question": "Three quarters?", "answer": r"The answer is $\boxed{\frac{3}{4}}$."},
            {"question": "x?", "answer": "so x = 3/4"},
            {"question": "A thousand?", "answer": "1e3"},
            {"question": "Clips?", "answer": "48 + 24 = 72\n#### 72"}]
    return write_jsonl(tmp_path / "answers.jsonl", rows)


def test_evaluate_task_answer_setting(loaded, tmp_path, monkeypatch):
    import mechsieve.evaluate.generate as generate

    generations = ["0.75", r"$x = \frac{3}{4}$", "1000", "The answer is 72."]
    monkeypatch.setattr(generate, "generate_greedy", lambda *a, **k: list(generations))
    data = DataConfig(path=str(_pool(tmp_path)))
    math = evaluate_task(loaded, TaskConfig(task="exact_match", data=data, answer="math"),
                         progress=False, keep_outputs=True)
    assert math["metrics"]["accuracy"] == 1.0 and math["answer"] == "math"
    assert math["outputs"]["gold"] == ["3/4", "3/4", "1000", "72"]
    assert math["outputs"]["extracted"] == ["0.75", "3/4", "1000", "72"]
    gsm8k = evaluate_task(loaded, TaskConfig(task="exact_match", data=data), progress=False, keep_outputs=True)
    assert gsm8k["answer"] == "gsm8k" and gsm8k["outputs"]["gold"] == ["4", "4", "3", "72"]
    # 72 matches, and the two 3/4s only as 4 == 4; 0.75 (vs 4) and 1000 (vs 3) miss
    assert gsm8k["metrics"]["accuracy"] == 0.5 and gsm8k["outputs"]["extracted"] == ["0.75", "4", "1000", "72"]


def test_cli_evaluate_answer_math(model_dir, tmp_path):
    from mechsieve.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", "--task", "exact_match", "--answer", "math", "--pool", str(_pool(tmp_path)),
                 "--model", str(model_dir), "--max-new-tokens", "2", "--quiet", "--out", str(out)]) == 0
    outputs = json.loads((out / "outputs.json").read_text())
    (name,) = outputs
    assert outputs[name]["gold"] == ["3/4", "3/4", "1000", "72"]
    assert json.loads((out / "metrics.json").read_text())["results"][0]["answer"] == "math"


def test_answer_setting_errors(tmp_path, monkeypatch, capsys, model_dir):
    from mechsieve.cli import main

    data = DataConfig(path=str(_pool(tmp_path)))
    with pytest.raises(ConfigError, match=r"eval\.answer.*'latex'.*gsm8k.*math"):
        TaskConfig(task="exact_match", data=data, answer="latex")
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if the `math` extra were not installed
    with pytest.raises(ConfigError, match=r"eval\.answer=math .*math-verify.*pip install 'mechsieve\[math\]'"):
        TaskConfig(task="exact_match", data=data, answer="math")
    TaskConfig(task="loss", data=data, answer="math")  # irrelevant to loss: no dependency needed
    code = main(["evaluate", "--task", "exact_match", "--answer", "math", "--pool", data.path,
                 "--model", str(model_dir), "--quiet", "--out", str(tmp_path / "ev")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pip install math-verify==0.9.0" in err
    assert not (tmp_path / "ev").exists()  # refused before any output or model
    assert main(["evaluate", "--answer", "math", "--model", str(model_dir), "--out", str(tmp_path / "ev")]) == 2
    assert "--answer goes with --task exact_match" in capsys.readouterr().err
