"""Per-token features of the shared feature pass (capture.shared): what the token maskers read.

XTF's attributes (tokens.xtf) and the excess loss (tokens.excess_loss) are per-token numbers of a
forward pass over the pool, so they are `Feature`s like the selection methods' per-example ones
and go through `feature_pass` and its FeatureCache unchanged. A `TokenFeature`'s arrays are
ragged, stored flat: `values` [sum_i t_i] float32 ([sum_i t_i, d] for states) and `offsets`
[n + 1] int64; example i is values[offsets[i]:offsets[i + 1]], one row per token of its rendered
`input_ids` (every position, NaN where the feature has no value); `split` gives the list back.
Which positions count (the response, the maskable tokens) is the masker's business afterwards,
so one feature serves several maskers (XTF's KN and the excess loss's base term are one).

- `TokenNll`: next-token NLL of every token from the logits at t - 1 (tokens.excess_loss.token_nll:
  NaN at position 0 and at padding); XTF's KN probability is exp(-nll).
- `ContextualRelevance`: XTF's contextual TR: mean cosine of a token's centred state at one block
  to its k most similar in-domain token states (given, digested into the settings).
- `ReceivedAttention`: XTF's RI: attention a token receives from later queries, raw or relative to
  a uniform reader, averaged over layers. It reads attention probabilities (eager attention), so
  its pass key has site="attention": a pass of its own that slows no other feature (features of
  other kinds given the same key read the residual stream in that pass).
- `TokenStates`: every token's state at one block, [t_i, d] per example: the in-domain set's
  token states contextual TR compares with (a small set; the pool's states are never kept).

`rendered_fingerprint` keys the cache for maskers, which receive the pool already rendered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.capture.forward import BatchContext
from mechsieve.capture.shared import Feature, PassKey, digest


def pack(rows: Sequence[np.ndarray], width: int | None = None) -> dict[str, np.ndarray]:
    """Ragged rows ([t_i] or [t_i, d] each) as flat `values` float32 and `offsets` [n + 1] int64."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    empty = np.zeros((0,) if width is None else (0, width), dtype=np.float32)
    values = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows]) if rows else empty
    return {"values": values, "offsets": offsets}


