"""IGDS helpers: SAE latents at a position, steering a latent with the SAE error re-added, the
dev-set metrics of interventional filtering (teacher-forced loss, generation accuracy), and
interventional filtering itself with random-direction controls, batched and one at a time.

Steering (IGDS step 4) multiplies latent `j` by `alpha` and decodes, re-adding the SAE error so
that only that latent's contribution changes:
`h' = decode(a') + (h - decode(a)) = h + (alpha - 1) a_j W_dec[j]`. The right-hand form is what
runs: it is exact for alpha = 1 (the model's output is bit-for-bit unchanged) and needs no
decode of the whole latent vector.

What differs from the paper (which steers every token and keeps any latent with delta > 0):
- the first real token of each sequence is not steered (`steer_first=false`; left padding
  handled): it is the attention sink, whose residual norm is far off the distribution the SAE
  was trained on, so "a_j scaled" there means nothing and its push reaches every later token;
- a latent's delta is compared with `controls` random directions of the same norm as its push,
  `(alpha - 1) a_j u` with `u` a seeded random direction scaled to `|W_dec[j]|`, at the same
  positions and with the same activation `a_j`, and the same best-over-alphas: on a few dev
  answers a push of this size in any direction moves the loss by about as much as the
  latents do, so "delta > 0" alone keeps noise. A latent is kept only if its delta is above the
  controls' `control_quantile`; with none kept the run stops (`none_kept=stop`) instead of
  keeping the best one. The `paper` preset turns all three off.
- batched filtering (`filter_impl=batched`): the dev batch's residual at the SAE layer is
  computed once, each (latent or control, alpha) pair gets its own copy of it with its own push,
  and `steer_batch` copies go through the blocks above the SAE layer in one forward. It equals the
  one-at-a-time reference (`filter_impl=reference`, hooks on full forwards) up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechsieve.capture.reductions import REDUCTIONS


def steer(h: torch.Tensor, sae: Any, feature: int, alpha: float, mask: torch.Tensor | None = None,
          direction: torch.Tensor | None = None) -> torch.Tensor:
    """`h: [..., d]` with latent `feature` scaled by `alpha` where `mask: [...]` (bool) is set:
    `h + (alpha - 1) a_j W_dec[j]`; `direction: [d]` replaces `W_dec[j]` (a random control)."""
    a = sae.encode(h)[..., feature]
    scale = (alpha - 1.0) * a
    if mask is not None:
        scale = scale * mask.to(scale.dtype)
    push = sae.W_dec[feature] if direction is None else direction
    return h + scale[..., None].to(h.dtype) * push.to(h.dtype)


def not_first_token(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """`[b, t]` bool, False at each row's first real token (the attention sink), for the last `t`
    columns of `attention_mask: [b, T]` (a cached generation step sees only its new tokens)."""
    width = attention_mask.shape[1]
    first = attention_mask.long().argmax(dim=1)  # first 1 of each row, whatever the padding side
    cols = torch.arange(width - t, width, device=attention_mask.device)[None, :]
    return cols != first[:, None]


@contextmanager
def steering(model: Any, sae: Any, layer: int, feature: int, alpha: float,
             mask_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
             direction: torch.Tensor | None = None, skip_first: bool = False) -> Iterator[None]:
    """Steer `feature` by `alpha` in block `layer`'s output during every forward inside the block;
    `mask_fn(h) -> [b, t] bool` picks the positions (None: all); `direction` replaces `W_dec[j]`;
    `skip_first` leaves each row's first real token alone (read from the `attention_mask` the
    model is called with; without one, column 0 of each forward)."""
    from mechsieve.models.hooks import block_output, hook_points

    seen: dict[str, Any] = {}

    def record(module, args, kwargs):
        seen["attention_mask"] = kwargs.get("attention_mask")

    def hook(module, args, output):
        h = block_output(output)
        mask = mask_fn(h) if mask_fn is not None else None
        if skip_first:
            am = seen.get("attention_mask")
            if am is None or am.dim() != 2:
                am = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
            keep = not_first_token(am.to(h.device), h.shape[1])
            mask = keep if mask is None else mask & keep
        new = steer(h, sae, feature, alpha, mask, direction)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [hook_points(model).block(layer).register_forward_hook(hook)]
    if skip_first:
        handles.append(model.register_forward_pre_hook(record, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prompt_mask(batch: Any, t: int) -> torch.Tensor:
    cols = torch.arange(t, device=batch.input_ids.device)[None, :]
    start = batch.offsets[:, None]
    return (cols >= start) & (cols < start + batch.prompt_len[:, None])


def latents_at(sae: Any, acts: torch.Tensor, batch: Any, position: str, cols: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Latents `[b, d_sae]` (or `[b, len(cols)]`) of `acts: [b, t, d]` at `position`: `last_prompt`,
    `mean_prompt` / `mean_response` (per-token latents averaged), or `argmax_prompt` (the prompt
    position, relative to the row's first real token, where each latent is largest; long)."""
    if position == "last_prompt":
        a = sae.encode(REDUCTIONS["last_prompt"](acts, batch))
        return a if cols is None else a[:, cols]
    a = sae.encode(acts)
    if cols is not None:
        a = a[..., cols]
    if position == "argmax_prompt":
        masked = a.masked_fill(~prompt_mask(batch, a.shape[1])[..., None], -1.0)
        return masked.argmax(dim=1) - batch.offsets[:, None]
    return REDUCTIONS[position](a, batch)


