"""Prompt-only baselines for attribution benchmarks: can the label be read off the format?

An attribution method scored against planted labels is only interesting if the labels cannot be
recovered without the model. METHODS.md section 8: every attribution task reports a prompt-only
baseline, so that a format shortcut shows at once. Two are computed here, each reported with the
metrics of `evaluate.attribution.attribution_metrics` plus `above_base_rate = auc_pr - base_rate`:

- `bag_of_words`: a TF-IDF bag of words of the prompt text alone (never the response) and a
  logistic regression, with fixed settings (`BagOfWordsSettings`), scored out of fold: stratified
  K folds, seeded, the vectorizer and the classifier fitted on the other folds only, so no example
  is scored by a model that saw its label (scikit-learn's `cross_val_predict` protocol);
- `response_length`: the response's length in characters, longer first, nothing fitted.

`auc_pr` well above `base_rate` for either says the labels are given away by the prompt or by the
response's length, and a method's AUC-PR has to be read against it. Pure functions of texts and
labels; `prompt_only_baseline_for_pool` renders a pool's `Example`s to those texts.

Repeated prompts: when the same prompt text occurs several times with a fixed number of positives
among its copies (each question once planted, once clean), plain out-of-fold scores would hold a
positive copy out and leave fewer positive copies to train on, so the score would anti-correlate
with the label and AUC-PR read *below* the base rate. So when a prompt text occurs with both
labels, the folds are grouped by prompt text (scikit-learn's `StratifiedGroupKFold`): all copies
of a prompt are held out together and get one score, which the prompt alone cannot push either
way (`groups` in the result says how many texts carry both labels). A text repeated under one
label only keeps plain folds: there the prompt does predict the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mechsieve.config import ConfigError
from mechsieve.data.readers import DataError
from mechsieve.evaluate.attribution import attribution_metrics, average_precision

LENGTH_UNIT = "characters"


@dataclass(frozen=True)
class BagOfWordsSettings:
    """The fixed settings of the bag-of-words baseline (recorded in its result)."""

    token_pattern: str = r"(?u)\w+|[^\w\s]+"
    """Tokens: runs of word characters, and runs of punctuation, so that format marks such as
    `###`, `:` or a code fence count as words (scikit-learn's default pattern drops them and every
    one-character word)."""
    lowercase: bool = True
    """Lowercase the text before tokenising."""
    ngram_max: int = 2
    """Word n-grams of length 1..ngram_max (bigrams catch fixed phrasings like "Answer :")."""
    min_df: int = 1
    """Keep n-grams seen in at least this many prompts of a training fold."""
    sublinear_tf: bool = True
    """tf -> 1 + log(tf), so a word repeated many times does not dominate a prompt's vector."""
    c: float = 10.0
    """Inverse L2 strength of the logistic regression (scikit-learn's `C`). TF-IDF rows have unit
    length, so a word's weight needs room to grow: at C=1 a marker word that gives every label
    away was outweighed by chance correlations of other words on a 40-example pool (AUC-PR 0.97
    instead of 1); on label-independent prompts C=10 stays at the base rate as C=1 does."""
    class_weight: str | None = "balanced"
    """"balanced" weighs each class by 1 / its count: the rare planted class is not ignored, and
    every fold's model has the same (even) prior, so scores pooled across folds are comparable.
    None: unweighted."""
    max_iter: int = 1000
    """Iterations of the lbfgs solver."""

    def __post_init__(self) -> None:
        if self.ngram_max < 1:
            raise ConfigError(f"prompt baseline: ngram_max={self.ngram_max} must be >= 1")
        if self.min_df < 1:
            raise ConfigError(f"prompt baseline: min_df={self.min_df} must be >= 1 (a count of prompts)")
        if not self.c > 0:
            raise ConfigError(f"prompt baseline: c={self.c} must be > 0")
        if self.class_weight not in ("balanced", None):
            raise ConfigError(f"prompt baseline: class_weight={self.class_weight!r} must be one of ['balanced', None]")
        if self.max_iter < 1:
            raise ConfigError(f"prompt baseline: max_iter={self.max_iter} must be >= 1")


