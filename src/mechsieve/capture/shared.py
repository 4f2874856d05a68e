"""One forward pass, many methods: the shared feature pass (DESIGN.md, "One pass, many methods").

A `Feature` is one per-example quantity a forward-only scorer reads from the model: NAIT's drift
projections, RDS+'s pooled last layer, the response loss, a concept layer's mean response, IGDS's
SAE latents. It names the layers it reads (and whether it needs the logits), reduces each batch
inside the hooks, and hands back `[n, ...]` arrays; nothing per-token outlives its layer.

`feature_pass` takes the features of any number of methods and runs one forward per `PassKey`
(the inputs, their rendering and the batching: features that agree on these share a pass, and
only they can, since other tokens or other batches are other numbers): the pass hooks the union
of the layers, hands each layer's activations to the features that read it, stops after the
deepest layer any of them needs and computes the logits only when one asks. Features with equal
keys are computed once (the `loss` scorer and IFD's conditional part are one feature). With a
`cache` (store.features.FeatureCache), each feature is stored under (model identity, data
fingerprint, pass key, feature key) and a later pass computes only what is missing.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mechsieve.capture.batching import plan_batches
from mechsieve.capture.forward import BatchContext, ForwardSpec, run_forward
from mechsieve.config import to_dict
from mechsieve.data.records import Example, fingerprint_examples


@dataclass(frozen=True)
class PassKey:
    """What makes two features' passes the same pass: inputs, rendering, batching, hook site."""

    render: Any
    """The RenderConfig both render with."""
    max_tokens: int
    """Token budget of one batch."""
    max_batch: int
    """At most this many examples in one batch."""
    inputs: Literal["example", "response_only"] = "example"
    """`example`: prompt and response; `response_only`: the response alone as plain text (IFD's y)."""
    site: Literal["resid", "mlp", "attention"] = "resid"
    """Which activations `on_layer` receives; `attention`: the residual stream, in a pass under eager
    attention (slower, so features that read attention probabilities get a pass of their own)."""

    def settings(self) -> dict[str, Any]:
        return {"render": to_dict(self.render), "max_tokens": self.max_tokens, "max_batch": self.max_batch,
                "inputs": self.inputs, "site": self.site}

    def id(self) -> str:
        return json.dumps(self.settings(), sort_keys=True, default=str)


class Feature(ABC):
    """One per-example feature computed in a forward pass (see the module docstring).

    Subclasses set `kind` and `layers` (non-negative block indices) or `need_logits`, and
    implement `settings` (JSON-able, with a digest of any array they project on), `begin`,
    `on_layer` / `on_logits` and `arrays`. A feature is a reducer: `begin(n)` allocates its
    result arrays, each batch writes rows `ctx.indices`, `arrays()` returns them.
    """

    kind: ClassVar[str] = ""
    layers: list[int]
    need_logits: bool = False
    reads_attention: ClassVar[bool] = False
    """True: `on_layer` receives the layers' attention probabilities [b, heads, t, t] (eager
    attention; the pass key's site must be `attention`) instead of their activations."""

    def __init__(self, key: PassKey) -> None:
        self.key = key
        self.layers = []

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What, beside the pass key, determines the arrays (JSON-able)."""

    def full_key(self) -> dict[str, Any]:
        return {"feature": self.kind, "layers": [int(x) for x in self.layers], "logits": self.need_logits,
                "pass": self.key.settings(), "settings": self.settings()}

    @abstractmethod
    def begin(self, n: int) -> None:
        """Allocate the result arrays for `n` examples."""

    def on_layer(self, ctx: BatchContext, layer: int, acts: torch.Tensor) -> None:
        """Reduce one hooked layer's activations `acts: [b, t, d]` into rows `ctx.indices`."""
        return None

    def on_logits(self, ctx: BatchContext, logits: torch.Tensor) -> None:
        """Reduce the logits `[b, t, vocab]` into rows `ctx.indices` (only when `need_logits`)."""
        return None

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The result: arrays with one row per example."""


def digest(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (dtype, shape and bytes), for the settings of a feature that
    projects on them."""
    from mechsieve.store.artefacts import tensors_digest

    return tensors_digest({f"{i:03d}": np.asarray(a) for i, a in enumerate(arrays)})[:16]


