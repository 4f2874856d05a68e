"""Final-answer extraction for exact-match tasks (GSM8K and other numeric answers).

GSM8K (Cobbe et al. 2021) ends each reference solution with `#### N`. A generation's answer is
the number after its last `####` when it has one, else the last number in the text (the common
fallback of lm-eval-harness' "flexible extract"). Numbers are compared as values: thousands
separators, currency signs, trailing periods and `72.0` vs `72` do not matter.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A minus sign counts only when it does not follow a word character ("10-20" is a range).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?\s?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\$?\.\d+")
_MARK = "####"


def _clean(token: str) -> str:
    return token.replace("$", "").replace(",", "").replace(" ", "")


def normalize_number(text: str | None) -> str | None:
    """Canonical text of a number (`"1,234.50"` -> `"1234.5"`), or None when it is not one."""
    if text is None:
        return None
    raw = _clean(text.strip()).rstrip(".")
    if raw.endswith("%"):
        raw = raw[:-1]
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value, "f")


def last_number(text: str) -> str | None:
    """The last number written in `text`, normalised, or None."""
    found = _NUMBER.findall(text)
    for candidate in reversed(found):
        norm = normalize_number(candidate)
        if norm is not None:
            return norm
    return None


def extract_answer(text: str) -> str | None:
    """The answer of a solution: the number after the last `####`, else the last number."""
    if _MARK in text:
        tail = text.rsplit(_MARK, 1)[1]
        first = _NUMBER.search(tail)
        if first is not None:
            return normalize_number(first.group(0))
        # `####` followed by no number: fall back to the text before it.
        text = text.rsplit(_MARK, 1)[0]
    return last_number(text)


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the extracted answers of `prediction` and `reference` are the same number."""
    pred, gold = extract_answer(prediction), extract_answer(reference)
    return pred is not None and pred == gold
