"""Activation capture with on-the-fly reductions: `[n_examples, n_layers, d]` float32 per reduction.

Per-token activations never outlive their layer's hook: each reduction folds them into the
result arrays at once, and a per-token consumer (SAE encoding, token scores) sees them there.
With an output folder, results are written in chunks as batches finish, so an interrupted run
resumes where it stopped; the finished arrays are one safetensors file with a JSON beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.capture.batching import BatchPlan, plan_batches
from mechsieve.capture.forward import BatchContext, ForwardSpec, ForwardStats, run_forward
from mechsieve.capture.reductions import REDUCTIONS
from mechsieve.config import ConfigError, check_choice, to_dict
from mechsieve.data.render import Rendered, pad_id
from mechsieve.models.hooks import hook_points

Consumer = Callable[[BatchContext, int, torch.Tensor], None]


@dataclass
class CaptureConfig:
    """Which activations to capture and how to batch the pass."""

    layers: list[int] | Literal["all"] = "all"
    """Blocks to read (negative counts from the end), or `all`."""
    site: Literal["resid", "mlp"] = "resid"
    """`resid`: residual stream after the block; `mlp`: MLP neurons (input of the down projection)."""
    reductions: list[str] = field(default_factory=lambda: ["mean_response"])
    """Any of last_prompt, mean_response, mean_prompt, mean_all, last, drift."""
    max_tokens: int = 4096
    """Token budget of one batch (batch size x longest sequence in it)."""
    max_batch: int = 64
    """At most this many examples in one batch."""
    padding_side: Literal["right", "left"] = "right"
    """Where padding goes; results are the same either way (position ids skip padding)."""
    chunk_examples: int = 256
    """With an output folder: write a resumable chunk after about this many examples."""

    def __post_init__(self) -> None:
        check_choice("capture.site", self.site, ("resid", "mlp"))
        check_choice("capture.padding_side", self.padding_side, ("right", "left"))
        for name in self.reductions:
            check_choice("capture.reductions", name, REDUCTIONS)
        if not self.reductions:
            raise ConfigError(f"capture.reductions is empty; choose from {list(REDUCTIONS)}")
        if self.max_tokens < 1 or self.max_batch < 1 or self.chunk_examples < 1:
            raise ConfigError("capture.max_tokens, capture.max_batch and capture.chunk_examples must be >= 1")


@dataclass
class CaptureResult:
    """arrays[reduction]: [n, len(layers), d] float32; n_response_tokens: [n]."""

    arrays: dict[str, np.ndarray]
    layers: list[int]
    n_response_tokens: np.ndarray
    plan: BatchPlan
    stats: ForwardStats
    resumed_examples: int = 0

    def summary(self) -> dict[str, Any]:
        any_arr = next(iter(self.arrays.values()))
        return {
            "examples": int(any_arr.shape[0]),
            "layers": self.layers,
            "d": int(any_arr.shape[-1]),
            "reductions": sorted(self.arrays),
            "batches": len(self.plan.batches),
            "padding_efficiency": round(self.plan.padding_efficiency, 4),
            "tokens": self.stats.real_tokens,
            "seconds": round(self.stats.seconds, 3),
            "tokens_per_s": round(self.stats.tokens_per_s, 1),
            "resumed_examples": self.resumed_examples,
            "no_response_tokens": int((self.n_response_tokens == 0).sum()),
        }


def site_width(model: Any, site: str) -> int:
    hp = hook_points(model)
    if site == "resid":
        base_cfg = model.config
        return int(getattr(base_cfg, "hidden_size", None) or base_cfg.n_embd)
    down = hp.mlp_down(0)
    if hasattr(down, "in_features"):
        return int(down.in_features)
    return int(down.weight.shape[0])  # GPT-2 Conv1D stores [in, out]


def capture(
    model: Any,
    rendered: Sequence[Rendered],
    cfg: CaptureConfig | None = None,
    pad_id: int = 0,
    consumer: Consumer | None = None,
    writer: Any = None,
    progress: bool = True,
) -> CaptureResult:
    """Capture reductions of activations for every rendered example (see module docstring).

    `consumer(ctx, layer, acts[b, t, d])` additionally sees the per-token activations of each
    captured layer. `writer` (a store.ChunkedWriter) makes the run resumable: chunks already in
    it are loaded instead of recomputed.
    """
    cfg = cfg or CaptureConfig()
    if not rendered:
        raise ValueError("nothing to capture: the pool is empty")
    hp = hook_points(model)
    check_positions(model, max(len(r) for r in rendered))
    layers = hp.normalize_layers(cfg.layers)
    d = site_width(model, cfg.site)
    n = len(rendered)
    arrays = {name: np.zeros((n, len(layers), d), dtype=np.float32) for name in cfg.reductions}
    n_resp = np.array([int(r.response_mask.sum()) for r in rendered], dtype=np.int64)
    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    chunks = _chunk_batches(plan, cfg.chunk_examples)
    slot = {layer: k for k, layer in enumerate(layers)}
    todo = list(range(len(plan.batches)))
    resumed = 0
    if writer is not None:
        for k in sorted(writer.done()):
            if k >= len(chunks):
                continue
            saved = writer.read(k)
            idx = saved["indices"]
            for name in cfg.reductions:
                arrays[name][idx] = saved[name]
            resumed += len(idx)
        finished = {b for k in writer.done() if k < len(chunks) for b in chunks[k]}
        todo = [b for b in todo if b not in finished]

    def on_layer(ctx: BatchContext, layer: int, acts: torch.Tensor) -> None:
        acts32 = acts.float()
        for name in cfg.reductions:
            arrays[name][ctx.indices, slot[layer]] = REDUCTIONS[name](acts32, ctx.batch).cpu().numpy()
        if consumer is not None:
            consumer(ctx, layer, acts)

    chunk_of = {b: k for k, members in enumerate(chunks) for b in members}
    remaining = {k: len(members) for k, members in enumerate(chunks)}

    def on_batch_end(number: int, ctx: BatchContext) -> None:
        if writer is None:
            return
        k = chunk_of[number]
        remaining[k] -= 1
        if remaining[k] == 0:
            idx = np.array(sorted(i for b in chunks[k] for i in plan.batches[b]), dtype=np.int64)
            writer.write(k, {"indices": idx, **{name: arrays[name][idx] for name in cfg.reductions}})

    todo_set = set(todo)
    for k, members in enumerate(chunks):
        remaining[k] = sum(1 for b in members if b in todo_set)
    spec = ForwardSpec(layers=layers, site=cfg.site)
    start = time.perf_counter()
    stats = run_forward(model, rendered, plan, spec, pad_id, cfg.padding_side, on_layer=on_layer,
                        batches=todo, on_batch_end=on_batch_end, progress=progress, desc="capture")
    stats.seconds = time.perf_counter() - start
    return CaptureResult(arrays, layers, n_resp, plan, stats, resumed)


def check_positions(model: Any, longest: int) -> None:
    """Refuse sequences longer than the model's position table, naming the setting to change."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and longest > limit:
        raise ConfigError(f"a rendered example has {longest} tokens, more than this model's {limit} "
                          f"positions; lower render.max_len to at most {limit}")


