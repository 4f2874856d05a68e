"""Rendering: an Example -> token ids with a response mask.

The tokenizer's chat template is used when it has one (plain `text` records excepted), a plain
`User:` / `Assistant:` template otherwise; `template="none"` renders no template at all, as TRL
renders its standard (non-conversational) format: text = prompt + response, the response's tokens
trained. Chats with tool calls go through the chat template with their `tool_calls`, `tool` turns
and the record's `tools`; a template that fails on them or leaves a call or a result out of the
text cannot render them: `skip_unrenderable` drops such examples from a pool (counted in its
`skipped`), and an example rendered anyway gets the plain template, counted in RenderStats.
Response tokens are found by character spans: the
assistant turn's text is located by rendering the chat up to the turn with and without it, and
every token whose characters overlap it is a response token (the end-of-turn marker included, so
the model learns to stop). Template tokens are marked too (`Rendered.content_mask` is False on
them): every token that overlaps no message's own `content` text (role headers, special tokens,
an automatic system prompt, the end-of-turn marker); each message's text is looked for inside
the span its turn adds to the rendering (the same prefix property), the last occurrence there.
Truncation to `max_len` keeps the start, and is counted, never silent.
`pad_id` is the one rule for the id that padded batches of rendered examples are filled with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Example, Pool


@dataclass
class RenderConfig:
    """How examples become tokens."""

    max_len: int = 512
    """Longest sequence kept; longer ones are cut at the end and counted as truncated."""
    template: Literal["auto", "chat", "plain", "none"] = "auto"
    """`auto`: the tokenizer's chat template when it has one; `plain`: `User:`/`Assistant:` text;
    `none`: no template, as TRL renders plain-string prompt/completion records: text = prompt +
    response (for examples whose prompt is one user message, or none)."""
    response_turns: Literal["all", "last"] = "all"
    """Which assistant turns of a multi-turn chat count as response tokens."""
    add_eos: bool = True
    """Plain and no template: end the response with the tokenizer's EOS token."""

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"render.max_len={self.max_len} must be at least 2")
        check_choice("render.template", self.template, ("auto", "chat", "plain", "none"))
        check_choice("render.response_turns", self.response_turns, ("all", "last"))


@dataclass
class Rendered:
    """One example as tokens.

    input_ids: [t] int64; response_mask: [t] bool (True on tokens the loss is taken on);
    prompt_len: index of the first token of the final response (the token before it is the
    "last prompt token"); content_start: first token that is not a special token; fallback: why
    the chat template could not render this example's tool calls (it was rendered plain), else "";
    content_mask: [t] bool, True on tokens overlapping a message's own text (its `content`, the
    response included), False on the template's (None where unknown, e.g. built by hand);
    user_start: first token of the last user turn's content (NAIT's drift anchor), None where the
    example has no user turn or the template hides where it starts (`user_anchor` then falls back
    to content_start).
    """

    input_ids: np.ndarray
    response_mask: np.ndarray
    prompt_len: int
    content_start: int
    truncated: bool = False
    fallback: str = ""
    content_mask: np.ndarray | None = None
    user_start: int | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def user_anchor(self) -> int:
        """user_start, or content_start where there is none (plain text, an unlocatable turn)."""
        return self.content_start if self.user_start is None else self.user_start

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
    plain_fallback: int = 0
    fallback_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.examples} examples, {self.tokens} tokens ({self.response_tokens} response); "
                f"{self.truncated} truncated to max_len")
        if self.no_response_left:
            text += f", {self.no_response_left} with no response token left after truncation"
        if self.plain_fallback:
            text += (f", {self.plain_fallback} with tool calls the chat template does not render (rendered "
                     "with the plain template instead)")
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
    calls = [] if add_generation_prompt else ex.tool_calls
    fallback, chat = _chat_with_tools(ex, response, calls, tokenizer, cfg.response_turns) if use_chat else ("", None)
    if cfg.template == "none" and has_tools(ex):
        fallback = "render.template=none renders text without roles, and tool calls need them"
    if chat is not None and not fallback:
        text, spans, prompt_end, content = chat
        bos, eos = [], []
    else:
        if cfg.template == "none" and not fallback:
            text, spans, prompt_end, content = _raw_text(ex, response)
        else:  # the plain template: no chat template, or one that cannot render these tool calls
            text, spans, prompt_end, content = _plain_text(ex.prompt, response, cfg.response_turns, bool(ex.prompt),
                                                           calls)
        bos = [tokenizer.bos_token_id] if _wants_bos(tokenizer) else []
        eos = [tokenizer.eos_token_id] if (cfg.add_eos and (response or calls) and tokenizer.eos_token_id is not None
                                           ) else []
    kind = "chat" if chat is not None and not fallback else ("none" if cfg.template == "none" and not fallback
                                                               else "plain")
    user_at = _last_user_char(ex, text, kind, lambda p: _render_text(kind, ex, p, response, calls, tokenizer, cfg))
    ids, mask, first_resp, own, user_tok = _tokenize_with_spans(tokenizer, text, spans, prompt_end, content, user_at)
    ids = bos + ids + eos
    mask = [False] * len(bos) + mask + [True] * len(eos)
    own = [False] * len(bos) + own + [False] * len(eos)
    prompt_len = len(bos) + first_resp
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    content_start = next((i for i, t in enumerate(ids) if t not in special), 0)
    truncated = len(ids) > cfg.max_len
    if truncated:
        ids, mask, own = ids[: cfg.max_len], mask[: cfg.max_len], own[: cfg.max_len]
        prompt_len = min(prompt_len, cfg.max_len)
    user_start = None if user_tok is None else min(len(bos) + user_tok, len(ids) - 1)
    return Rendered(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), prompt_len,
                    min(content_start, len(ids) - 1), truncated, fallback, np.asarray(own, dtype=bool), user_start)


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
        if r.fallback:
            stats.plain_fallback += 1
            stats.fallback_ids.append(ex.id)
    return out, stats