def split(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The per-example arrays of a ragged feature's `values` / `offsets` (copies: a masker may
    edit its scores in place without touching a shared feature's arrays)."""
    values, offsets = arrays["values"], arrays["offsets"]
    return [values[offsets[i]:offsets[i + 1]].copy() for i in range(len(offsets) - 1)]


def rendered_fingerprint(rendered: Sequence[Any]) -> str:
    """A content hash of rendered examples (tokens, response masks, prompt and content starts): the
    data fingerprint of a pass over inputs that come already rendered."""
    h = hashlib.sha256()
    for r in rendered:
        h.update(np.ascontiguousarray(r.input_ids, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(r.response_mask, dtype=bool).tobytes())
        h.update(f"|{r.prompt_len}|{r.content_start}|{r.user_start}\n".encode())
    return f"rendered:{len(rendered)}:{h.hexdigest()[:32]}"


class TokenFeature(Feature):
    """A ragged per-token feature (see the module docstring): `put` stores each row of a batch's
    [b, t(, d)] array, trimmed to the example's own tokens."""

    width: int | None = None

    def begin(self, n: int) -> None:
        self.rows: list[np.ndarray | None] = [None] * n

    def put(self, ctx: BatchContext, per_token: np.ndarray) -> None:
        """per_token: [b, t] (or [b, t, d]) of the padded batch, on the CPU."""
        b = ctx.batch
        for row, i in enumerate(ctx.indices):
            lo, length = int(b.offsets[row]), int(b.lengths[row])
            self.rows[i] = per_token[row, lo:lo + length].astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        shape = (0,) if self.width is None else (0, self.width)
        return pack([r if r is not None else np.zeros(shape, np.float32) for r in self.rows], self.width)


class TokenNll(TokenFeature):
    """Next-token NLL of every token (tokens.excess_loss.token_nll): `values` [sum t_i] float32,
    NaN at position 0 and at padding; `vocab` [1] int64, the logits' size (-1 before any batch)."""

    kind = "token_nll"
    need_logits = True

    def settings(self) -> dict[str, Any]:
        return {}

    def begin(self, n: int) -> None:
        super().begin(n)
        self.vocab = -1

    def on_logits(self, ctx: BatchContext, logits: torch.Tensor) -> None:
        from mechsieve.tokens.excess_loss import token_nll

        self.vocab = int(logits.shape[-1])
        self.put(ctx, token_nll(logits, ctx.batch.input_ids, ctx.batch.attention_mask.bool()).cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {**super().arrays(), "vocab": np.array([self.vocab], dtype=np.int64)}


class ContextualRelevance(TokenFeature):
    """XTF's contextual TR at block `layer`: the mean of the `top_k` largest cosines of the token's
    state minus `centre` [d] to the unit in-domain states `unit` [m, d] (tokens.xtf): `values`
    [sum t_i] float32 at every real token."""

    kind = "xtf_contextual_tr"

    def __init__(self, key: PassKey, layer: int, centre: torch.Tensor, unit: torch.Tensor, top_k: int) -> None:
        super().__init__(key)
        self.layers = [int(layer)]
        self.centre, self.unit = centre, unit
        self.top_k = int(top_k)

    def settings(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "target": digest(self.centre.detach().float().cpu().numpy(),
                                                      self.unit.detach().float().cpu().numpy())}

    def on_layer(self, ctx: BatchContext, layer: int, acts: torch.Tensor) -> None:
        centre, unit = self.centre.to(acts.device), self.unit.to(acts.device)
        h = torch.nn.functional.normalize(acts.float() - centre, dim=-1)  # [b, t, d]
        sims = h @ unit.T  # [b, t, m]
        self.put(ctx, sims.topk(min(self.top_k, unit.shape[0]), dim=-1).values.mean(-1).cpu().numpy())


class ReceivedAttention(TokenFeature):
    """XTF's RI: attention each token receives from later queries (tokens.attributes.
    received_attention, `raw`; or tokens.robust.relative_received_attention, `uniform`), summed
    over `layers`, divided by their number and by the number of those queries; NaN where no later
    query counts. Its key must have site="attention" (it reads [b, heads, t, t] probabilities)."""

    kind = "xtf_received_attention"
    reads_attention = True

    def __init__(self, key: PassKey, layers: Sequence[int], baseline: Literal["raw", "uniform"]) -> None:
        if key.site != "attention":
            raise ValueError(f"ReceivedAttention reads attention probabilities: its pass key needs "
                             f"site='attention', got {key.site!r}")
        super().__init__(key)
        self.layers = sorted(int(x) for x in layers)
        self.baseline = baseline

    def settings(self) -> dict[str, Any]:
        return {"baseline": self.baseline}

    def begin(self, n: int) -> None:
        super().begin(n)
        self._total: torch.Tensor | None = None

    def on_layer(self, ctx: BatchContext, layer: int, probs: torch.Tensor) -> None:
        from mechsieve.tokens.attributes import received_attention
        from mechsieve.tokens.robust import relative_received_attention

        valid = ctx.batch.attention_mask.bool()
        if self.baseline == "uniform":
            total, n_later = relative_received_attention(probs, valid, ctx.batch.offsets)
        else:
            total, n_later = received_attention(probs, valid)
        self._total = total if self._total is None else self._total + total
        if layer != self.layers[-1]:  # hooks run in block order: the deepest layer ends the batch
            return
        n = n_later.float()
        value = (self._total / len(self.layers)) / n.clamp_min(1.0)
        self._total = None
        self.put(ctx, torch.where(n > 0, value, torch.full_like(value, float("nan"))).cpu().numpy())


class TokenStates(TokenFeature):
    """Every token's state at block `layer`: `values` [sum t_i, d] float32. For small sets (XTF's
    in-domain target); a pool's per-token states are never kept."""

    kind = "token_states"

    def __init__(self, key: PassKey, layer: int) -> None:
        super().__init__(key)
        self.layers = [int(layer)]

    def settings(self) -> dict[str, Any]:
        return {}

    def on_layer(self, ctx: BatchContext, layer: int, acts: torch.Tensor) -> None:
        self.width = int(acts.shape[-1])
        self.put(ctx, acts.float().cpu().numpy())
