"""Multiple-choice accuracy by option log-likelihood (MedQA, MedMCQA, PubMedQA and the like).

Each option becomes a candidate response to the same prompt (the question with its options
listed); the prediction is the option whose response tokens have the highest total
log-probability (`accuracy`), or the highest log-probability per character of the option text
(`accuracy_norm`, lm-eval-harness' acc_norm, which removes the bias towards short options).
Response tokens are the ones training sees, the end-of-turn marker included, so the scores are
those of the model answering in its chat format.

Two layouts are read (both arrive through `read_pool`, format question_answer):
- `options` {"A": text, ...} and `answer_idx` "B" kept in `Example.meta` (the files in
  shared/data/medical: medqa, medmcqa, pubmedqa);
- options folded into the question as trailing `A. text` lines and the answer as `B. text`
  or `B` (the bundled medqa sample).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mechsieve.data.readers import DataError
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig
from mechsieve.evaluate.loss import label_logprobs
from mechsieve.train.items import items_from_examples

_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.):]\s+(.+?)\s*$")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-J])(?:[.):]|\s|$)")


@dataclass
class Choice:
    """A multiple-choice question: prompt messages, option letters and texts, the gold letter."""

    prompt: list[dict[str, str]]
    letters: list[str]
    options: list[str]
    gold: str


def parse_choice(ex: Example) -> Choice:
    """Options and gold answer of an example in either layout (see module docstring); DataError
    naming the example when it has no question, no options, or an answer that is none of them."""
    if not ex.prompt:
        raise DataError(f"example {ex.id}: no prompt; multiple choice needs a question")
    question = ex.prompt[-1]["content"]
    opts = ex.meta.get("options")
    if isinstance(opts, dict) and opts:
        letters = sorted(opts)
        options = [str(opts[k]) for k in letters]
        listed = question.rstrip() + "\n" + "\n".join(f"{k}. {v}" for k, v in zip(letters, options))
        prompt = [*ex.prompt[:-1], {"role": ex.prompt[-1]["role"], "content": listed}]
    else:
        lines = question.rstrip().split("\n")
        while lines and not any(ch.isalnum() for ch in lines[-1]):
            lines.pop()  # stray trailing quote or blank lines after the options
        found: list[tuple[str, str]] = []
        for line in reversed(lines):
            m = _OPTION_LINE.match(line)
            if not m:
                break
            found.append((m.group(1), m.group(2)))
        if len(found) < 2:
            raise DataError(f"example {ex.id}: no options found (neither meta.options nor trailing "
                            "'A. text' lines in the question); multiple_choice needs a record field `options` "
                            "{\"A\": text, ...}, or options listed at the end of the question")
        found.reverse()
        letters, options = [f[0] for f in found], [f[1] for f in found]
        prompt = list(ex.prompt)
    gold = str(ex.meta.get("answer_idx") or "").strip()
    if gold not in letters:
        m = _LEADING_LETTER.match(ex.response)
        if m and m.group(1) in letters:
            gold = m.group(1)
        else:
            by_text = [k for k, v in zip(letters, options) if v.strip() == ex.response.strip()]
            if not by_text:
                raise DataError(f"example {ex.id}: answer {ex.response[:60]!r} matches no option letter or text "
                                f"(options {letters}); give the gold letter in `answer_idx` or as the answer")
            gold = by_text[0]
    return Choice(prompt, letters, options, gold)


def candidate_text(letter: str, option: str, target: str) -> str:
    if target == "letter":
        return letter
    if target == "text":
        return option
    return f"{letter}. {option}"


def choice_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], render_cfg: RenderConfig | None = None,
                    target: Literal["letter_text", "letter", "text"] = "letter_text", max_tokens: int = 4096,
                    progress: bool = True) -> dict[str, Any]:
    """Accuracy (sum log-prob) and accuracy_norm (log-prob per character) over `examples`.

    Returns also `predictions` (letter by sum), `gold`, and per-example option scores
    `scores[i] = [sum log-prob of option k]`.
    """
    choices = [parse_choice(ex) for ex in examples]
    candidates, owner = [], []
    for i, c in enumerate(choices):
        for letter, option in zip(c.letters, c.options):
            candidates.append(Example(f"{examples[i].id}:{letter}", examples[i].source, c.prompt,
                                      candidate_text(letter, option, target)))
            owner.append(i)
    items = items_from_examples(candidates, tokenizer, render_cfg)
    logprobs = label_logprobs(model, tokenizer, items, max_tokens, progress, desc="options")
    sums = np.array([lp.sum() for lp in logprobs])
    chars = np.array([max(len(c.response), 1) for c in candidates], dtype=np.float64)
    owner_arr = np.asarray(owner)
    predictions, predictions_norm, scores = [], [], []
    for i, c in enumerate(choices):
        at = np.flatnonzero(owner_arr == i)
        scores.append(sums[at].tolist())
        predictions.append(c.letters[int(np.argmax(sums[at]))])
        predictions_norm.append(c.letters[int(np.argmax(sums[at] / chars[at]))])
    gold = [c.gold for c in choices]
    n = len(choices)
    return {
        "accuracy": float(np.mean([p == g for p, g in zip(predictions, gold)])) if n else float("nan"),
        "accuracy_norm": float(np.mean([p == g for p, g in zip(predictions_norm, gold)])) if n else float("nan"),
        "examples": n,
        "chance": float(np.mean([1 / len(c.letters) for c in choices])) if n else float("nan"),
        "predictions": predictions,
        "gold": gold,
        "scores": scores,
    }