def has_tools(ex: Example) -> bool:
    """Whether `ex` calls tools (in its response or an earlier turn) or holds a tool result."""
    return bool(ex.tool_calls) or any(m.get("tool_calls") or m["role"] == "tool" for m in ex.prompt)


def skip_unrenderable(pool: Pool, tokenizer: Any, cfg: RenderConfig | None = None) -> Pool:
    """`pool` without the examples whose tool calls this tokenizer's chat template cannot render;
    each is named in the returned pool's `skipped` (`file:row N`, its id and why), as
    --skip-invalid names the records it skips. Other examples are kept as they are."""
    kept, dropped = [], []
    for ex in pool.examples:
        why = render_example(ex, tokenizer, cfg).fallback if has_tools(ex) else ""
        if why:
            dropped.append((ex, why))
        else:
            kept.append(ex)
    where = _locations(pool, {ex.meta.get("row") for ex, _ in dropped})
    skipped = [f"{where.get(ex.meta.get('row'), pool.path)} (id {ex.id}): tool calls this tokenizer's chat template "
               f"does not render: {why}; skipped" for ex, why in dropped]
    return replace(pool, examples=kept, skipped=[*pool.skipped, *skipped])


def _locations(pool: Pool, rows: set[Any]) -> dict[Any, str]:
    """`file:line` of the given rows of a text file, `file:row N` of a table's (never re-read)."""
    if not rows:
        return {}
    if pool.container not in ("jsonl", "json", "csv"):
        return {row: f"{pool.path}:row {row}" for row in rows if row is not None}
    from mechsieve.data.readers import iter_raw

    return {row: loc for loc, row, _ in iter_raw(pool.path, pool.container, encoding=pool.encoding) if row in rows}


def _wants_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _chat_with_tools(ex: Example, response: str, calls: list[dict[str, Any]], tokenizer: Any, turns: str
                     ) -> tuple[str, tuple[str, list[tuple[int, int]], int, list[tuple[int, int]]] | None]:
    """(why the chat template cannot render `ex`'s tool calls or "", its chat text and spans).
    Without tools, errors of the template are the caller's as before."""
    if not has_tools(ex):
        return "", _chat_text(ex.prompt, response, tokenizer, turns, calls, _record_tools(ex))
    try:
        chat = _chat_text(ex.prompt, response, tokenizer, turns, calls, _record_tools(ex))
    except Exception as err:  # a template raises what it likes on a role or a field it does not know
        return f"it fails on them ({' '.join(f'{type(err).__name__}: {err}'.split())[:200]})", None
    return _left_out(chat[0], ex.prompt, calls), chat


def _record_tools(ex: Example) -> list[dict[str, Any]] | None:
    """The record's `tools` schemas (a list, or its JSON text as TRL accepts), for the template."""
    tools = ex.meta.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            return None
    return tools if isinstance(tools, list) and tools and all(isinstance(t, dict) for t in tools) else None