# --- features shared by several scorers --------------------------------------------------------

class ResponseLoss(Feature):
    """Summed next-token NLL over response tokens and their count per example: `sums` [n] float64,
    `counts` [n] int64. Token t is scored from the logits at t-1 (a response token at position 0 has
    no loss); only the response positions' logits are taken, never the whole batch's in float."""

    kind = "response_loss"
    need_logits = True

    def settings(self) -> dict[str, Any]:
        return {}

    def begin(self, n: int) -> None:
        self.sums = np.zeros(n, dtype=np.float64)
        self.counts = np.zeros(n, dtype=np.int64)

    def on_logits(self, ctx: BatchContext, logits: torch.Tensor) -> None:
        batch = ctx.batch
        mask = batch.response_mask[:, 1:]
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        picked = logits[:, :-1][mask].float()  # [m, V]: only response positions
        nll = torch.nn.functional.cross_entropy(picked, batch.input_ids[:, 1:][mask], reduction="none")
        total = torch.zeros(mask.shape[0], dtype=torch.float64, device=nll.device)
        total.index_add_(0, rows, nll.double())
        self.sums[ctx.indices] = total.cpu().numpy()
        self.counts[ctx.indices] = mask.sum(1).cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums, "counts": self.counts}


class Pooled(Feature):
    """One reduction (capture.reductions) of one layer per example: `pooled` [n, d] float32, after
    the model's final norm when `norm` is given (Hugging Face `hidden_states[-1]`)."""

    kind = "pooled"

    def __init__(self, key: PassKey, layer: int, reduction: str, norm: torch.nn.Module | None = None) -> None:
        super().__init__(key)
        self.layers = [int(layer)]
        self.reduction = reduction
        self.norm = norm

    def settings(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "final_norm": self.norm is not None}

    def begin(self, n: int) -> None:
        self.n = n
        self.out: np.ndarray | None = None

    def on_layer(self, ctx: BatchContext, layer: int, acts: torch.Tensor) -> None:
        from mechsieve.capture.reductions import REDUCTIONS

        h = self.norm(acts) if self.norm is not None else acts
        pooled = REDUCTIONS[self.reduction](h.float(), ctx.batch).cpu().numpy()
        if self.out is None:
            self.out = np.zeros((self.n, pooled.shape[-1]), dtype=np.float32)
        self.out[ctx.indices] = pooled

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pooled": self.out if self.out is not None else np.zeros((self.n, 0), dtype=np.float32)}


# --- the pass ----------------------------------------------------------------------------------

@dataclass
class PassReport:
    """What one `feature_pass` did: per pass, its layers, whether it ran to the logits, how many
    features it computed and how many came from the cache, tokens and seconds."""

    passes: list[dict[str, Any]] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(p["seconds"] for p in self.passes))

    def summary(self) -> dict[str, Any]:
        return {"passes": self.passes, "features_computed": sorted(self.computed),
                "features_cached": sorted(self.cached), "seconds": round(self.seconds, 3)}


def render_inputs(examples: Sequence[Example], tokenizer: Any, key: PassKey) -> list[Any]:
    """The examples rendered as `key` says (the response alone for `response_only`); examples
    already rendered (data.render.Rendered, e.g. a token masker's) are taken as they are."""
    from mechsieve.data.render import Rendered, render_pool

    if examples and all(isinstance(ex, Rendered) for ex in examples):
        return list(examples)

    if key.inputs == "response_only":
        examples = [Example(ex.id, ex.source, [], ex.response, {}) for ex in examples]
    rendered, _ = render_pool(list(examples), tokenizer, key.render)
    return rendered


