"""Rendering: an Example -> token ids with a response mask.

The tokenizer's chat template is used when it has one (plain `text` records excepted), a plain
`User:` / `Assistant:` template otherwise. Response tokens are found by character spans: the
assistant turn's text is located by rendering the chat up to the turn with and without it, and
every token whose characters overlap it is a response token (the end-of-turn marker included, so
the model learns to stop). Truncation to `max_len` keeps the start, and is counted, never silent.
`pad_id` is the one rule for the id that padded batches of rendered examples are filled with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Example


@dataclass
class RenderConfig:
    """How examples become tokens."""

    max_len: int = 512
    """Longest sequence kept; longer ones are cut at the end and counted as truncated."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """`auto`: the tokenizer's chat template when it has one; `plain`: `User:`/`Assistant:` text."""
    response_turns: Literal["all", "last"] = "all"
    """Which assistant turns of a multi-turn chat count as response tokens."""
    add_eos: bool = True
    """Plain template: end the response with the tokenizer's EOS token."""

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"render.max_len={self.max_len} must be at least 2")
        check_choice("render.template", self.template, ("auto", "chat", "plain"))
        check_choice("render.response_turns", self.response_turns, ("all", "last"))


@dataclass
class Rendered:
    """One example as tokens.

    input_ids: [t] int64; response_mask: [t] bool (True on tokens the loss is taken on);
    prompt_len: index of the first token of the final response (the token before it is the
    "last prompt token"); content_start: first token that is not a special token.
    """

    input_ids: np.ndarray
    response_mask: np.ndarray
    prompt_len: int
    content_start: int
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def last_prompt_index(self) -> int:
        return max(self.prompt_len - 1, 0)


@dataclass
class RenderStats:
    examples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    truncated_ids: list[str] = field(default_factory=list)
    no_response_left: int = 0

    def summary(self) -> str:
        text = (f"{self.examples} examples, {self.tokens} tokens ({self.response_tokens} response); "
                f"{self.truncated} truncated to max_len")
        if self.no_response_left:
            text += f", {self.no_response_left} with no response token left after truncation"
        return text


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else EOS, else 0.

    Padded positions are left out by the attention mask (and carry label -100 and no response
    mask), so the value never reaches a loss, a gradient or a score; it only has to be a valid
    token id. `load_model` gives a tokenizer without a pad token EOS as its pad token; the
    fallbacks here serve tokenizers loaded elsewhere.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def render_example(ex: Example, tokenizer: Any, cfg: RenderConfig | None = None,
                   add_generation_prompt: bool = False) -> Rendered:
    """Tokens and response mask of one example (see module docstring).

    With `add_generation_prompt=True` the response is left out and the prompt ends where the
    model should start answering (for generation).
    """
    cfg = cfg or RenderConfig()
    use_chat = ex.prompt and (cfg.template == "chat" or (cfg.template == "auto" and has_chat_template(tokenizer)))
    if cfg.template == "chat" and not has_chat_template(tokenizer):
        raise ConfigError("render.template=chat, but the tokenizer has no chat template; use auto or plain")
    response = "" if add_generation_prompt else ex.response
    if use_chat:
        text, spans, prompt_end = _chat_text(ex.prompt, response, tokenizer, cfg.response_turns)
        bos, eos = [], []
    else:
        text, spans, prompt_end = _plain_text(ex.prompt, response, cfg.response_turns, bool(ex.prompt))
        bos = [tokenizer.bos_token_id] if _wants_bos(tokenizer) else []
        eos = [tokenizer.eos_token_id] if (cfg.add_eos and response and tokenizer.eos_token_id is not None) else []
    ids, mask, first_resp = _tokenize_with_spans(tokenizer, text, spans, prompt_end)
    ids = bos + ids + eos
    mask = [False] * len(bos) + mask + [True] * len(eos)
    prompt_len = len(bos) + first_resp
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    content_start = next((i for i, t in enumerate(ids) if t not in special), 0)
    truncated = len(ids) > cfg.max_len
    if truncated:
        ids, mask = ids[: cfg.max_len], mask[: cfg.max_len]
        prompt_len = min(prompt_len, cfg.max_len)
    return Rendered(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), prompt_len,
                    min(content_start, len(ids) - 1), truncated)


