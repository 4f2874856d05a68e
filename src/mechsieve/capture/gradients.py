"""Per-example gradients of linear-layer weights, batched, with a Kronecker random projection.

Objectives (one scalar per example, differentiable): `response_loss` (summed next-token cross
entropy over response tokens) and `concept_objective` (mean over response tokens of the residual
stream at a layer projected on a unit direction; the pass stops after that block).

For a linear layer `y = W a` the gradient of example b is `sum_t g_{b,t} a_{b,t}^T` ([out, in]);
`per_example_grads` builds it from the layer inputs and output gradients of one batched backward
pass (padding contributes nothing: its output gradient is zero). With a `KronProjector` it never
forms the [out, in] matrix: `P_out^T G^T A P_in = (G P_out)^T (A P_in)` is a random projection
of the flattened gradient by `P_out (x) P_in` (LoGra, Choe et al. 2024, "What is your data worth
to GPT?"; LESS uses a dense Rademacher projection, which at [params x 8192] does not fit a CPU).
`per_example_grads_loop` is the simple reference: one example at a time, `torch.autograd.grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechsieve.capture.batching import Collated, collate, plan_batches
from mechsieve.data.render import Rendered
from mechsieve.models.hooks import StopForward, block_output, hook_points, unwrap

Objective = Callable[[Any, Collated], torch.Tensor]  # (model, batch) -> [b], differentiable


def response_loss(model: Any, batch: Collated) -> torch.Tensor:
    """Per-example summed cross entropy of the response tokens -> [b]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    return token_losses(logits, batch.input_ids, batch.response_mask).sum(1)


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """CE of each response token given the tokens before it -> [b, t] (0 off the response).

    Column t holds the loss of token t (predicted by the logits at t - 1); column 0 is 0.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    nll = nll * response_mask[:, 1:].to(nll.dtype)
    return torch.cat([torch.zeros_like(nll[:, :1]), nll], 1)


def concept_objective(layer: int, unit: torch.Tensor) -> Objective:
    """f_v(x) = mean over response tokens of h_layer(x)_t . unit -> [b] (Concept Influence, eq. 2).

    The forward pass stops after block `layer`, so no block above it gets a gradient.
    """
    def objective(model: Any, batch: Collated) -> torch.Tensor:
        hp = hook_points(model)
        store: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            store["h"] = block_output(output)
            raise StopForward

        handle = hp.block(layer).register_forward_hook(hook)
        try:
            unwrap(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        h = store["h"].float()
        mask = batch.response_mask.to(h.dtype)
        proj = h @ unit.to(h.device, h.dtype)
        return (proj * mask).sum(1) / mask.sum(1).clamp(min=1)

    return objective


def linear_modules(model: Any, layers: Sequence[int], kinds: str = "all") -> list[tuple[str, torch.nn.Linear]]:
    """(full name, module) of the nn.Linear layers inside blocks `layers`.

    kinds: `all`, `mlp` (names containing "mlp") or `attn` (the others)."""
    hp = hook_points(model)
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    out = []
    for layer in layers:
        for sub_name, mod in hp.block(layer).named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            is_mlp = "mlp" in sub_name
            if kinds == "all" or (kinds == "mlp" and is_mlp) or (kinds == "attn" and not is_mlp):
                out.append((names[id(mod)], mod))
    if not out:
        raise ValueError(f"no nn.Linear modules ({kinds}) in blocks {list(layers)} of this model "
                         "(GPT-2 uses Conv1D: choose another architecture for gradient methods)")
    return out


@dataclass
class KronProjector:
    """Seeded Rademacher matrices per module: p_in [in, k_in], p_out [out, k_out], scaled so
    that E[|P^T x|^2] = |x|^2. Projected dimension of a module: k_out * k_in."""

    p_in: list[torch.Tensor]
    p_out: list[torch.Tensor]

    @classmethod
    def make(cls, shapes: Sequence[tuple[int, int]], k_in: int, k_out: int, seed: int = 0) -> KronProjector:
        gen = torch.Generator().manual_seed(seed)
        p_in, p_out = [], []
        for out_f, in_f in shapes:
            ki, ko = min(k_in, in_f), min(k_out, out_f)
            p_in.append((torch.randint(0, 2, (in_f, ki), generator=gen).float() * 2 - 1) / ki ** 0.5)
            p_out.append((torch.randint(0, 2, (out_f, ko), generator=gen).float() * 2 - 1) / ko ** 0.5)
        return cls(p_in, p_out)

    @property
    def dim(self) -> int:
        return sum(pi.shape[1] * po.shape[1] for pi, po in zip(self.p_in, self.p_out))

    def project_dense(self, flat: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Reference: flattened gradients [n, sum(out*in)] times the explicit kron(P_out, P_in)."""
        parts, start = [], 0
        for (out_f, in_f), pi, po in zip(shapes, self.p_in, self.p_out):
            block = flat[:, start:start + out_f * in_f]
            parts.append(block @ torch.kron(po, pi))
            start += out_f * in_f
        return torch.cat(parts, 1)