def _chunk_batches(plan: BatchPlan, chunk_examples: int) -> list[list[int]]:
    """Consecutive batches grouped until a chunk holds at least `chunk_examples` examples."""
    chunks: list[list[int]] = []
    current: list[int] = []
    count = 0
    for b, members in enumerate(plan.batches):
        current.append(b)
        count += len(members)
        if count >= chunk_examples:
            chunks.append(current)
            current, count = [], 0
    if current:
        chunks.append(current)
    return chunks


def capture_settings(model_identity: dict[str, Any], data_fingerprint: str, cfg: CaptureConfig,
                     render_cfg: Any) -> dict[str, Any]:
    """The settings an activation artefact is keyed and checked by."""
    return {"model": model_identity, "data": data_fingerprint, "capture": to_dict(cfg),
            "render": to_dict(render_cfg)}


def save_capture(folder: str | Path, result: CaptureResult, settings: dict[str, Any], ids: list[str]) -> Path:
    """Write the finished arrays as `activations.safetensors` + `activations.json`."""
    from mechsieve.store.artefacts import save_artefact

    tensors = {**result.arrays, "n_response_tokens": result.n_response_tokens}
    return save_artefact(folder, "activations", tensors, settings,
                         extra={"layers": result.layers, "ids": ids, "summary": result.summary()})


def capture_pool(
    loaded: Any,
    pool: Any,
    cfg: CaptureConfig | None = None,
    render_cfg: Any = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    consumer: Consumer | None = None,
    progress: bool = True,
) -> tuple[CaptureResult, dict[str, Any]]:
    """Render `pool` with `loaded.tokenizer`, capture, and (with `out_dir`) save resumably.

    Returns the result and a report with the render statistics (truncations are counted here).
    An `out_dir` holding a capture made under other settings is refused (store.SettingsMismatch).
    """
    from mechsieve.data.render import RenderConfig, render_pool
    from mechsieve.store.artefacts import ChunkedWriter, artefact_exists, load_artefact

    cfg = cfg or CaptureConfig()
    render_cfg = render_cfg or RenderConfig()
    rendered, rstats = render_pool(pool.examples, loaded.tokenizer, render_cfg)
    settings = capture_settings(loaded.identity, pool.fingerprint(), cfg, render_cfg)
    report: dict[str, Any] = {"render": rstats.summary(), "truncated": rstats.truncated}
    writer = None
    if out_dir is not None:
        if artefact_exists(out_dir, "activations") and not overwrite:
            tensors, meta = load_artefact(out_dir, "activations", expected=settings)
            arrays = {k: v for k, v in tensors.items() if k != "n_response_tokens"}
            plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
            result = CaptureResult(arrays, meta["layers"], tensors["n_response_tokens"], plan,
                                   ForwardStats(), resumed_examples=len(rendered))
            report["cached"] = True
            return result, report
        writer = ChunkedWriter(out_dir, "activations", settings, overwrite=overwrite)
    result = capture(loaded.model, rendered, cfg, pad_id=pad_id(loaded.tokenizer),
                     consumer=consumer, writer=writer, progress=progress)
    if out_dir is not None:
        save_capture(out_dir, result, settings, [ex.id for ex in pool.examples])
        writer.cleanup()
    report["cached"] = False
    return result, report
