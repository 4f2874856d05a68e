"""Record formats: detect which one a raw record is in, and turn it into an `Example`.

Formats (detected in this order, each can be forced with `format=`):
- `alpaca`: `instruction`, optional `input`, `output` (also LIMA's `instruction`/`output`);
- `messages`: chat `messages` (or ShareGPT `conversations` with `from`/`value`); the last
  assistant turn is the response, earlier ones stay in the prompt. Tool use comes as transformers'
  chat templates take it: assistant turns with `tool_calls` (and `content` null or ""), `tool`
  turns with the results (a JSON value is kept as its JSON text), a record's `tools` schemas in
  `meta["tools"]`; an answer that only calls tools keeps its calls in `Example.tool_calls`;
- `prompt_completion`: TRL's `prompt`/`completion`, each a string or a list of messages;
- `question_answer`: `question`/`answer` (GSM8K);
- `text`: plain `text`, all of it response (language-model style);
- `mapping`: any record, with a field mapping `{"prompt": col, "response": col, "id": col,
  "system": col, "source": col}`.

A field whose value is null counts as absent (a Parquet table of mixed layouts has every column in
every row). A response field that is there but empty (or blank) is an invalid record: such an
example has nothing to train on or score. Records without any response field stay prompt-only: a
chat that ends on a user turn, a mapping without `response=`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mechsieve.data.records import ROLES, Example, content_hash

FORMATS = ("alpaca", "messages", "prompt_completion", "question_answer", "text", "mapping")
ID_FIELDS = ("id", "task_id", "uid", "idx")
MAPPING_KEYS = ("prompt", "response", "id", "system", "source")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant", "tool": "tool", "observation": "tool",
                   "function_call": "assistant"}
_TOOL_FIELDS = ("name", "tool_call_id")  # kept on a tool turn: templates name the call it answers


class RecordError(ValueError):
    """A record lacks a field or has one of the wrong kind; `field` and `expected` say which
    (or `problem` says what is wrong with the field, e.g. "empty response")."""

    def __init__(self, field: str, expected: str, got: Any = None, problem: str = ""):
        self.field = field
        self.expected = expected
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"field {field!r}: {problem or f'expected {expected}, got {shown}'}")


def detect_format(record: Mapping[str, Any]) -> str:
    """Name the format of one raw record, or raise RecordError listing what was looked for."""
    if not isinstance(record, Mapping):
        raise RecordError("<record>", "a JSON object / table row", record)
    keys = {k for k, v in record.items() if v is not None}
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "question_answer"
    if "text" in keys:
        return "text"
    raise RecordError(
        "<record>",
        "one of the known layouts: instruction/output (alpaca), messages, prompt/completion, "
        "question/answer, text; or pass a field mapping (--field-map prompt=COL,response=COL)",
        sorted(keys),
    )


def _text(record: Mapping[str, Any], field: str, optional: bool = False) -> str:
    if field not in record or record[field] is None:
        if optional:
            return ""
        raise RecordError(field, "a string", None)
    value = record[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RecordError(field, "a string", value)
    return value


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RecordError(field, "a non-empty list of {role, content} messages", value)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise RecordError(f"{field}[{i}]", "a {role, content} mapping", msg)
        if "role" in msg:
            role, content = msg.get("role"), msg.get("content")
        elif "from" in msg:
            role, content = _SHAREGPT_ROLES.get(str(msg.get("from")), msg.get("from")), msg.get("value")
        else:
            raise RecordError(f"{field}[{i}]", "a message with 'role' and 'content'", msg)
        if role not in ROLES:
            raise RecordError(f"{field}[{i}].role", f"one of {list(ROLES)}", role)
        calls = msg.get("tool_calls") if role == "assistant" else None
        if calls is not None and calls != []:
            if not isinstance(calls, list) or not all(isinstance(c, Mapping) for c in calls):
                raise RecordError(f"{field}[{i}].tool_calls", "a list of {type, function: {name, arguments}} "
                                  "tool calls", calls)
            content = "" if content is None else content
        elif role == "tool" and isinstance(content, (Mapping, list)):
            content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise RecordError(f"{field}[{i}].content", "a string", content)
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = [dict(c) for c in calls]
        if role == "tool":
            message.update({k: msg[k] for k in _TOOL_FIELDS if isinstance(msg.get(k), str)})
        out.append(message)
    return out


def _split_chat(messages: list[dict[str, Any]], field: str
                ) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]]]:
    """Prompt = everything before the last assistant turn; response = that turn (its text, its tool calls)."""
    if messages[-1]["role"] != "assistant":
        # A chat that ends on the user (or on a tool result) is a prompt-only record.
        return messages, "", []
    prompt = messages[:-1]
    if not prompt:
        raise RecordError(field, "at least one user message before the assistant reply", messages)
    return prompt, messages[-1]["content"], messages[-1].get("tool_calls", [])


def to_example(
    record: Mapping[str, Any],
    fmt: str,
    source: str,
    row: int,
    mapping: Mapping[str, str] | None = None,
) -> Example:
    """Convert one raw record in format `fmt` to an Example (id given, else a content hash)."""
    system = ""
    calls: list[dict[str, Any]] = []  # tool calls of the response
    response_field: str | None  # the field the response comes from; None for a prompt-only record
    if fmt == "alpaca":
        instruction = _text(record, "instruction")
        extra = _text(record, "input", optional=True)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        prompt = [{"role": "user", "content": user}]
        response, response_field = _text(record, "output"), "output"
        system = _text(record, "system", optional=True)
    elif fmt == "messages":
        field = "conversations" if record.get("messages") is None and "conversations" in record else "messages"
        chat = _messages(record.get(field), field)
        prompt, response, calls = _split_chat(chat, field)
        response_field = field if chat[-1]["role"] == "assistant" else None
    elif fmt == "prompt_completion":
        raw_prompt, raw_completion = record.get("prompt"), record.get("completion")
        if isinstance(raw_prompt, list):
            prompt = _messages(raw_prompt, "prompt")
        else:
            prompt = [{"role": "user", "content": _text(record, "prompt")}]
        if isinstance(raw_completion, list):
            turns = _messages(raw_completion, "completion")
            if any(t["role"] == "tool" or t.get("tool_calls") for t in turns):
                # an agent's completion: its calls and their results lead up to the final turn
                if turns[-1]["role"] != "assistant":
                    raise RecordError("completion", "a completion that ends on an assistant turn", raw_completion)
                prompt, response, calls = [*prompt, *turns[:-1]], turns[-1]["content"], turns[-1].get("tool_calls", [])
            elif any(t["role"] != "assistant" for t in turns):
                raise RecordError("completion", "assistant messages only", raw_completion)
            else:
                response = "".join(t["content"] for t in turns)
        else:
            response = _text(record, "completion")
        response_field = "completion"
    elif fmt == "question_answer":
        prompt = [{"role": "user", "content": _text(record, "question")}]
        response, response_field = _text(record, "answer"), "answer"
    elif fmt == "text":
        prompt, response, response_field = [], _text(record, "text"), "text"
    elif fmt == "mapping":
        if not mapping or "response" not in mapping and "prompt" not in mapping:
            raise RecordError("<mapping>", "a field mapping with at least prompt= or response=", mapping)
        bad = sorted(set(mapping) - set(MAPPING_KEYS))
        if bad:
            raise RecordError("<mapping>", f"keys among {list(MAPPING_KEYS)}", bad)
        for key, col in mapping.items():
            if col not in record:
                raise RecordError(col, f"a column (mapped to {key}); the record has {sorted(record)}", None)
        raw_prompt = record.get(mapping["prompt"]) if "prompt" in mapping else None
        if isinstance(raw_prompt, list):
            prompt = _messages(raw_prompt, mapping["prompt"])
        elif "prompt" in mapping:
            prompt = [{"role": "user", "content": _text(record, mapping["prompt"])}]
        else:
            prompt = []
        response_field = mapping.get("response")
        response = _text(record, response_field) if response_field else ""
        if "system" in mapping:
            system = _text(record, mapping["system"], optional=True)
        if "source" in mapping:
            source = _text(record, mapping["source"])
    else:
        raise RecordError("<format>", f"one of {list(FORMATS)}", fmt)
    if response_field and not response.strip() and not calls:
        raise RecordError(response_field, "a non-empty response", response,
                          problem="empty response (an example without one has nothing to train on or score)")

    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}, *prompt]
    ex_id = _record_id(record, mapping)
    known = {"instruction", "input", "output", "messages", "conversations", "prompt", "completion",
             "question", "answer", "text", "system", *(mapping or {}).values()}
    meta = {k: v for k, v in record.items() if k not in known and _jsonable(v)}
    meta["row"] = row
    return Example(id=ex_id or content_hash(prompt, response, calls), source=source, prompt=prompt,
                   response=response, meta=meta, tool_calls=calls)


def _record_id(record: Mapping[str, Any], mapping: Mapping[str, str] | None) -> str | None:
    fields = (mapping["id"],) if mapping and "id" in mapping else ID_FIELDS
    for key in fields:
        value = record.get(key)
        if value is not None and value != "":
            return str(value)
    return None


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict))
