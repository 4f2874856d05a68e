"""Final answers beyond GSM8K: LaTeX, `\\boxed{}`, fractions, equations and scientific notation.

The GSM8K reader (answers.py) takes the last number, so `\\boxed{\\frac{3}{4}}` reads as 4,
`x = 3/4` as 4 and `1e3` as 3. Here answers are parsed by math-verify (Hugging Face's parser and
grader behind open-r1 and lighteval's MATH metrics; the `math` extra): a `\\boxed{}` answer first,
else the last LaTeX or plain expression, into a sympy expression, and compared as math
(`0.75` == `\\frac{3}{4}`, `72.00` == `72`, to 6 decimals). Two steps are ours, around it:
- scientific notation (`1e3`, `2.5E-4`) is written out first, since math-verify reads `1e3` as 1;
- an equation's right-hand side is the answer (`x = \\frac{3}{4}` -> 3/4), as in MATH solutions.
A text with GSM8K's `####` marker has its answer after the last one, as in answers.py.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Any

from mechsieve.config import ConfigError
from mechsieve.evaluate.answers import normalize_number

INSTALL = "pip install 'mechsieve[math]' (or: pip install math-verify==0.9.0)"
_MARK = "####"
# A number in scientific notation, not part of a word, a hex literal or a longer number.
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d{1,2})(?![\w.])")
_TIMEOUT_S = 5


def require_math_verify() -> Any:
    """The `math_verify` module, or a ConfigError with the install command."""
    try:
        import math_verify
    except ImportError as err:
        raise ConfigError(f"eval.answer=math reads answers with math-verify, which is not installed: {INSTALL}; "
                          "or set eval.answer=gsm8k (numbers only)") from err
    return math_verify


def expand_scientific(text: str) -> str:
    """`text` with each number in scientific notation written out: `1e3` -> `1000`, `2.5E-4` -> `0.00025`."""
    def plain(m: re.Match[str]) -> str:
        try:
            value = Decimal(f"{m.group(1)}e{m.group(2)}")
        except InvalidOperation:
            return m.group(0)
        return format(value.normalize(), "f")

    return _SCIENTIFIC.sub(plain, text)


def _timeout() -> int | None:
    # math-verify's time limit is a SIGALRM, which only the main thread may set
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math_answer(text: str) -> Any | None:
    """The answer of `text` as a sympy expression (an equation gives its right-hand side), or None."""
    import sympy

    math_verify = require_math_verify()
    parts = [text]
    if _MARK in text:  # the answer after the last marker; with none there, the text before it
        before, after = text.rsplit(_MARK, 1)
        parts = [after, before]
    for part in parts:
        parsed = math_verify.parse(expand_scientific(part), parsing_timeout=_timeout())
        expr = next((p for p in parsed if not isinstance(p, str)), None)
        if expr is not None:
            if isinstance(expr, sympy.Equality):
                expr = expr.rhs
            return expr
    return None


def answer_text(expr: Any) -> str:
    """Canonical text of a parsed answer: `3/4`, `1000`, `0.75`, `sqrt(2)`, `x**2 + 1`."""
    import sympy

    if getattr(expr, "is_number", False):
        expr = expr.doit()  # unevaluated forms: 3 * 4**-1 -> 3/4, 10 * (1/100) -> 1/10
        if isinstance(expr, sympy.Float):
            return normalize_number(str(expr)) or str(expr)
    return str(expr)


def extract_math_answer(text: str) -> str | None:
    """The final answer of `text` as canonical text (`\\boxed{\\frac{3}{4}}` -> `3/4`), or None."""
    expr = parse_math_answer(text)
    return None if expr is None else answer_text(expr)


def math_match(prediction: str, reference: str) -> bool:
    """Whether the answers of `prediction` and `reference` are equal as math (math-verify's grader)."""
    gold, pred = parse_math_answer(reference), parse_math_answer(prediction)
    if gold is None or pred is None:
        return False
    return bool(require_math_verify().verify(gold, pred, timeout_seconds=_timeout()))
