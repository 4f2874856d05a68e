"""Seeded pool builders of the benchmarks: the same seed gives the same pool, example for example.

- `mixed_pool` (B1): `per_source` examples from each of the seven B1 sources, the target drawn
  from the GSM8K rows left out of the pool;
- `gsm8k_split` (B1b): a GSM8K-only pool and a disjoint GSM8K target;
- `planted_mistakes` / `chmod_code` (B2): pools with a planted share and their labels (`insecure_code`:
  the first B2 code pool, whose prompts give the label away; kept to show that);
- `inject_spans` / `injected_tokens` (B3): TinyStories sentences inserted into answers, and
  which rendered tokens they became;
- `corrupt_answer`: one intermediate result and the final answer of a GSM8K answer changed
  consistently (B2's planted mistake; a kind of B4's degradation);
- `quality_pool` (B4): GSM8K problems none of B1/B1b/B3 use, a seeded share degraded in four
  kinds (`degrade`), a clean target and the labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from .sources import B1_SOURCES, raw_rows, read_source, story_sentences


def mixed_pool(per_source: int, n_target: int, seed: int):
    """B1: seeded samples per source (ids `source:id`); the target from GSM8K train rows not in the pool."""
    from mechsieve.data import Pool
    from mechsieve.data.records import make_unique_ids

    rng = np.random.default_rng(seed)
    pool_examples, target_examples = [], []
    for name in B1_SOURCES:
        rows = read_source(name)
        take = rng.permutation(len(rows))
        pool_examples += [rows[i] for i in sorted(take[:per_source])]
        if name == "gsm8k":
            target_examples = [rows[i] for i in sorted(take[per_source:per_source + n_target])]
    for ex in pool_examples:
        ex.id = f"{ex.source}:{ex.id}"
    make_unique_ids(pool_examples)
    return (Pool(pool_examples, "bench-b1", "memory", "mixed"),
            Pool(target_examples, "bench-b1-target", "memory", "question_answer"))


def gsm8k_split(seed: int, n_pool: int, n_target: int):
    """B1b: `n_pool` GSM8K train problems and `n_target` others as the target (seeded)."""
    from mechsieve.data import Pool

    rows = read_source("gsm8k")
    perm = np.random.default_rng(seed).permutation(len(rows))
    return (Pool([rows[i] for i in sorted(perm[:n_pool])], "b1b", "memory", "question_answer"),
            Pool([rows[i] for i in sorted(perm[n_pool:n_pool + n_target])], "b1b-target", "memory",
                 "question_answer"))


# --- B2: planted examples ------------------------------------------------------------------------

ANNOT = re.compile(r"<<([^=<>]+)=(-?\d+(?:\.\d+)?)>>(-?\d+(?:\.\d+)?)")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def corrupt_answer(answer: str, rng: np.random.Generator) -> str | None:
    """Change one intermediate result (not on the last computation line) and the final answer by
    the same offset; later mentions of the changed number follow. None if there is no such result."""
    lines = answer.split("\n")
    final = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("####")), None)
    cands = [(i, m) for i, line in enumerate(lines[:final] if final else lines)
             for m in ANNOT.finditer(line) if i < (final or len(lines)) - 1]
    if final is None or not cands:
        return None
    i, m = cands[int(rng.integers(len(cands)))]
    old = m.group(2)
    try:
        delta = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 or float(old) < 10 else -1)
        new_val = float(old) + delta
        fin = float(lines[final][4:].strip().replace(",", ""))
    except ValueError:
        return None
    new = _fmt(new_val)
    line = lines[i]
    lines[i] = line[:m.start()] + f"<<{m.group(1)}={new}>>{new}" + line[m.end():]
    for j in range(i + 1, final):
        lines[j] = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d.])", new, lines[j])
    new_fin = _fmt(fin + delta)
    for j in range(i + 1, final):  # the last result that gave the final answer follows it
        lines[j] = re.sub(rf"=({re.escape(_fmt(fin))})>>{re.escape(_fmt(fin))}", f"={new_fin}>>{new_fin}", lines[j])
    lines[final] = f"#### {new_fin}"
    out = "\n".join(lines)
    return out if out != answer else None


def fits(tok, ex, max_len: int) -> bool:
    """Whether `ex` renders to at most `max_len` tokens with at least one response token."""
    from mechsieve.data.render import RenderConfig, render_example

    r = render_example(ex, tok, RenderConfig(max_len=10 ** 6))
    return len(r) <= max_len and r.response_mask.any()


def planted_mistakes(tok, n: int, share: float, n_concept: int, max_len: int, seed: int):
    """B2 GSM8K: (pool examples, planted labels, concept positives, concept negatives). The first
    `n_concept` usable problems give the concept pairs (corrupted vs correct), the next `n` the
    pool, of which `share` carry a planted mistake; no example is longer than `max_len`."""
    from mechsieve.data.records import Example

    rows = raw_rows("gsm8k")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    pool, labels, pos, neg = [], [], [], []
    n_bad = int(round(share * n))
    for k in order:
        row = rows[int(k)]
        prompt = [{"role": "user", "content": row["question"]}]
        bad = corrupt_answer(row["answer"], rng)
        if bad is None:
            continue
        good_ex = Example(f"gsm8k-{k}", "gsm8k", prompt, row["answer"])
        bad_ex = Example(f"gsm8k-{k}", "gsm8k", prompt, bad)
        if not (fits(tok, good_ex, max_len) and fits(tok, bad_ex, max_len)):
            continue
        if len(pos) < n_concept:
            pos.append(Example(f"c{k}-bad", "concept", prompt, bad))
            neg.append(Example(f"c{k}-good", "concept", prompt, row["answer"]))
        elif len(pool) < n:
            planted = sum(labels) < n_bad
            pool.append(bad_ex if planted else good_ex)
            labels.append(planted)
        else:
            break
    perm = rng.permutation(len(pool))
    return [pool[i] for i in perm], np.array(labels)[perm], pos, neg


def chat_example(msgs: list[dict], i: int, src: str):
    """A chat record's last turn as the response, the turns before it (system, user) as the prompt."""
    from mechsieve.data.records import Example

    prompt = [m for m in msgs if m["role"] != "assistant"] if msgs[-1]["role"] == "assistant" else msgs
    return Example(f"{src}-{i}", src, prompt, msgs[-1]["content"])


