"""Length-bucketed batches under a token budget, and collation with padding on either side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechsieve.data.render import Rendered


@dataclass
class BatchPlan:
    """Batches as lists of example indices, longest first; padding efficiency of the plan."""

    batches: list[list[int]]
    real_tokens: int
    padded_tokens: int

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def plan_batches(lengths: Sequence[int], max_tokens: int = 4096, max_batch: int = 64) -> BatchPlan:
    """Group examples of similar length so that batch_size * longest <= max_tokens.

    Sorting by length (longest first, ties by index for determinism) keeps padding low; the
    longest batch comes first so an out-of-memory shows at once, not at the end of a long run.
    An example longer than `max_tokens` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and ((len(current) + 1) * max(longest, n) > max_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        if not current:
            longest = n
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    real = int(sum(lengths))
    padded = int(sum(len(b) * max(lengths[i] for i in b) for b in batches))
    return BatchPlan(batches, real, padded)


@dataclass
class Collated:
    """A padded batch. Row r's real tokens sit at columns offsets[r] : offsets[r] + lengths[r]."""

    input_ids: torch.Tensor  # [b, t] long
    attention_mask: torch.Tensor  # [b, t] long
    position_ids: torch.Tensor  # [b, t] long
    response_mask: torch.Tensor  # [b, t] bool
    lengths: torch.Tensor  # [b] long
    offsets: torch.Tensor  # [b] long (0 with right padding)
    prompt_len: torch.Tensor  # [b] long, relative to the row's first real token
    content_start: torch.Tensor  # [b] long, relative likewise
    user_start: torch.Tensor | None = None
    """[b] long, relative likewise: first token of the last user turn's content (Rendered.user_anchor);
    None in batches built by hand (readers fall back to content_start)."""

    def to(self, device) -> Collated:
        return Collated(*(None if (v := getattr(self, f)) is None else v.to(device) for f in self.__dataclass_fields__))

    def column(self, rel: torch.Tensor) -> torch.Tensor:
        """Padded column of a per-row position given relative to the row's first real token."""
        return self.offsets + rel


def pad_rows(rows: Sequence[np.ndarray], fill, padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D rows into one [b, width] array with `fill` around them; also each row's start
    column (0 with right padding). The dtype is the rows'."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, dtype=rows[0].dtype)
    starts = np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        start = width - len(r) if padding_side == "left" else 0
        starts[i] = start
        out[i, start:start + len(r)] = r
    return out, starts


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so an example gets the same positions however padded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def collate(items: Sequence[Rendered], pad_id: int, padding_side: str = "right") -> Collated:
    """Pad rendered examples into one batch; position ids count real tokens only, so the same
    example gives the same activations whatever its padding."""
    ids, offsets = pad_rows([r.input_ids for r in items], pad_id, padding_side)
    att, _ = pad_rows([np.ones(len(r), dtype=np.int64) for r in items], 0, padding_side)
    resp, _ = pad_rows([r.response_mask for r in items], False, padding_side)
    att_t = torch.from_numpy(att)
    return Collated(
        input_ids=torch.from_numpy(ids),
        attention_mask=att_t,
        position_ids=position_ids(att_t),
        response_mask=torch.from_numpy(resp),
        lengths=torch.tensor([len(r) for r in items], dtype=torch.long),
        offsets=torch.from_numpy(offsets),
        prompt_len=torch.tensor([r.prompt_len for r in items], dtype=torch.long),
        content_start=torch.tensor([r.content_start for r in items], dtype=torch.long),
        user_start=torch.tensor([r.user_anchor for r in items], dtype=torch.long),
    )