def per_example_grads_loop(model: Any, rendered: Sequence[Rendered], modules: Sequence[tuple[str, Any]],
                           objective: Objective = response_loss, pad_id: int = 0) -> torch.Tensor:
    """Reference: one example at a time -> [n, sum(out*in)] float32 (row-major per module)."""
    weights = [m.weight for _, m in modules]
    rows = []
    for r in rendered:
        batch = collate([r], pad_id).to(weights[0].device)
        value = objective(model, batch).sum()
        grads = torch.autograd.grad(value, weights, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1).float()
                               for g, w in zip(grads, weights)]))
    return torch.stack(rows)


def per_example_grads(
    model: Any,
    rendered: Sequence[Rendered],
    modules: Sequence[tuple[str, Any]],
    objective: Objective = response_loss,
    projector: KronProjector | None = None,
    pad_id: int = 0,
    max_tokens: int = 2048,
    max_batch: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Batched per-example gradients -> [n, P] float32 in `rendered` order; P = sum(out*in), or
    `projector.dim` with a projector. Only the module outputs are differentiated (no weight .grad)."""
    from tqdm.auto import tqdm

    device = modules[0][1].weight.device
    plan = plan_batches([len(r) for r in rendered], max_tokens, max_batch)
    dim = projector.dim if projector is not None else sum(m.weight.numel() for _, m in modules)
    out = np.zeros((len(rendered), dim), dtype=np.float32)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(k: int):
        def hook(mod, args, output):
            saved[k] = (args[0], output)
        return hook

    handles = [m.register_forward_hook(make_hook(k)) for k, (_, m) in enumerate(modules)]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in modules:
        m.weight.requires_grad_(True)  # makes the module outputs part of the graph
    bar = tqdm(total=plan.real_tokens, unit="tok", desc="gradients", disable=not progress, leave=False)
    try:
        for idx in plan.batches:
            batch = collate([rendered[i] for i in idx], pad_id).to(device)
            saved.clear()
            value = objective(model, batch).sum()
            ks = sorted(saved)
            outs = torch.autograd.grad(value, [saved[k][1] for k in ks], allow_unused=True)
            pieces = {}
            for k, g in zip(ks, outs):
                a = saved[k][0].detach().float()
                g = torch.zeros_like(saved[k][1]) if g is None else g.float()
                if projector is not None:
                    pg = g @ projector.p_out[k].to(device)
                    pa = a @ projector.p_in[k].to(device)
                    pieces[k] = torch.einsum("bto,bti->boi", pg, pa).reshape(len(idx), -1)
                else:
                    pieces[k] = torch.einsum("bto,bti->boi", g, a).reshape(len(idx), -1)
            row = []
            for k, (_, m) in enumerate(modules):
                if k in pieces:
                    row.append(pieces[k])
                else:  # the pass stopped before this module: its gradient is zero
                    width = (projector.p_in[k].shape[1] * projector.p_out[k].shape[1]
                             if projector is not None else m.weight.numel())
                    row.append(torch.zeros(len(idx), width, device=device))
            out[idx] = torch.cat(row, 1).cpu().numpy()
            bar.update(int(batch.lengths.sum()))
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        bar.close()
    return out