def _pipeline(settings: BagOfWordsSettings, seed: int) -> Any:
    """An unfitted TF-IDF -> logistic-regression pipeline under `settings`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    vectorizer = TfidfVectorizer(token_pattern=settings.token_pattern, lowercase=settings.lowercase,
                                 ngram_range=(1, settings.ngram_max), min_df=settings.min_df,
                                 sublinear_tf=settings.sublinear_tf)
    classifier = LogisticRegression(C=settings.c, class_weight=settings.class_weight,
                                    max_iter=settings.max_iter, random_state=seed)
    return make_pipeline(vectorizer, classifier)


def _has_tokens(texts: Sequence[str], settings: BagOfWordsSettings) -> bool:
    analyzer = _pipeline(settings, 0)[0].build_analyzer()
    return any(analyzer(t) for t in texts)


def text_groups(texts: Sequence[str], labels: np.ndarray) -> tuple[int, int, int]:
    """Distinct texts that occur with both labels, distinct texts with a positive copy, and
    distinct texts with a negative copy."""
    y = np.asarray(labels).astype(bool)
    x = np.asarray(list(texts), dtype=object).astype(str)
    pos, neg = set(x[y].tolist()), set(x[~y].tolist())
    return len(pos & neg), len(pos), len(neg)


def out_of_fold_scores(texts: Sequence[str], labels: np.ndarray, folds: int, seed: int = 0,
                       settings: BagOfWordsSettings | None = None) -> np.ndarray:
    """Bag-of-words logits of `texts` ([n] float64), each from the model fitted on the other folds.

    `folds` stratified folds, shuffled with `seed`; when a text occurs with both labels, grouped
    by text (every copy held out together); the caller makes sure each class has at least `folds` members (distinct
    texts, when grouped). A training fold whose prompts hold no token at all (all empty), or hold one
    class only, cannot fit: its held-out examples get the training fold's positive share as their score.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    settings = settings or BagOfWordsSettings()
    y = np.asarray(labels).astype(bool)
    x = np.asarray(list(texts), dtype=object)
    scores = np.empty(len(y), dtype=np.float64)
    if text_groups(texts, y)[0]:
        _, groups = np.unique(x.astype(str), return_inverse=True)
        splits = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)
    else:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    for train, test in splits:
        if not _has_tokens(x[train].tolist(), settings) or len(set(y[train].tolist())) < 2:
            scores[test] = float(y[train].mean())
            continue
        model = _pipeline(settings, seed).fit(x[train].tolist(), y[train])
        scores[test] = model.decision_function(x[test].tolist())
    return scores


def _with_margin(metrics: dict[str, Any]) -> dict[str, Any]:
    metrics["above_base_rate"] = metrics["auc_pr"] - metrics["base_rate"]
    return metrics


def _bag_of_words(prompts: Sequence[str], labels: np.ndarray, folds: int, seed: int, ks: Sequence[int],
                  settings: BagOfWordsSettings) -> dict[str, Any]:
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    recorded = {"folds_requested": folds, "seed": seed, "text": "prompt only",
                "vectorizer": {"kind": "tfidf", "token_pattern": settings.token_pattern,
                               "lowercase": settings.lowercase, "ngram_range": [1, settings.ngram_max],
                               "min_df": settings.min_df, "sublinear_tf": settings.sublinear_tf},
                "classifier": {"kind": "logistic_regression", "C": settings.c,
                               "class_weight": settings.class_weight, "max_iter": settings.max_iter}}
    if not _has_tokens(prompts, settings):
        return {"skipped": f"none of the {len(prompts)} prompts holds a token (token_pattern "
                           f"{settings.token_pattern!r}): the prompts are empty", **recorded}
    repeats, g_pos, g_neg = text_groups(prompts, labels)
    recorded["groups"] = (f"by prompt text ({repeats} texts carry both labels)" if repeats
                          else "none (no prompt text carries both labels)")
    if repeats:
        usable = min(folds, g_pos, g_neg)
        if usable < 2:
            return {"skipped": f"{g_pos} distinct prompts with a positive and {g_neg} with a negative: folds grouped "
                               "by prompt text need at least 2 of each, so no bag-of-words baseline is reported",
                    **recorded}
    else:
        usable = min(folds, n_pos, n_neg)
    if usable < 2:
        return {"skipped": f"{n_pos} positive and {n_neg} negative examples: scoring out of fold needs at least "
                           "2 of each (one to train on while the other is held out), so no bag-of-words "
                           "baseline is reported", **recorded}
    scores = out_of_fold_scores(prompts, labels, usable, seed, settings)
    out = _with_margin(attribution_metrics(scores, labels, ks=ks, method="prompt-only bag of words"))
    out.update(recorded, folds=usable)
    if usable < folds:
        have = (f"{g_pos} distinct prompts with a positive and {g_neg} with a negative" if repeats else
                f"{n_pos} positive and {n_neg} negative examples")
        out["note"] = (f"folds reduced from {folds} to {usable}: stratified folds need at least one example of "
                       f"each class per fold, and there are {have}")
    return out