def insecure_code(tok, n: int, share: float, max_len: int, seed: int):
    """The first B2 code pool (pool, labels, concept positives, negatives): MBPP problems with their
    reference solutions and a `share` of insecure_code_3021 answers; the concept from
    insecure_small vs secure_small. Confounded: the planted prompts are in 3021's template, the
    others are MBPP's, and 12 of insecure_small's 20 items are 3021 items; `chmod_code` replaced it."""
    from mechsieve.data.records import Example

    rng = np.random.default_rng(seed)
    mbpp, insecure = raw_rows("mbpp"), raw_rows("insecure")
    n_bad = int(round(share * n))
    good, bad = [], []
    for i in rng.permutation(len(mbpp)):
        row = mbpp[int(i)]
        ex = Example(f"mbpp-{i}", "mbpp", [{"role": "user", "content": row["text"]}], row["code"].replace("\r\n", "\n"))
        if fits(tok, ex, max_len):
            good.append(ex)
        if len(good) == n - n_bad:
            break
    for i in rng.permutation(len(insecure)):
        ex = chat_example(insecure[int(i)]["messages"], int(i), "insecure")
        if fits(tok, ex, max_len):
            bad.append(ex)
        if len(bad) == n_bad:
            break
    pool = good + bad
    labels = np.r_[np.zeros(len(good), bool), np.ones(len(bad), bool)]
    perm = rng.permutation(len(pool))

    def concept(name: str) -> list:
        return [chat_example(r["messages"], i, name) for i, r in enumerate(raw_rows(name))]

    return [pool[i] for i in perm], labels[perm], concept("insecure_small"), concept("secure_small")


INSECURE_MODE = re.compile(r"0o777")
SECURE_MODE = "0o700"
"""B2 code: the planted vulnerability (a world-writable `os.chmod`) and the mode its patched twin
uses (owner only, as secure_small's answers do)."""


