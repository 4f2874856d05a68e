"""The one record every stage passes around: `Example`, and the pool that holds them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One fine-tuning example.

    `prompt` is a list of chat messages (`{"role", "content"}`) that come before the response; a
    multi-turn chat keeps its earlier assistant turns here (rendering can train on them too). A chat
    with tools keeps them as transformers' chat templates take them: an assistant turn that calls
    tools has `tool_calls` (its `content` "" where the record had None), a `tool` turn the result.
    `response` is the final assistant answer (may be empty for prompt-only records, and for an
    answer that only calls tools: `tool_calls` then holds its calls).
    `meta` carries anything else of the source record; `meta["row"]` is its position in the file,
    `meta["tools"]` the tool schemas of a record that lists them.
    """

    id: str
    source: str
    prompt: list[dict[str, Any]]
    response: str
    meta: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def content_hash(self) -> str:
        return content_hash(self.prompt, self.response, self.tool_calls)

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "source": self.source, "prompt": self.prompt, "response": self.response,
               "meta": self.meta}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


def content_hash(prompt: list[dict[str, Any]], response: str, tool_calls: list[dict[str, Any]] | None = None
                 ) -> str:
    """Stable 16-hex id of the content: the same prompt and response give the same id anywhere
    (the response's tool calls count when there are any; without, the id is as it always was)."""
    content: dict[str, Any] = {"prompt": prompt, "response": response}
    if tool_calls:
        content["tool_calls"] = tool_calls
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class Pool:
    """Examples read from one place, with how they were read (so a subset can be written back)."""

    examples: list[Example]
    path: str
    container: str  # jsonl | json | parquet | csv | disk | datasets | hub | memory
    format: str  # alpaca | messages | prompt_completion | question_answer | text | mapping
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of records skipped
    duplicate_ids: int = 0
    split: str = "train"  # the split read (its name; rows count in the whole split), for hub ids and DatasetDicts
    encoding: str = "utf-8"  # of the text file, to read its raw records again when writing a subset

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def fingerprint(self) -> str:
        """Hash of the pool's content (ids, sources, prompts, responses, meta), independent of the
        file's bytes. Meta counts (multiple-choice options live there) as canonical JSON, all but
        `meta["row"]`: where a record sat in the file is not content, and the order of examples is
        hashed anyway (fixing a record that --skip-invalid skipped shifts later rows)."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(fingerprint_line(ex))
        return h.hexdigest()[:16]

    def counts_by_source(self) -> dict[str, int]:
        return dict(Counter(ex.source for ex in self.examples))

    def subset(self, ids: list[str] | set[str]) -> Pool:
        keep = set(ids)
        return Pool([e for e in self.examples if e.id in keep], self.path, self.container, self.format,
                    split=self.split, encoding=self.encoding)


def fingerprint_line(ex: Example) -> bytes:
    """What `Pool.fingerprint` hashes of one example (a streamed pool hashes the same, as it reads)."""
    meta = {k: v for k, v in ex.meta.items() if k != "row"}
    fields = [ex.id, ex.source, ex.prompt, ex.response, meta] + ([ex.tool_calls] if ex.tool_calls else [])
    return json.dumps(fields, ensure_ascii=False, sort_keys=True, default=repr).encode() + b"\n"


def fingerprint_examples(examples: list[Example]) -> str:
    return Pool(examples, "", "memory", "memory").fingerprint()


def make_unique_ids(examples: list[Example]) -> int:
    """Give repeated ids a `~2`, `~3` suffix in order; return how many were renamed."""
    seen: Counter[str] = Counter()
    renamed = 0
    for ex in examples:
        seen[ex.id] += 1
        if seen[ex.id] > 1:
            ex.id = f"{ex.id}~{seen[ex.id]}"
            renamed += 1
    return renamed
