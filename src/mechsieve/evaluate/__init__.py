"""Task metrics: held-out loss, exact match, multiple choice, ROUGE-L, chrF."""

from mechsieve.evaluate.answers import exact_match, extract_answer, last_number, normalize_number
from mechsieve.evaluate.choice import Choice, choice_accuracy, parse_choice
from mechsieve.evaluate.generate import generate_greedy
from mechsieve.evaluate.loss import heldout_loss, label_logprobs
from mechsieve.evaluate.math_answers import extract_math_answer, math_match
from mechsieve.evaluate.tasks import PRIMARY, TASKS, TaskConfig, evaluate_task
from mechsieve.evaluate.text_metrics import chrf, rouge_l

__all__ = ["PRIMARY", "TASKS", "Choice", "TaskConfig", "choice_accuracy", "chrf", "evaluate_task", "exact_match",
           "extract_answer", "extract_math_answer", "generate_greedy", "heldout_loss", "label_logprobs",
           "last_number", "math_match", "normalize_number", "parse_choice", "rouge_l"]



def __getattr__(name: str):
    # Attribution metrics live in evaluate/attribution.py (another stage's module); names not found
    # here are looked up there lazily, so `from mechsieve.evaluate import average_precision` works.
    import importlib

    if name.startswith("__") or name == "attribution":
        raise AttributeError(f"module 'mechsieve.evaluate' has no attribute {name!r}")
    attribution = importlib.import_module("mechsieve.evaluate.attribution")
    try:
        return getattr(attribution, name)
    except AttributeError:
        raise AttributeError(f"module 'mechsieve.evaluate' has no attribute {name!r}") from None
