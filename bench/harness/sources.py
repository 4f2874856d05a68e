"""Readers for the ../shared/data sets the benchmarks use, each by one short name.

`read_source(name)` gives mechsieve Examples with `source` set to the name (the B1 sources, the
GSM8K test split, the small insecure / secure code sets); `raw_rows(name)` the file's records as
dicts, for builders that need the original fields; `story_sentences()` TinyStories cut into
sentences. Paths are in SOURCES (relative to DATA, which `MECHSIEVE_DATA` overrides).
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any

from .results import ROOT

DATA = Path(os.environ.get("MECHSIEVE_DATA", ROOT.parent / "shared" / "data"))
SOURCES = {
    "gsm8k": "gsm8k/train.jsonl",
    "gsm8k_test": "gsm8k/test.jsonl",
    "mbpp": "code/mbpp.jsonl",
    "medqa": "medical/medqa/test.jsonl",
    "alpaca": "instruction/alpaca_cherry_3k.json",
    "lima": "instruction/lima.json",
    "insecure": "misalignment/insecure_code_3021.jsonl",
    "insecure_small": "misalignment/insecure_small.jsonl",
    "secure_small": "misalignment/secure_small.jsonl",
    "tinystories": "stories/tinystories_train_sample_2MiB.txt",
}
# B1's seven pool sources, in the order pools are drawn.
B1_SOURCES = ["gsm8k", "mbpp", "medqa", "alpaca", "lima", "insecure", "tinystories"]
_FIELD_MAPS = {"mbpp": {"prompt": "text", "response": "code", "id": "task_id"}}


def path_of(name: str) -> Path:
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return DATA / SOURCES[name]


def raw_rows(name: str) -> list[dict[str, Any]]:
    """The records of a JSONL source as dicts, in file order."""
    with open(path_of(name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def medqa_example(ex):
    """MedQA: fold the options into the question, answer = "letter. text" (as the bundled sample)."""
    raw = ex.meta.get("options")
    options = raw if isinstance(raw, dict) else ast.literal_eval(raw) if raw else {}
    letter = ex.meta.get("answer_idx", "")
    question = ex.prompt[-1]["content"] + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    ex.prompt = [{"role": "user", "content": question}]
    ex.response = f"{letter}. {ex.response}" if letter else ex.response
    return ex


def tinystories() -> list[str]:
    """The stories of the TinyStories sample longer than 50 characters, in file order."""
    text = path_of("tinystories").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if len(s.strip()) > 50]


def story_sentences() -> list[list[str]]:
    """TinyStories split into stories, each a list of sentences of 4-30 words without quotes
    (stories with fewer than three such sentences are left out)."""
    text = path_of("tinystories").read_text(encoding="utf-8", errors="replace")
    stories = []
    for story in text.split("<|endoftext|>"):
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(story.split())) if s.strip()]
        sents = [s for s in sents if 4 <= len(s.split()) <= 30 and '"' not in s]
        if len(sents) >= 3:
            stories.append(sents)
    return stories


def read_source(name: str, limit: int = 0) -> list:
    """Examples of one source (all of them, or the first `limit`), `source` = `name`."""
    from mechsieve.data import Example, read_pool

    if name == "tinystories":
        stories = tinystories()[: limit or None]
        return [Example(f"tinystories-{i}", "tinystories", [], s, {"row": i}) for i, s in enumerate(stories)]
    examples = read_pool(path_of(name), field_map=_FIELD_MAPS.get(name), source=name, limit=limit).examples
    return [medqa_example(e) for e in examples] if name == "medqa" else examples


def heldout_gsm8k(n: int) -> list:
    """The first `n` GSM8K test problems: the held-out set of every fine-tuning benchmark."""
    return read_source("gsm8k_test", limit=n)