def render_pool(examples: Sequence[Example], tokenizer: Any, cfg: RenderConfig | None = None,
                ) -> tuple[list[Rendered], RenderStats]:
    """Render every example; the stats count truncations and examples left without a response."""
    cfg = cfg or RenderConfig()
    out, stats = [], RenderStats()
    for ex in examples:
        r = render_example(ex, tokenizer, cfg)
        out.append(r)
        stats.examples += 1
        stats.tokens += len(r)
        stats.response_tokens += int(r.response_mask.sum())
        if r.truncated:
            stats.truncated += 1
            stats.truncated_ids.append(ex.id)
            if ex.response and not r.response_mask.any():
                stats.no_response_left += 1
    return out, stats


def _wants_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _chat_text(prompt: list[dict[str, str]], response: str, tokenizer: Any, turns: str
               ) -> tuple[str, list[tuple[int, int]], int]:
    """Full chat text, char spans of the response turns, and where the final response starts."""
    messages = [*prompt, {"role": "assistant", "content": response}] if response else list(prompt)

    def fmt(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    if not response:
        text = fmt(messages, True)
        return text, [], len(text)
    full = fmt(messages, False)
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if turns == "last":
        assistant_at = assistant_at[-1:]
    spans, search_from = [], 0
    for i in assistant_at:
        before, upto = fmt(messages[:i], True), fmt(messages[: i + 1], False)
        if upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
        else:
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix
            # property: fall back to finding the turn's text itself.
            content = messages[i]["content"]
            start = full.find(content, search_from)
            if start < 0:
                raise ConfigError(f"cannot locate assistant turn {i} ({content[:40]!r}) in the rendered chat "
                                  "template: it rewrites that turn (as templates that drop reasoning do); set "
                                  "render.response_turns=last to learn from the final turn only, or "
                                  "render.template=plain")
            spans.append((start, start + len(content)))
        search_from = spans[-1][1]
    prompt_end = spans[-1][0] if response else len(full)
    return full, spans, prompt_end


_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


def _plain_text(prompt: list[dict[str, str]], response: str, turns: str, has_prompt: bool
                ) -> tuple[str, list[tuple[int, int]], int]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for msg in prompt:
        head = f"{_PLAIN_ROLE[msg['role']]}: "
        parts.append(head)
        pos += len(head)
        if msg["role"] == "assistant" and turns == "all":
            spans.append((pos, pos + len(msg["content"])))
        parts.append(msg["content"] + "\n\n")
        pos += len(msg["content"]) + 2
    if has_prompt:
        head = "Assistant: "
        parts.append(head)
        pos += len(head)
    prompt_end = pos
    if response:
        spans.append((pos, pos + len(response)))
        parts.append(response)
    return "".join(parts), spans, prompt_end


def _tokenize_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], prompt_end: int
                         ) -> tuple[list[int], list[bool], int]:
    """Token ids of `text`, a mask of tokens overlapping `spans`, and the first token at or after
    `prompt_end` (the start of the final response)."""
    if not text:
        return [], [], 0
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    else:
        ids, offsets = _tokenize_segments(tokenizer, text, spans, prompt_end)
    mask = [any(s < e_tok and e > s_tok for s, e in spans) if e_tok > s_tok else False
            for s_tok, e_tok in offsets]
    first = next((i for i, (s_tok, e_tok) in enumerate(offsets) if e_tok > prompt_end), len(ids))
    # A token straddling the boundary belongs to the response when it overlaps it.
    return ids, mask, first


def _tokenize_segments(tokenizer: Any, text: str, spans: list[tuple[int, int]], prompt_end: int
                       ) -> tuple[list[int], list[tuple[int, int]]]:
    """Slow tokenizers have no offsets: tokenize between span boundaries and give each token its
    segment's range (tokens never straddle a boundary this way)."""
    cuts = sorted({0, len(text), prompt_end, *[p for span in spans for p in span]})
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        seg = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += seg
        offsets += [(a, b)] * len(seg)
    return ids, offsets
