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

LoRA (the LESS baseline): peft's `lora_A` / `lora_B` are plain bias-free `nn.Linear` layers, so
the same trick gives exact per-example gradients of the adapter (`lora_modules` lists them in
parameter order). `RademacherProjector` is the dense alternative to the Kronecker one: a
[P, d] matrix of seeded +-1/sqrt(d) entries regenerated block by block from (seed, block) each
time it is applied (as packed bits: drawing and unpacking them costs less than the product), so
it is never held whole; `project_rows` gathers streamed gradient rows into chunks under a
memory budget, so that each regeneration serves many examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechsieve.capture.batching import Collated, collate, plan_batches
from mechsieve.config import ConfigError
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


def mean_response_loss(model: Any, batch: Collated) -> torch.Tensor:
    """Per-example mean cross entropy over response tokens -> [b] (0 without response tokens).

    The loss LESS differentiates (Hugging Face's token-mean loss of a batch of one). The output
    head runs only at positions that predict a response token in some row (`logits_to_keep`),
    which spares the [b, t, vocab] logits of prompts and padding."""
    mask = batch.response_mask[:, 1:]  # [b, t-1]: position t predicts response token t + 1
    keep = mask.any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # no response token at all: a zero that is still part of the graph
        keep = torch.zeros(1, dtype=torch.long, device=mask.device)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    try:
        logits = model(**inputs, logits_to_keep=keep).logits  # [b, k, V]
    except TypeError:  # a model without logits_to_keep
        logits = model(**inputs).logits[:, keep]
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, batch.input_ids[:, keep + 1, None]).squeeze(-1) * mask[:, keep].to(logp.dtype)
    return nll.sum(1) / mask.sum(1).clamp(min=1)


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
        raise ConfigError(f"no nn.Linear modules ({kinds}) in blocks {list(layers)} of this model "
                          "(GPT-2 uses Conv1D: choose another architecture for gradient methods, or other "
                          "tracked kinds / blocks)")
    return out


def lora_modules(model: Any) -> list[tuple[str, torch.nn.Linear]]:
    """(full name, module) of every LoRA `lora_A` / `lora_B` linear layer of a peft model, in
    `named_parameters` order, so gradient columns line up with the adapter's parameter names
    (`name + ".weight"`)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)]
    if not found:
        raise ValueError("the model carries no LoRA adapter (no lora_A / lora_B layers); wrap it with "
                         "mechsieve.train.wrap_for_training first")
    bad = [n for n, m in found if m.bias is not None]
    if bad:
        raise ValueError(f"LoRA layers with a bias are not supported: {bad[:3]}")
    return found


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


@dataclass
class RademacherProjector:
    """Dense Rademacher projection R [n_params, dim] with entries +-1/sqrt(dim) (so that
    E[<R^T x, R^T y>] = <x, y>), as in LESS / TRAK. Rows come in blocks of `block_rows`; block j
    is drawn from numpy's PCG64 seeded by (seed, j) as packed sign bits, so the whole matrix is
    never held, the same seed gives the same R for the pool and the target, and R does not
    depend on the device it is applied on."""

    n_params: int
    dim: int = 8192
    seed: int = 0
    block_rows: int = 1024

    def __post_init__(self) -> None:
        if self.n_params < 1 or self.dim < 1 or self.block_rows < 1 or self.seed < 0:
            raise ValueError(f"n_params ({self.n_params}), dim ({self.dim}) and block_rows ({self.block_rows}) "
                             f"must be >= 1 and seed ({self.seed}) >= 0")

    @property
    def n_blocks(self) -> int:
        return -(-self.n_params // self.block_rows)

    def bits(self, j: int, device: Any = "cpu") -> torch.Tensor:
        """Block j of (R sqrt(dim) + 1) / 2, the sign bits -> [rows, dim] float32 of 0 / 1."""
        rows = min(self.block_rows, self.n_params - j * self.block_rows)
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, j])))
        packed = np.frombuffer(gen.bytes(-(-rows * self.dim // 8)), dtype=np.uint8)
        if torch.device(device).type == "cpu":
            bits = torch.from_numpy(np.unpackbits(packed))
        else:  # unpack on the device: only the packed bytes travel
            bits = unpack_bits(torch.from_numpy(packed.copy()).to(device))
        return bits[: rows * self.dim].reshape(rows, self.dim).to(torch.float32)

    def block(self, j: int, device: Any = "cpu") -> torch.Tensor:
        """Rows [j * block_rows, ...) of R as +-1 signs (unscaled) -> [rows, dim] float32."""
        return self.bits(j, device).mul_(2).sub_(1)

    def project(self, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """x [b, n_params] -> x R [b, dim] float32, one block of R at a time, as
        x R = (2 x B - rowsum(x)) / sqrt(dim) with B the 0/1 bits (one pass fewer per block)."""
        from tqdm.auto import tqdm

        if x.shape[-1] != self.n_params:
            raise ValueError(f"rows of width {x.shape[-1]} for a projector of {self.n_params} parameters")
        x = x.float()
        out = torch.zeros(x.shape[0], self.dim, device=x.device)
        for j in tqdm(range(self.n_blocks), desc=f"project {x.shape[0]} rows", unit="block",
                      disable=not progress, leave=False):
            start = j * self.block_rows
            out.addmm_(x[:, start:start + self.block_rows], self.bits(j, x.device))
        return out.mul_(2).sub_(x.sum(1, keepdim=True)).mul_(self.dim ** -0.5)

    def matrix(self) -> torch.Tensor:
        """Reference: the whole R [n_params, dim] (small sizes only)."""
        return torch.cat([self.block(j) for j in range(self.n_blocks)]) * self.dim ** -0.5


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """np.unpackbits in torch (most significant bit first): uint8 [m] -> uint8 [8 m] of 0 / 1."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)