def _left_out(text: str, prompt: list[dict[str, Any]], calls: list[dict[str, Any]]) -> str:
    """What of the tool calls and results the rendered `text` leaves out, or ""."""
    for call in [c for m in prompt for c in m.get("tool_calls", [])] + list(calls):
        name = _call_json(call)["name"]
        if isinstance(name, str) and name not in text:
            return f"it leaves out the call to {name!r}"
    for msg in prompt:
        content = msg["content"].strip()
        if msg["role"] == "tool" and content and content not in text and json.dumps(content)[1:-1] not in text:
            return f"it leaves out the tool result {content[:40]!r}"
    return ""


def _chat_text(prompt: list[dict[str, Any]], response: str, tokenizer: Any, turns: str,
               calls: list[dict[str, Any]] | None = None, tools: list[dict[str, Any]] | None = None,
               ) -> tuple[str, list[tuple[int, int]], int, list[tuple[int, int]]]:
    """Full chat text, char spans of the response turns, where the final response starts, and the
    char spans of the messages' own text (`_content_spans`)."""
    final: dict[str, Any] = {"role": "assistant", "content": response, **({"tool_calls": calls} if calls else {})}
    messages = [*prompt, final] if response or calls else list(prompt)
    extra = {"tools": tools} if tools else {}

    def fmt(msgs: list[dict[str, Any]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **extra)

    if not (response or calls):
        text = fmt(messages, True)
        return text, [], len(text), _content_spans(text, messages, fmt)
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
            if start < 0 or (not content and messages[i].get("tool_calls")):
                raise ConfigError(f"cannot locate assistant turn {i} ({content[:40]!r}) in the rendered chat "
                                  "template: it rewrites that turn (as templates that drop reasoning do); set "
                                  "render.response_turns=last to learn from the final turn only, or "
                                  "render.template=plain")
            spans.append((start, start + len(content)))
        search_from = spans[-1][1]
    prompt_end = spans[-1][0]
    return full, spans, prompt_end, _content_spans(full, messages, fmt)


def _content_spans(text: str, messages: list[dict[str, Any]], fmt: Any) -> list[tuple[int, int]]:
    """Char spans of each message's `content` in the chat `text`: looked for (as given, then
    trimmed, as templates that `trim` render it) inside the part of `text` its turn adds (the
    prefix property), last occurrence there, so a role header or a system prompt that contains the
    same words is not taken for it; where the prefix property fails, the first occurrence after
    the previous message. Not found (a template that rewrites the message): no span, and its
    tokens count as the template's."""
    out: list[tuple[int, int]] = []
    lo = 0
    for i, msg in enumerate(messages):
        content = msg.get("content") or ""
        upto = fmt(messages[: i + 1], False)
        window = text.startswith(upto) and len(upto) >= lo
        for probe in dict.fromkeys((content, content.strip())):
            if not probe:
                continue
            start = text.rfind(probe, lo, len(upto)) if window else text.find(probe, lo)
            if start >= 0:
                out.append((start, start + len(probe)))
                lo = start + len(probe)
                break
        if window:
            lo = max(lo, len(upto))
    return out


_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def _call_json(call: dict[str, Any]) -> dict[str, Any]:
    """{name, arguments} of a tool call in OpenAI's layout ({type, function: {...}}) or flat."""
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    return {"name": function.get("name"), "arguments": function.get("arguments")}


def _with_calls(content: str, calls: list[dict[str, Any]]) -> str:
    """A turn's text in the plain template: its content, then each call as Hermes-style JSON."""
    lines = [content] if content else []
    lines += [f"<tool_call>{json.dumps(_call_json(c), ensure_ascii=False)}</tool_call>" for c in calls]
    return "\n".join(lines)


def _plain_text(prompt: list[dict[str, Any]], response: str, turns: str, has_prompt: bool,
                calls: list[dict[str, Any]] | None = None
                ) -> tuple[str, list[tuple[int, int]], int, list[tuple[int, int]]]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    content: list[tuple[int, int]] = []  # the messages' own text (the body starts with it)
    pos = 0
    for msg in prompt:
        head = f"{_PLAIN_ROLE[msg['role']]}: "
        body = _with_calls(msg["content"], msg.get("tool_calls", []))
        parts.append(head)
        pos += len(head)
        content.append((pos, pos + len(msg["content"])))
        if msg["role"] == "assistant" and turns == "all":
            spans.append((pos, pos + len(body)))
        parts.append(body + "\n\n")
        pos += len(body) + 2
    if has_prompt:
        head = "Assistant: "
        parts.append(head)
        pos += len(head)
    prompt_end = pos
    answer = _with_calls(response, calls or [])
    if answer:
        spans.append((pos, pos + len(answer)))
        content.append((pos, pos + len(response)))
        parts.append(answer)
    return "".join(parts), spans, prompt_end, content


def _raw_text(ex: Example, response: str) -> tuple[str, list[tuple[int, int]], int, list[tuple[int, int]]]:
    """TRL's standard format: the prompt's text, then the response's, nothing between."""
    if len(ex.prompt) > 1 or (ex.prompt and ex.prompt[0]["role"] != "user"):
        roles = [m["role"] for m in ex.prompt]
        raise ConfigError(f"render.template=none renders a prompt that is one string (TRL's standard prompt/"
                          f"completion format), but example {ex.id} has a chat prompt ({', '.join(roles)}); "
                          "set render.template=auto (its chat template) or plain")
    prompt = ex.prompt[0]["content"] if ex.prompt else ""
    text = prompt + response
    return text, [(len(prompt), len(text))] if response else [], len(prompt), [(0, len(text))]


def _tokenize_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], prompt_end: int,
                         content: Sequence[tuple[int, int]] = (), user_at: int | None = None,
                         ) -> tuple[list[int], list[bool], int, list[bool], int | None]:
    """Token ids of `text`, a mask of tokens overlapping `spans`, the first token at or after
    `prompt_end` (the start of the final response), a mask of tokens overlapping `content`
    (slow tokenizers: each token has its segment's range, so the content mask is as coarse as the
    segments, which are cut at the response spans only, keeping the ids as they were), and the
    token holding character `user_at` (None when it is None; slow tokenizers: the number of
    tokens before it, tokenized the same way)."""
    if not text:
        return [], [], 0, [], None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    else:
        ids, offsets = _tokenize_segments(tokenizer, text, spans, prompt_end)
    mask = [any(s < e_tok and e > s_tok for s, e in spans) if e_tok > s_tok else False
            for s_tok, e_tok in offsets]
    own = [any(s < e_tok and e > s_tok for s, e in content) if e_tok > s_tok else False
           for s_tok, e_tok in offsets]
    first = next((i for i, (s_tok, e_tok) in enumerate(offsets) if e_tok > prompt_end), len(ids))
    # A token straddling the boundary belongs to the response when it overlaps it.
    user_tok = None
    if user_at is not None and getattr(tokenizer, "is_fast", False):
        user_tok = next((i for i, (_, e_tok) in enumerate(offsets) if e_tok > user_at), None)
    elif user_at is not None:
        head = [(a, b) for a, b in spans if b <= user_at]
        user_tok = len(_tokenize_segments(tokenizer, text[:user_at], head, min(prompt_end, user_at))[0])
    return ids, mask, first, own, user_tok


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