def steer_mask_fn(state: dict, where: str, position: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Positions to steer in the current batch (`state["batch"]`): all, prompt, or the recall
    position (the last prompt token, or the tokens a `mean_*` position averages over)."""
    def fn(h: torch.Tensor) -> torch.Tensor:
        batch = state["batch"]
        if where == "all" or (where == "position" and position == "mean_all"):
            return batch.attention_mask.bool()
        if where == "position" and position == "mean_response":
            return batch.response_mask.bool()
        if where == "prompt" or position != "last_prompt":
            return prompt_mask(batch, h.shape[1])
        cols = torch.arange(h.shape[1], device=h.device)[None, :]
        return cols == (batch.offsets + (batch.prompt_len - 1).clamp(min=0))[:, None]
    return fn


def skips_first(cfg: Any) -> bool:
    """Whether the settings leave the first real token unsteered (`steer_first=false`)."""
    return getattr(cfg, "steer_first", True) is False


def dev_loss(loaded: Any, rendered: Sequence[Any], sae: Any, feature: int | None, alpha: float, cfg: Any,
             direction: torch.Tensor | None = None) -> float:
    """Token-weighted mean next-token NLL of the dev responses, steering `feature` (None: plain)
    along its decoder row or `direction`; one full forward per batch (the reference)."""
    from mechsieve.capture.batching import collate, plan_batches
    from mechsieve.data.render import pad_id

    model = loaded.model
    device = next(model.parameters()).device
    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    state: dict = {}
    total, count = 0.0, 0
    ctx = (steering(model, sae, sae.layer, feature, alpha, steer_mask_fn(state, cfg.steer_positions, cfg.position),
                    direction, skips_first(cfg))
           if feature is not None else nullcontext())
    with ctx, torch.no_grad():
        for idx in plan.batches:
            batch = collate([rendered[i] for i in idx], pad_id(loaded.tokenizer), "right").to(device)
            state["batch"] = batch
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
            mask = batch.response_mask[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), batch.input_ids[:, 1:][mask],
                                                    reduction="sum")
            total += float(nll)
            count += int(mask.sum())
    return total / max(count, 1)


def dev_accuracy(loaded: Any, dev: Sequence[Any], sae: Any, feature: int | None, alpha: float, cfg: Any,
                 direction: torch.Tensor | None = None) -> float:
    """Exact-match accuracy (final numbers) of greedy generations, steering `feature` at every token
    (but the first under `steer_first=false`), along its decoder row or `direction`."""
    from mechsieve.evaluate.answers import exact_match
    from mechsieve.evaluate.generate import generate_greedy

    ctx = (steering(loaded.model, sae, sae.layer, feature, alpha, None, direction, skips_first(cfg))
           if feature is not None else nullcontext())
    with ctx:
        preds = generate_greedy(loaded.model, loaded.tokenizer, dev, cfg.render, cfg.max_new_tokens,
                                cfg.max_tokens, cfg.max_batch, progress=False)
    return float(np.mean([exact_match(p, ex.response) for p, ex in zip(preds, dev)]))


def snippet_text(tokenizer: Any, rendered: Any, pos: int, before: int = 24, after: int = 3) -> str:
    """The tokens around `pos` of a rendered example, the token at `pos` in [[ ]] (special tokens
    of the chat template left out of the context, so the question's end shows)."""
    ids = [int(x) for x in rendered.input_ids]
    pos = max(0, min(pos, len(ids) - 1))
    left = tokenizer.decode(ids[max(0, pos - before):pos], skip_special_tokens=True)
    mid = tokenizer.decode(ids[pos:pos + 1])
    right = tokenizer.decode(ids[pos + 1:pos + 1 + after], skip_special_tokens=True)
    return f"{left}[[{mid}]]{right}".replace("\n", "\\n")


# --- random-direction controls and batched interventional filtering ----------------------------

def control_directions(w_dec_row: torch.Tensor, n: int, seed: int, feature: int) -> torch.Tensor:
    """`[n, d]` random directions, each as long as `w_dec_row: [d]` (latent `feature`'s decoder
    row); seeded by (seed, feature), so a latent's controls do not depend on the other candidates."""
    rng = np.random.default_rng([int(seed) % 2**32, int(feature)])
    u = rng.standard_normal((n, w_dec_row.shape[0]))
    u *= float(w_dec_row.double().norm()) / np.linalg.norm(u, axis=1, keepdims=True)
    return torch.from_numpy(u).to(device=w_dec_row.device, dtype=w_dec_row.dtype)


@dataclass
class SteerPairs:
    """Interventions: latent `features[p]` scaled by `alphas[p]`, its push along its own decoder row
    (`controls[p] = -1`) or along its random control direction number `controls[p]`."""

    features: np.ndarray  # [P] int64
    alphas: np.ndarray  # [P] float64
    controls: np.ndarray  # [P] int64

    @classmethod
    def grid(cls, features: Sequence[int], alphas: Sequence[float], controls: Sequence[int]) -> SteerPairs:
        """Every (feature, control, alpha), feature-major, then control, then alpha."""
        f, c, a = np.meshgrid(np.asarray(features, dtype=np.int64), np.asarray(controls, dtype=np.int64),
                              np.asarray(alphas, dtype=np.float64), indexing="ij")
        return cls(f.ravel(), a.ravel(), c.ravel())

    def __len__(self) -> int:
        return len(self.features)

    def __add__(self, other: SteerPairs) -> SteerPairs:
        return SteerPairs(*(np.concatenate([getattr(self, k), getattr(other, k)])
                            for k in ("features", "alphas", "controls")))

    def directions(self, sae: Any, n_controls: int, seed: int) -> torch.Tensor:
        """`[P, d]` push directions: `W_dec[j]`, or `control_directions(W_dec[j])[k]`."""
        out = sae.W_dec[torch.as_tensor(self.features, device=sae.W_dec.device)].clone()
        for j in np.unique(self.features[self.controls >= 0]):
            rows = np.flatnonzero((self.features == j) & (self.controls >= 0))
            ctrl = control_directions(sae.W_dec[int(j)], n_controls, seed, int(j))
            out[torch.as_tensor(rows, device=out.device)] = ctrl[torch.as_tensor(self.controls[rows], device=out.device)]
        return out


Evaluate = Callable[[SteerPairs], np.ndarray]
"""Dev metric `[P]` of each steering pair."""


def reference_evaluator(loaded: Any, dev: Sequence[Any], rendered: Sequence[Any] | None, sae: Any, cfg: Any,
                        n_controls: int, seed: int) -> Evaluate:
    """One pair at a time, each a full hooked forward over the dev set (`dev_loss`; `dev_accuracy`
    when `rendered` is None): today's code path, the reference the batched one is tested against."""
    directions: dict[int, torch.Tensor] = {}

    def run(pairs: SteerPairs) -> np.ndarray:
        out = np.empty(len(pairs))
        for p, (j, alpha, k) in enumerate(zip(pairs.features.tolist(), pairs.alphas.tolist(), pairs.controls.tolist())):
            direction = None
            if k >= 0:
                if j not in directions:
                    directions[j] = control_directions(sae.W_dec[j], n_controls, seed, j)
                direction = directions[j][k]
            out[p] = (dev_accuracy(loaded, dev, sae, j, alpha, cfg, direction) if rendered is None
                      else dev_loss(loaded, rendered, sae, j, alpha, cfg, direction))
        return out
    return run


def block_residual(model: Any, layer: int, batch: Any) -> tuple[torch.Tensor, bool]:
    """Block `layer`'s output `[b, t, d]` on `batch` (the forward stops there), and whether the
    block returns a tuple."""
    from mechsieve.models.hooks import StopForward, block_output, hook_points

    store: dict[str, Any] = {}

    def hook(module, args, output):
        store["h"], store["tuple"] = block_output(output), isinstance(output, tuple)
        raise StopForward

    handle = hook_points(model).block(layer).register_forward_hook(hook)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return store["h"], store["tuple"]


_UNSET = object()


@contextmanager
def blocks_replaced(model: Any, layer: int, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Inside, blocks 0 .. layer do no work: block `layer` returns `hidden` and those below it
    return their input, so a forward runs only the blocks above `layer` (and the embedding)."""
    from mechsieve.models.hooks import hook_points

    def skip(fixed: torch.Tensor | None) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            h = fixed if fixed is not None else (args[0] if args else kwargs["hidden_states"])
            return (h,) if as_tuple else h
        return forward

    blocks = [hook_points(model).block(i) for i in range(layer + 1)]
    saved = [b.__dict__.get("forward", _UNSET) for b in blocks]  # keep e.g. accelerate's own forward
    for i, block in enumerate(blocks):
        block.forward = skip(hidden if i == layer else None)
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is _UNSET:
                del block.forward
            else:
                block.forward = old


class BatchedDevLoss:
    """Dev loss (as `dev_loss`) of many steering pairs at once. Each dev batch's residual at the SAE
    layer is computed once (a forward stopped there) and encoded once; a steered forward then
    stacks `cfg.steer_batch` copies of the batch along the batch dimension, copy `p` pushed by
    pair `p` (its own direction, alpha and latent), and runs only the blocks above the SAE layer.
    Memory: a forward holds `steer_batch` x the dev batch's tokens (logits included)."""

    def __init__(self, loaded: Any, rendered: Sequence[Any], sae: Any, cfg: Any, n_controls: int, seed: int) -> None:
        from mechsieve.capture.batching import collate, plan_batches
        from mechsieve.data.render import pad_id

        self.model, self.sae, self.cfg = loaded.model, sae, cfg
        self.n_controls, self.seed = n_controls, seed
        self.step = max(1, int(cfg.steer_batch))
        device = next(self.model.parameters()).device
        plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
        self.batches = [collate([rendered[i] for i in idx], pad_id(loaded.tokenizer), "right").to(device)
                        for idx in plan.batches]
        self.resid: list[tuple[torch.Tensor, bool] | None] = [None] * len(self.batches)
        self.head_on_response = head_takes_a_mask(self.model)

    def residual(self, i: int) -> tuple[torch.Tensor, bool]:
        if self.resid[i] is None:
            self.resid[i] = block_residual(self.model, self.sae.layer, self.batches[i])
        return self.resid[i]

    def steer_mask(self, batch: Any, h: torch.Tensor) -> torch.Tensor:
        """`[b, t]` bool: the positions steered (as `dev_loss` steers them)."""
        mask = steer_mask_fn({"batch": batch}, self.cfg.steer_positions, self.cfg.position)(h)
        if skips_first(self.cfg):
            mask = mask & not_first_token(batch.attention_mask, h.shape[1])
        return mask

    def __call__(self, pairs: SteerPairs) -> np.ndarray:
        sae = self.sae
        dirs = pairs.directions(sae, self.n_controls, self.seed)  # [P, d]
        feats = torch.as_tensor(pairs.features, device=dirs.device)
        alphas = torch.as_tensor(pairs.alphas, device=dirs.device, dtype=sae.W_dec.dtype)
        totals = np.zeros(len(pairs))
        count = 0
        with torch.no_grad():
            for i, batch in enumerate(self.batches):
                h, as_tuple = self.residual(i)  # [b, t, d]
                b, t, d = h.shape
                a = sae.encode(h)  # [b, t, d_sae]
                mask = self.steer_mask(batch, h).to(a.dtype)
                resp = batch.response_mask[:, 1:]
                target = batch.input_ids[:, 1:][resp]
                n_resp = int(resp.sum())
                count += n_resp
                for s in range(0, len(pairs), self.step):
                    e = min(s + self.step, len(pairs))
                    scale = (alphas[s:e, None, None] - 1.0) * a[..., feats[s:e]].permute(2, 0, 1) * mask[None]
                    pushed = h[None] + scale[..., None].to(h.dtype) * dirs[s:e, None, None, :].to(h.dtype)
                    copies = e - s
                    # the output head only where a response token is predicted, when the model can
                    predicts = torch.nn.functional.pad(resp, (0, 1)).repeat(copies, 1)  # [copies * b, t]
                    extra = {"logits_to_keep": predicts} if self.head_on_response else {}
                    with blocks_replaced(self.model, sae.layer, pushed.reshape(copies * b, t, d), as_tuple):
                        logits = self.model(input_ids=batch.input_ids.repeat(copies, 1),
                                            attention_mask=batch.attention_mask.repeat(copies, 1),
                                            position_ids=batch.position_ids.repeat(copies, 1), use_cache=False,
                                            **extra).logits
                    if logits.dim() == 3:
                        logits = logits[predicts]
                    nll = torch.nn.functional.cross_entropy(logits.float(), target.repeat(copies), reduction="none")
                    totals[s:e] += nll.view(copies, n_resp).sum(1).double().cpu().numpy()
        return totals / max(count, 1)


def head_takes_a_mask(model: Any) -> bool:
    """Whether `model(..., logits_to_keep=mask [b, t] bool)` returns logits `[mask.sum(), V]`
    only (transformers >= 5: `slice_logits_to_keep`), so the output head skips prompt tokens."""
    import inspect

    import transformers.modeling_utils as mu

    from mechsieve.models.hooks import unwrap

    return hasattr(mu, "slice_logits_to_keep") and "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


@contextmanager
def count_forwards(model: Any) -> Iterator[list[int]]:
    """`[n]`: how many times `model` was called inside (forwards stopped early included)."""
    n = [0]

    def pre(module, args):
        n[0] += 1

    handle = model.register_forward_pre_hook(pre)
    try:
        yield n
    finally:
        handle.remove()


@dataclass
class Filtering:
    """Interventional filtering of `c` candidate latents: each one's best delta over the alphas
    (`deltas` [c]) and that alpha, the unsteered dev metric, its controls' deltas (best over the
    alphas likewise; [c, controls], nan where none ran) and their `quantile` (`control_q` [c]),
    and the work: steering pairs evaluated and model forwards (early-stopped ones included).
    Where fewer than all of a candidate's controls ran (`control_stop`), `control_q` is the
    `stop_after`-th largest of them, a lower bound of the quantile that is already at or above the
    candidate's delta."""

    deltas: np.ndarray
    best_alpha: np.ndarray
    base: float
    control_deltas: np.ndarray
    control_q: np.ndarray
    quantile: float
    pairs: int
    forwards: int = 0

    def table(self, features: np.ndarray, kept_idx: np.ndarray, fallback: bool) -> list[dict[str, Any]]:
        """Per candidate: delta, best alpha, the controls' quantile, kept or dropped and why."""
        kept = {int(i) for i in kept_idx}
        rows = []
        for c, j in enumerate(features):
            delta, q = float(self.deltas[c]), float(self.control_q[c])
            if c in kept and fallback:
                why = "kept: none passed, the best is kept (none_kept=best)"
            elif c in kept:
                why = "kept" if np.isnan(q) or delta > q else "kept (keep=top), though delta <= the controls' quantile"
            elif delta <= 0:
                why = "dropped: delta <= 0"
            elif not np.isnan(q) and delta <= q:
                why = f"dropped: delta <= the controls' {self.quantile:g} quantile"
                ran, total = self.ran(c), self.control_deltas.shape[1]
                if ran < total:
                    why += f" (decided after {ran} of {total} controls; control_q is a lower bound)"
            else:
                why = "dropped: not among the keep_top best"
            rows.append({"feature": int(j), "delta": round(delta, 6), "best_alpha": float(self.best_alpha[c]),
                         "control_q": None if np.isnan(q) else round(q, 6), "controls_run": self.ran(c),
                         "kept": c in kept, "why": why})
        return rows

    def ran(self, c: int) -> int:
        """Controls evaluated for candidate `c`."""
        return int((~np.isnan(self.control_deltas[c])).sum())


def best_over_alphas(deltas: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`deltas: [..., A]` -> the best delta `[...]` and its alpha (ties: the first alpha)."""
    idx = np.argmax(deltas, axis=-1)
    return np.take_along_axis(deltas, idx[..., None], -1)[..., 0], alphas[idx]


def control_quantiles(control_deltas: np.ndarray, quantile: float) -> np.ndarray:
    """`[c]`: each row's `quantile` (linear interpolation) of `control_deltas: [c, n]`; nan for
    rows not run (nan) and when n = 0."""
    out = np.full(control_deltas.shape[0], np.nan)
    ran = ~np.isnan(control_deltas).any(axis=1) if control_deltas.shape[1] else np.zeros(len(out), dtype=bool)
    if ran.any():
        out[ran] = np.quantile(control_deltas[ran], quantile, axis=1)
    return out


def stop_after(n: int, quantile: float) -> int:
    """How many of `n` controls at or above a delta decide that the delta is not above their
    `quantile` (linear interpolation): `n - floor(quantile (n - 1))`, since then the sorted value
    the quantile starts from is one of them. Where `quantile (n - 1)` is an integer one more is
    asked, so that float rounding can never stop a candidate too early."""
    return n - max(0, int(np.floor(quantile * (n - 1) - 1e-9)))


def interventional_filter(evaluate: Evaluate, features: np.ndarray, alphas: Sequence[float], sign: float,
                          controls: int, quantile: float, keep: str, keep_top: int,
                          control_stop: bool = False) -> Filtering:
    """IGDS step 4 with controls. Round 1: the unsteered metric (a pair with alpha = 1, a push of
    exactly 0) and every (latent, alpha); `delta = sign * (steered - base)` (sign -1 for a loss),
    best over the alphas. Round 2: `controls` random directions at every alpha for the candidates
    that can be kept (delta > 0 under keep=positive, the keep_top best under keep=top).
    `control_stop` (keep=positive only): round 2 runs one control at a time for the candidates
    still undecided, and a candidate is out once `stop_after` of its controls reach its delta,
    which already puts the quantile at or above it: the same latents are kept as with every
    control run, for fewer pairs."""
    features = np.asarray(features, dtype=np.int64)
    alphas_a = np.asarray(alphas, dtype=np.float64)
    c, n_alpha = len(features), len(alphas_a)
    vals = evaluate(SteerPairs.grid(features[:1], [1.0], [-1]) + SteerPairs.grid(features, alphas_a, [-1]))
    base = float(vals[0])
    deltas, best_alpha = best_over_alphas(sign * (vals[1:].reshape(c, n_alpha) - base), alphas_a)
    if keep == "top":
        need = np.argsort(-deltas, kind="stable")[:keep_top]
    else:
        need = np.flatnonzero(deltas > 0)
    control_deltas = np.full((c, max(controls, 0)), np.nan)
    pairs = len(vals)
    if controls > 0 and len(need) and control_stop and keep == "positive":
        m = stop_after(controls, quantile)
        alive = need
        for k in range(controls):
            if not len(alive):
                break
            cv = evaluate(SteerPairs.grid(features[alive], alphas_a, [k]))
            pairs += len(cv)
            control_deltas[alive, k] = best_over_alphas(sign * (cv.reshape(len(alive), n_alpha) - base), alphas_a)[0]
            reached = (control_deltas[alive, :k + 1] >= deltas[alive, None]).sum(axis=1)
            alive = alive[reached < m]
        ran = (~np.isnan(control_deltas)).sum(axis=1)
        control_q = control_quantiles(control_deltas, quantile)
        for i in need[ran[need] < controls]:  # stopped early: only a stop leaves a needed candidate short
            control_q[i] = np.sort(control_deltas[i, :ran[i]])[-m]  # a lower bound, >= delta
        return Filtering(deltas, best_alpha, base, control_deltas, control_q, quantile, pairs)
    if controls > 0 and len(need):
        cv = evaluate(SteerPairs.grid(features[need], alphas_a, np.arange(controls)))
        pairs += len(cv)
        control_deltas[need] = best_over_alphas(sign * (cv.reshape(len(need), controls, n_alpha) - base), alphas_a)[0]
    return Filtering(deltas, best_alpha, base, control_deltas, control_quantiles(control_deltas, quantile),
                     quantile, pairs)