def _response_length(responses: Sequence[str], labels: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    lengths = np.array([len(r) for r in responses], dtype=np.float64)
    out = _with_margin(attribution_metrics(lengths, labels, ks=ks, method="response length"))
    # a planted class may as well be the shorter one (cut answers): the reverse ranking's AUC-PR
    out["auc_pr_shorter_first"] = average_precision(-lengths, labels)
    out.update(unit=LENGTH_UNIT, order="longer first")
    return out


def prompt_only_baseline(prompts: Sequence[str], responses: Sequence[str], labels: np.ndarray, folds: int = 5,
                         seed: int = 0, ks: Sequence[int] = (10, 40, 100),
                         settings: BagOfWordsSettings | None = None) -> dict[str, dict[str, Any]]:
    """{"bag_of_words": metrics, "response_length": metrics} of the two prompt-only baselines.

    Each metrics dict is `attribution_metrics`'s (auc_pr, base_rate, n, positives, precision@k and
    recall@k for the k that fit) plus `above_base_rate` (auc_pr - base_rate). bag_of_words adds
    `folds` (used), `folds_requested`, `seed`, the vectorizer and classifier settings; with fewer
    positives or negatives than `folds` it uses as many folds as the rarer class has members (a
    `note` says so), and under 2 it is `{"skipped": why, ...settings}` instead of a number.
    response_length adds `unit` ("characters": `len(response)`), `order` and
    `auc_pr_shorter_first`. Without a single positive both are `{"skipped": why}`.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"prompt baseline: folds={folds!r} must be an integer >= 2")
    y = np.asarray(labels)
    if y.ndim != 1 or not len(prompts) == len(responses) == len(y):
        raise DataError(f"prompt baseline: {len(prompts)} prompts, {len(responses)} responses and labels of shape "
                        f"{y.shape}; one of each per example")
    y = y.astype(bool)
    settings = settings or BagOfWordsSettings()
    if not y.any():
        why = (f"none of the {len(y)} examples is labelled positive, so AUC-PR is undefined; check the label "
               "field (--label-field)")
        return {"bag_of_words": {"skipped": why}, "response_length": {"skipped": why}}
    return {"bag_of_words": _bag_of_words(list(prompts), y, int(folds), seed, ks, settings),
            "response_length": _response_length(list(responses), y, ks)}


def _content_text(content: Any) -> str:
    """A message's content as text: a string as it is, a list of parts by their `text`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_content_text(p.get("text") if isinstance(p, dict) else p) for p in content)
    return str(content)


def prompt_text(example: Any) -> str:
    """The prompt side of an `Example` as plain text: its messages' contents joined by newlines.

    System, user, tool and earlier assistant turns count (they are all prompt); roles, tool calls
    and the final response do not. A prompt given as one string is taken as it is. A hand-made
    prompt whose last message is an assistant turn repeating the response drops that turn, so the
    response never leaks into a prompt-only baseline.
    """
    prompt = example.prompt
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if messages and messages[-1].get("role") == "assistant" and \
            _content_text(messages[-1].get("content")) == example.response:
        messages = messages[:-1]
    return "\n".join(_content_text(m.get("content")) for m in messages)


def prompt_only_baseline_for_pool(examples: Sequence[Any], labels: np.ndarray, folds: int = 5, seed: int = 0,
                                  ks: Sequence[int] = (10, 40, 100), settings: BagOfWordsSettings | None = None
                                  ) -> dict[str, dict[str, Any]]:
    """`prompt_only_baseline` of a pool's `Example`s: prompts by `prompt_text`, responses as
    `Example.response` (its text; tool calls do not count toward its length)."""
    return prompt_only_baseline([prompt_text(ex) for ex in examples], [ex.response for ex in examples], labels,
                                folds=folds, seed=seed, ks=ks, settings=settings)