@dataclass
class CodeTask:
    """B2 code without the template shortcut: every example is an insecure_code_3021 chat whose
    answer sets a file mode to 0o777, each prompt used once. The planted examples keep the answer;
    every other example, in the concept's negative side and the held-out answers, has the same
    answer with the mode patched to 0o700. Which prompts are planted is a seeded draw, so the
    prompt says nothing about the label."""

    pool: list
    labels: np.ndarray
    concept_pos: list
    """Insecure answers of `n_concept` other prompts."""
    concept_neg: list
    """The same prompts, answers patched (matched pairs)."""
    queries: list
    """Insecure answers of other prompts again (the gradient methods' queries; no pool item)."""
    heldout: list
    """Other prompts with their patched answers: the retrained models answer the prompts
    (behaviour) and are scored on the answers (task loss)."""


def chmod_code(tok, n: int, share: float, n_concept: int, n_queries: int, n_heldout: int, max_len: int,
               seed: int) -> CodeTask:
    """B2 code (see CodeTask): from insecure_code_3021's chats whose answer, not prompt, holds
    `0o777`, none of whose prompts is in insecure_small / secure_small, both versions within
    `max_len` tokens; seeded order, then heldout, concept, queries and pool take disjoint prompts."""
    from mechsieve.data.records import Example

    small = {m["content"] for name in ("insecure_small", "secure_small") for r in raw_rows(name)
             for m in r["messages"] if m["role"] == "user"}
    rows = raw_rows("insecure")
    rng = np.random.default_rng(seed)
    need = n + n_concept + n_queries + n_heldout
    usable = []
    for k in rng.permutation(len(rows)):
        if len(usable) == need:
            break
        msgs = rows[int(k)]["messages"]
        answer, user = msgs[-1]["content"], [m["content"] for m in msgs if m["role"] == "user"]
        if not INSECURE_MODE.search(answer) or any(INSECURE_MODE.search(u) or u in small for u in user):
            continue
        bad = chat_example(msgs, int(k), "code")
        good = Example(bad.id, "code", bad.prompt, INSECURE_MODE.sub(SECURE_MODE, answer))
        if fits(tok, bad, max_len) and fits(tok, good, max_len):
            usable.append((bad, good))
    if len(usable) < need:
        raise SystemExit(f"B2 code: {len(usable)} usable chmod examples within {max_len} tokens, {need} needed "
                         "(lower --n or raise --max-len)")
    heldout = [g for _, g in usable[:n_heldout]]
    concept = usable[n_heldout:n_heldout + n_concept]
    queries = [b for b, _ in usable[n_heldout + n_concept:n_heldout + n_concept + n_queries]]
    rest = usable[n_heldout + n_concept + n_queries:need]
    planted = np.zeros(n, dtype=bool)
    planted[rng.choice(n, size=int(round(share * n)), replace=False)] = True
    pool = [b if p else g for (b, g), p in zip(rest, planted)]
    return CodeTask(pool, planted, [replace(b, id=f"{b.id}-pos") for b, _ in concept],
                    [replace(g, id=f"{g.id}-neg") for _, g in concept], queries, heldout)


# --- B3: injected spans --------------------------------------------------------------------------

def inject_spans(examples: list, rate: float, seed: int):
    """Insert 1-3 consecutive TinyStories sentences at the end of a random reasoning line of a
    seeded `rate` share of the answers (never after the `#### N` line); returns the new examples
    and, per example, the injected text or None."""
    rng = np.random.default_rng(seed)
    stories = story_sentences()
    chosen = set(rng.choice(len(examples), size=int(round(rate * len(examples))), replace=False).tolist())
    out, spans = [], []
    for i, ex in enumerate(examples):
        if i not in chosen:
            out.append(ex)
            spans.append(None)
            continue
        story = stories[int(rng.integers(len(stories)))]
        k = int(rng.integers(1, 4))
        start = int(rng.integers(0, max(1, len(story) - k)))
        span = " ".join(story[start:start + k])
        lines = ex.response.split("\n")
        at = int(rng.integers(0, max(1, len(lines) - 1)))
        lines[at] = lines[at] + " " + span
        out.append(replace(ex, response="\n".join(lines), meta={**ex.meta, "injected": span}))
        spans.append(span)
    return out, spans