Rows = Iterator[tuple[list[int], torch.Tensor]]


def project_rows(rows: Rows, projector: RademacherProjector, n: int,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 memory_mb: float = 2048, progress: bool = False) -> np.ndarray:
    """Project streamed rows ((indices, [b, n_params]) as from `iter_per_example_grads`) -> [n, dim]
    float32. Each batch is optionally transformed as it comes (`transform`: [m, n_params] ->
    [m, n_params], e.g. Adam preconditioning); rows are gathered until they fill `memory_mb` (at
    least one batch) and projected together, so each regeneration of R serves as many examples
    as memory allows."""
    out = np.zeros((n, projector.dim), dtype=np.float32)
    cap = max(1, int(memory_mb * 2**20 // (4 * projector.n_params)))
    idx_buf: list[int] = []
    row_buf: list[torch.Tensor] = []

    def flush() -> None:
        if not row_buf:
            return
        out[idx_buf] = projector.project(torch.cat(row_buf), progress).cpu().numpy()
        idx_buf.clear()
        row_buf.clear()

    for idx, block in rows:
        idx_buf += idx
        row_buf.append(block if transform is None else transform(block))
        if len(idx_buf) >= cap:
            flush()
    flush()
    return out


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
    dim = projector.dim if projector is not None else sum(m.weight.numel() for _, m in modules)
    out = np.zeros((len(rendered), dim), dtype=np.float32)
    for idx, rows in iter_per_example_grads(model, rendered, modules, objective, projector, pad_id,
                                            max_tokens, max_batch, progress):
        out[idx] = rows.cpu().numpy()
    return out


def iter_per_example_grads(
    model: Any,
    rendered: Sequence[Rendered],
    modules: Sequence[tuple[str, Any]],
    objective: Objective = response_loss,
    projector: KronProjector | None = None,
    pad_id: int = 0,
    max_tokens: int = 2048,
    max_batch: int = 16,
    progress: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """`per_example_grads` one length-bucketed batch at a time: yields (indices into `rendered`,
    rows [b, P] float32 on the model's device), so a caller can transform and project the full
    gradients of a batch without ever holding those of the whole set."""
    from tqdm.auto import tqdm

    device = modules[0][1].weight.device
    plan = plan_batches([len(r) for r in rendered], max_tokens, max_batch)
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
            saved.clear()
            row = []
            for k, (_, m) in enumerate(modules):
                if k in pieces:
                    row.append(pieces[k])
                else:  # the pass stopped before this module: its gradient is zero
                    width = (projector.p_in[k].shape[1] * projector.p_out[k].shape[1]
                             if projector is not None else m.weight.numel())
                    row.append(torch.zeros(len(idx), width, device=device))
            yield list(idx), torch.cat(row, 1)
            bar.update(int(batch.lengths.sum()))
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        bar.close()