def feature_pass(loaded: Any, examples: Sequence[Example], features: Mapping[str, Feature], *,
                 cache: Any = None, data_fingerprint: str | None = None, progress: bool = True,
                 desc: str = "features") -> tuple[dict[str, dict[str, np.ndarray]], PassReport]:
    """Compute `features` (name -> Feature) over `examples` in one forward per pass key.

    Returns (name -> the feature's arrays, report). Features with equal `full_key()` are computed
    once and their arrays shared. `cache`: a FeatureCache (or None); entries are keyed with
    `data_fingerprint` (default: the examples' fingerprint) and the model's identity.
    """
    from mechsieve.data.render import pad_id

    unique: dict[str, Feature] = {}
    alias: dict[str, str] = {}
    for name, feat in features.items():
        k = json.dumps(feat.full_key(), sort_keys=True, default=str)
        unique.setdefault(k, feat)
        alias[name] = k
    results: dict[str, dict[str, np.ndarray]] = {}
    report = PassReport()
    fingerprint = data_fingerprint
    if cache is not None and fingerprint is None:
        fingerprint = fingerprint_examples(list(examples))
    todo: dict[str, list[tuple[str, Feature]]] = {}
    keys: dict[str, PassKey] = {}
    for k, feat in unique.items():
        hit = cache.load(loaded.identity, fingerprint, feat.full_key()) if cache is not None else None
        if hit is not None:
            results[k] = hit
            report.cached.append(feat.kind)
            continue
        todo.setdefault(feat.key.id(), []).append((k, feat))
        keys[feat.key.id()] = feat.key
    for pid, members in todo.items():
        key = keys[pid]
        start = time.perf_counter()
        rendered = render_inputs(examples, loaded.tokenizer, key)
        by_layer: dict[int, list[Feature]] = {}
        by_attention: dict[int, list[Feature]] = {}
        for _, feat in members:
            feat.begin(len(rendered))
            for layer in feat.layers:
                (by_attention if feat.reads_attention else by_layer).setdefault(int(layer), []).append(feat)
        logit_feats = [f for _, f in members if f.need_logits]

        def on_layer(ctx: BatchContext, layer: int, acts: torch.Tensor, by_layer=by_layer) -> None:
            for feat in by_layer.get(layer, ()):
                feat.on_layer(ctx, layer, acts)

        def on_attention(ctx: BatchContext, layer: int, probs: torch.Tensor, by_attention=by_attention) -> None:
            for feat in by_attention.get(layer, ()):
                feat.on_layer(ctx, layer, probs)

        def on_logits(ctx: BatchContext, logits: torch.Tensor, logit_feats=logit_feats) -> None:
            for feat in logit_feats:
                feat.on_logits(ctx, logits)

        layers, attention_layers = sorted(by_layer), sorted(by_attention)
        spec = ForwardSpec(layers=layers, site="resid" if key.site == "attention" else key.site,
                           attention_layers=attention_layers, need_logits=bool(logit_feats))
        plan = plan_batches([len(r) for r in rendered], key.max_tokens, key.max_batch)
        stats = run_forward(loaded.model, rendered, plan, spec, pad_id(loaded.tokenizer), on_layer=on_layer,
                            on_attention=on_attention if attention_layers else None,
                            on_logits=on_logits if logit_feats else None, progress=progress,
                            desc=desc if len(todo) == 1 else f"{desc} ({key.inputs})")
        for k, feat in members:
            results[k] = feat.arrays()
            report.computed.append(feat.kind)
            if cache is not None:
                cache.save(loaded.identity, fingerprint, feat.full_key(), results[k])
        report.passes.append({"inputs": key.inputs, "site": key.site, "max_len": key.render.max_len,
                              "max_tokens": key.max_tokens, "max_batch": key.max_batch, "layers": layers,
                              "attention_layers": attention_layers,
                              "logits": bool(logit_feats), "features": [f.kind for _, f in members],
                              "examples": len(rendered), "batches": stats.batches, "tokens": stats.real_tokens,
                              "seconds": round(time.perf_counter() - start, 4)})
    return {name: results[k] for name, k in alias.items()}, report