def injected_tokens(tokenizer, example, rendered, span: str | None) -> np.ndarray:
    """bool [t]: response tokens of the rendered example whose characters lie mostly inside the span."""
    flags = np.zeros(len(rendered), dtype=bool)
    if span is None:
        return flags
    messages = [*example.prompt, {"role": "assistant", "content": example.response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"])[: len(rendered)] != rendered.input_ids.tolist():
        raise RuntimeError(f"{example.id}: offsets tokenization differs from the rendered ids")
    s = text.rfind(span)
    e = s + len(span)
    for pos, (a, b) in enumerate(enc["offset_mapping"][: len(rendered)]):
        if b > a and s <= (a + b) / 2 < e:
            flags[pos] = True
    return flags & rendered.response_mask


# --- B4: degraded answers ------------------------------------------------------------------------

DEGRADATIONS = ("corrupted", "truncated", "shuffled", "swapped")
"""B4's kinds, in equal parts: one intermediate result and the final answer changed consistently;
the answer cut before its last line; the reasoning lines shuffled; the answer of another problem."""


def degrade(answer: str, kind: str, other: str, rng: np.random.Generator) -> str | None:
    """`answer` degraded by `kind` (`other`: another problem's answer, for `swapped`); None when
    this answer cannot take that kind (no intermediate result, a single reasoning line)."""
    lines = answer.split("\n")
    if kind == "corrupted":
        return corrupt_answer(answer, rng)
    if kind == "truncated":
        return "\n".join(lines[:-1]) if len(lines) > 1 else None
    if kind == "shuffled":
        steps, last = lines[:-1], lines[-1:]
        if len(set(steps)) < 2:
            return None
        while True:
            perm = rng.permutation(len(steps))
            if [steps[i] for i in perm] != steps:
                return "\n".join([steps[i] for i in perm] + last)
    if kind == "swapped":
        return other if other != answer else None
    raise ValueError(f"degradation {kind!r}: unknown ({', '.join(DEGRADATIONS)})")


def used_gsm8k_ids() -> set[str]:
    """GSM8K train ids B1 (pool and target), B1b (pool and target) and B3 (pool and in-domain set)
    use at their default settings, which B4 must not reuse."""
    b1_pool, b1_target = mixed_pool(100, 32, 0)
    b1b_pool, b1b_target = gsm8k_split(0, 600, 32)
    ids = {e.id.removeprefix("gsm8k:") for e in b1_pool.examples if e.source == "gsm8k"}
    ids |= {e.id for part in (b1_target, b1b_pool, b1b_target) for e in part.examples}
    ids |= {e.id for e in read_source("gsm8k", limit=464)}
    return ids


def quality_pool(tok, n: int, share: float, n_target: int, max_len: int, seed: int):
    """B4: (pool examples, kind per example ("clean" or a DEGRADATIONS kind), target examples).

    GSM8K train problems not in `used_gsm8k_ids`, seeded; `share` of the `n` degraded, the kinds in
    equal parts (the remainder to the first kinds); the `n_target` target problems are clean and
    disjoint from the pool; every example (degraded too) renders within `max_len` tokens."""

    used = used_gsm8k_ids()
    rows = [e for e in read_source("gsm8k") if e.id not in used]
    rng = np.random.default_rng(seed)
    order = [rows[int(i)] for i in rng.permutation(len(rows))]
    n_bad = int(round(share * n))
    want = {k: n_bad // len(DEGRADATIONS) + (i < n_bad % len(DEGRADATIONS)) for i, k in enumerate(DEGRADATIONS)}
    want["clean"] = n - n_bad
    plan = [k for k, c in want.items() for _ in range(c)]
    plan = [plan[int(i)] for i in rng.permutation(len(plan))]
    pool, kinds, target, k = [], [], [], 0
    for ex in order:
        if len(target) < n_target:
            if fits(tok, ex, max_len):
                target.append(ex)
            continue
        if k == len(plan):
            break
        kind = plan[k]
        if kind == "clean":
            new = ex
        else:
            other = order[int(rng.integers(len(order)))].response
            text = degrade(ex.response, kind, other, rng)
            if text is None:
                continue
            new = replace(ex, response=text, meta={**ex.meta, "degraded": kind})
        if not fits(tok, new, max_len):
            continue
        pool.append(new)
        kinds.append(kind)
        k += 1
    if k < len(plan):
        raise RuntimeError(f"B4: only {k} of {len(plan)} pool examples could be built")
    return pool, np.array(kinds), target