_USER_PROBE = "\u27e6mechsieve-last-user\u27e7"
"""Stands in for the last user turn's content while locating it (text no template writes itself)."""


def _render_text(kind: str, ex: Example, prompt: list[dict[str, Any]], response: str, calls: list[dict[str, Any]],
                 tokenizer: Any, cfg: RenderConfig) -> str:
    """The text `render_example` renders for `ex` with `prompt` in place of its prompt."""
    if kind == "chat":  # the full text of _chat_text, rendered once (not turn by turn)
        final: dict[str, Any] = {"role": "assistant", "content": response, **({"tool_calls": calls} if calls else {})}
        messages = [*prompt, final] if response or calls else list(prompt)
        tools = _record_tools(ex)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not (response or calls),
                                             **({"tools": tools} if tools else {}))
    return _plain_text(prompt, response, cfg.response_turns, bool(prompt), calls)[0]


def _last_user_char(ex: Example, text: str, kind: str, text_of: Any) -> int | None:
    """Character of `text` where the last user turn's content starts, for any chat template: the
    chat is rendered again with that content replaced by a probe string, and where the probe lands
    is where the content starts, provided the two renderings agree up to it (a template whose text
    before the turn depends on the turn's content gives None). No template (`none`): the prompt is
    the user's text, at 0. None without a user turn, or where the template fails on the probe."""
    last = next((i for i in range(len(ex.prompt) - 1, -1, -1) if ex.prompt[i]["role"] == "user"), None)
    if last is None:
        return None
    if kind == "none":
        return 0
    probe = [*ex.prompt[:last], {**ex.prompt[last], "content": _USER_PROBE}, *ex.prompt[last + 1:]]
    try:
        probed = text_of(probe)
    except Exception:  # a template raises what it likes; the anchor then falls back to content_start
        return None
    at = probed.find(_USER_PROBE)
    return at if at >= 0 and probed[:at] == text[:at] else None
