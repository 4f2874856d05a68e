"""ROUGE-L for summaries (Lin 2004, via Google's `rouge-score`) and chrF for translation
(Popović 2015, via `sacrebleu`): the maintained reference implementations, not re-derivations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def rouge_l(predictions: Sequence[str], references: Sequence[str], stemmer: bool = True) -> dict[str, Any]:
    """Mean ROUGE-L F1 / precision / recall over pairs (0..1), longest common subsequence of words."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)
    scores = [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references)]
    n = len(scores)
    return {
        "rougeL_f1": sum(s.fmeasure for s in scores) / n if n else float("nan"),
        "rougeL_precision": sum(s.precision for s in scores) / n if n else float("nan"),
        "rougeL_recall": sum(s.recall for s in scores) / n if n else float("nan"),
        "examples": n,
    }


def chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus chrF (0..100, character 6-grams, beta = 2) and the mean sentence chrF."""
    import sacrebleu

    _same_length(predictions, references)
    corpus = sacrebleu.corpus_chrf(list(predictions), [list(references)])
    sentences = [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(predictions, references)]
    return {"chrf": float(corpus.score),
            "chrf_sentence_mean": sum(sentences) / len(sentences) if sentences else float("nan"),
            "examples": len(sentences)}


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
