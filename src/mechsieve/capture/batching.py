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

    def to(self, device) -> Collated:
        return Collated(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def column(self, rel: torch.Tensor) -> torch.Tensor:
        """Padded column of a per-row position given relative to the row's first real token."""
        return self.offsets + rel


def collate(items: Sequence[Rendered], pad_id: int, padding_side: str = "right") -> Collated:
    """Pad rendered examples into one batch; position ids count real tokens only, so the same
    example gives the same activations whatever its padding."""
    lengths = [len(r) for r in items]
    width = max(lengths)
    b = len(items)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    att = np.zeros((b, width), dtype=np.int64)
    resp = np.zeros((b, width), dtype=bool)
    offsets = np.zeros(b, dtype=np.int64)
    for row, r in enumerate(items):
        n = len(r)
        start = width - n if padding_side == "left" else 0
        offsets[row] = start
        ids[row, start:start + n] = r.input_ids
        att[row, start:start + n] = 1
        resp[row, start:start + n] = r.response_mask
    att_t = torch.from_numpy(att)
    pos = (att_t.cumsum(-1) - 1).clamp(min=0)
    return Collated(
        input_ids=torch.from_numpy(ids),
        attention_mask=att_t,
        position_ids=pos,
        response_mask=torch.from_numpy(resp),
        lengths=torch.tensor(lengths, dtype=torch.long),
        offsets=torch.from_numpy(offsets),
        prompt_len=torch.tensor([r.prompt_len for r in items], dtype=torch.long),
        content_start=torch.tensor([r.content_start for r in items], dtype=torch.long),
    )
