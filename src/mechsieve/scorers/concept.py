"""Probe attributions of Concept Influence (arXiv 2602.14869): Vector Filter and Projection
Difference, plus building (and caching) the concept they project on.

- `vector-filter` (`VectorFilter`): `f_v(z) = abar_l(z) . v/|v|`, the mean response activation
  of each training example at the concept layer projected on the concept; forward only, and the
  pass stops at the concept layer.
- `projection-diff` (`ProjectionDiff`): `(abar(x, y) - abar(x, y')) . v/|v|` where `y'` is the
  model's own sampled response to the example's prompt (seeded; `temperature` 0 is greedy).
  Differences from the paper: one sample per prompt, truncated at `max_new_tokens`.

The concept comes from `concept_dir` (a saved concept, see features/probes.py) or is fitted
from the `positive` / `negative` data files at `probe.layer` and cached under the mechsieve cache,
keyed by the model, both data fingerprints and the settings. `probe.layer=auto` reads every
candidate block (`probe.layers`) in one pass per side and fits at the one with the best held-out
separation. Either way the probe gate is checked: a concept whose held-out separation is below
`probe.gate` raises a ProbeGateWarning, and every scorer's explanations carry `probe_gate`
(features.probes.gate_report).

Every pass (the concept's, the pool's, the sampled responses') renders with `render`
(`max_len` is its old spelling, kept: a value other than 256 there is copied into
`render.max_len`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mechsieve.config import ConfigError, to_dict
from mechsieve.data.records import Example, Pool
from mechsieve.data.render import RenderConfig, pad_id
from mechsieve.features.probes import Concept, ConceptConfig, ProbeGateWarning, gate_report
from mechsieve.scorers.base import ForwardScorer, Scorer, ScorerError, ScoreResult, ShardState

MAX_LEN = 256
"""The concept scorers' default longest rendered example (tokens)."""


@dataclass
class ConceptRenderConfig(RenderConfig):
    """RenderConfig with the concept scorers' own default length, so that a `render` section
    setting only, say, the template keeps 256 tokens rather than RenderConfig's 512."""

    max_len: int = MAX_LEN
    """Longest sequence kept; longer ones are cut at the end and counted as truncated."""


@dataclass
class ConceptSource:
    """Where the concept comes from: a saved one, or contrastive data files; how every pass of
    these scorers renders and batches examples."""

    concept_dir: str = ""
    """Folder of a saved concept (concept.safetensors + concept.json); wins over the files."""
    positive: str = ""
    """Data file of behaviour-showing examples (prompt + response)."""
    negative: str = ""
    """Data file of behaviour-free examples."""
    probe: ConceptConfig = field(default_factory=ConceptConfig)
    """How the direction is fitted (layer or auto, method, hold-out, gate)."""
    render: ConceptRenderConfig = field(default_factory=ConceptRenderConfig)
    """How examples become tokens in every pass of these scorers (max_len, template, ...)."""
    max_len: int = MAX_LEN
    """Old spelling of `render.max_len`, kept working: a value other than 256 is copied there
    (giving both, different, is an error); after construction it always equals `render.max_len`."""
    max_tokens: int = 4096
    """Token budget of one forward batch."""
    max_batch: int = 64
    """At most this many examples in one forward batch (with max_len and max_tokens: the same
    values as another forward-only method lets `select --method` share its pass)."""

    def __post_init__(self) -> None:
        if self.max_len < 2 or self.max_tokens < 1 or self.max_batch < 1:
            raise ConfigError("max_len must be >= 2, max_tokens and max_batch >= 1")
        old, new = self.max_len, self.render.max_len
        if old != MAX_LEN and new != MAX_LEN and old != new:
            raise ConfigError(f"max_len={old} and render.max_len={new} disagree; max_len is the old spelling of "
                              "render.max_len: set only render.max_len")
        if old != MAX_LEN:
            self.render = replace(self.render, max_len=old)
        # one value: code reading `max_len` (the gradient scorers' batch budget) sees render's
        self.max_len = self.render.max_len


def render_config(source: ConceptSource | int) -> RenderConfig:
    """How every pass of the concept and gradient scorers renders examples: a ConceptSource's
    `render` section, as a plain RenderConfig (so the pool pass keys equal those of other
    scorers rendering alike); given a bare length (the older call), the RenderConfig defaults cut
    at it."""
    if isinstance(source, int):
        return RenderConfig(max_len=source)
    return RenderConfig(**{f.name: getattr(source.render, f.name) for f in dataclasses.fields(RenderConfig)})


def mean_response_acts(loaded: Any, examples: list[Example], layer: int, src: ConceptSource,
                       progress: bool = True) -> tuple[np.ndarray, float]:
    """abar_layer for each example -> ([n, d] float32, seconds of the pass); zeros for an example
    left without response tokens."""
    acts, seconds, _ = _capture_mean_response(loaded, examples, [layer], src, progress)
    return acts[:, 0], seconds


def _capture_mean_response(loaded: Any, examples: list[Example], layers: list[int], src: ConceptSource,
                           progress: bool) -> tuple[np.ndarray, float, np.ndarray]:
    """abar at every one of `layers` in one pass -> ([n, len(layers), d], seconds, [n] response
    token counts)."""
    from mechsieve.capture.activations import CaptureConfig, capture
    from mechsieve.data.render import render_pool

    rendered, _ = render_pool(examples, loaded.tokenizer, render_config(src))
    cfg = CaptureConfig(layers=list(layers), reductions=["mean_response"], max_tokens=src.max_tokens,
                        max_batch=src.max_batch)
    start = time.perf_counter()
    result = capture(loaded.model, rendered, cfg, pad_id=pad_id(loaded.tokenizer), progress=progress)
    return result.arrays["mean_response"], time.perf_counter() - start, result.n_response_tokens


def prompt_key(example: Example) -> str:
    """What pairs a positive with a negative concept example: the same prompt (its messages or text)."""
    return json.dumps(example.prompt, sort_keys=True, ensure_ascii=False)


def candidate_layers(loaded: Any, probe: ConceptConfig) -> list[int]:
    """The blocks a concept is read at: `probe.layers` under layer=auto, else `[probe.layer]`
    (non-negative, ascending)."""
    from mechsieve.models.hooks import hook_points

    wanted = probe.layers if probe.layer == "auto" else [probe.layer]
    return hook_points(loaded.model).normalize_layers(wanted)


def concept_settings(loaded: Any, positive: Pool, negative: Pool, src: ConceptSource) -> dict[str, Any]:
    """What a fitted concept depends on (its cache key, with the model): the probe settings, the
    blocks read, the rendering and both data fingerprints; `gate` only reports, so it is left out."""
    probe = {k: v for k, v in to_dict(src.probe).items() if k not in ("gate", "layers")}
    return {"probe": probe, "layers": candidate_layers(loaded, src.probe), "render": to_dict(render_config(src)),
            "positive": positive.fingerprint(), "negative": negative.fingerprint(),
            "holdout_split": "by prompt when the sides share prompts"}


def build_concept(loaded: Any, positive: Pool, negative: Pool, src: ConceptSource,
                  progress: bool = True, use_cache: bool = True) -> Concept:
    """Fit the concept of `src.probe` on the two pools (cached: same model, data and settings
    give the saved concept back). Under `probe.layer=auto` every candidate block is read in one
    pass per side and the concept is fitted at `choose_layer`'s pick; the probe gate is checked
    (a ProbeGateWarning below `probe.gate`)."""
    from mechsieve.features.probes import (
        choose_layer,
        fit_concept,
        load_concept,
        load_decoder,
        save_concept,
        separation_by_layer,
    )
    from mechsieve.models.loading import cache_root
    from mechsieve.store.cache import Cache

    settings = concept_settings(loaded, positive, negative, src)
    entry = Cache(cache_root()).entry("concepts", loaded.identity, positive.fingerprint(), settings,
                                      name="concept")
    if use_cache and entry.exists():
        concept = load_concept(entry.folder, expected=entry.key)
        check_gate(concept, src.probe.gate)
        return concept
    layers = settings["layers"]
    # examples whose response was cut away entirely (prompt longer than max_len) carry no signal
    pos, _, n_pos = _capture_mean_response(loaded, positive.examples, layers, src, progress)
    neg, _, n_neg = _capture_mean_response(loaded, negative.examples, layers, src, progress)
    pos, neg = pos[n_pos > 0], neg[n_neg > 0]
    # contrast pairs (one prompt answered both ways) are held out together: see held_out_separation
    groups = ([prompt_key(ex) for ex, n in zip(positive.examples, n_pos) if n > 0],
              [prompt_key(ex) for ex, n in zip(negative.examples, n_neg) if n > 0])
    decoder = load_decoder(src.probe.sae_decoder) if src.probe.method == "sae" else None
    seps = None
    layer = layers[0]
    if src.probe.layer == "auto":
        seps = separation_by_layer(pos.transpose(1, 0, 2), neg.transpose(1, 0, 2), src.probe, layers, decoder, groups)
        layer = choose_layer(seps)
    k = layers.index(layer)
    concept = fit_concept(pos[:, k], neg[:, k], layer, src.probe, decoder, groups=groups)
    if seps is not None:
        concept.separation_by_layer = seps
    concept.counts["dropped_without_response"] = int((n_pos == 0).sum() + (n_neg == 0).sum())
    concept.settings = entry.key
    if use_cache:
        save_concept(entry.folder, concept)
    check_gate(concept, src.probe.gate)
    return concept


def check_gate(concept: Concept, gate: float) -> dict[str, Any]:
    """The probe gate report of `concept` (features.probes.gate_report); warns (ProbeGateWarning)
    when its separation is below `gate` or unmeasured."""
    report = gate_report(concept, gate)
    if report["warning"]:
        warnings.warn(report["warning"], ProbeGateWarning, stacklevel=3)
    return report


def resolve_concept(loaded: Any, src: ConceptSource, progress: bool = True) -> Concept:
    """The concept of `src`: loaded from `concept_dir`, else fitted from the two data files."""
    from mechsieve.data.readers import read_pool
    from mechsieve.features.probes import load_concept

    if src.concept_dir:
        concept = load_concept(src.concept_dir, model=getattr(loaded, "identity", None))
        if loaded is not None:
            width = int(loaded.model.get_input_embeddings().weight.shape[1])
            if concept.direction.shape != (width,):
                raise ConfigError(f"{src.concept_dir}: a concept direction of width {concept.direction.shape[-1]} "
                                  f"for a model of width {width}; it was made for another model: pass that "
                                  "--model, or fit the concept for this one (--concept POS NEG)")
        check_gate(concept, src.probe.gate)
        return concept
    if not (src.positive and src.negative):
        raise ScorerError("a concept is needed: set concept_dir (a saved concept) or both positive and "
                          "negative data files (CLI: --concept POS NEG)")
    return build_concept(loaded, read_pool(src.positive), read_pool(src.negative), src, progress)


def _concept_explanations(concept: Concept, gate: float) -> dict[str, Any]:
    return {"layer": concept.layer, "separation": concept.separation, "counts": concept.counts,
            "concept_dir": concept.folder, "probe_gate": gate_report(concept, gate)}


@dataclass
class VectorFilterConfig(ConceptSource):
    """Settings of `vector-filter` (the concept source only)."""


def concept_pass_key(src: ConceptSource) -> Any:
    """The shared-pass key of these scorers' pool pass (capture.shared.PassKey)."""
    from mechsieve.capture.shared import PassKey

    return PassKey(render_config(src), src.max_tokens, src.max_batch)


class VectorFilter(ForwardScorer):
    """Vector Filter (Concept Influence, arXiv 2602.14869): training example -> f_v(z), forward only."""

    name = "vector-filter"
    config_cls = VectorFilterConfig
    needs_model = True

    def prepare(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
                progress: bool = True) -> ShardState:
        """The concept (loaded, or fitted and cached) as its unit direction and layer."""
        start = time.perf_counter()
        concept = resolve_concept(loaded, self.config, progress)
        return {"unit": concept.unit, "layer": int(concept.layer),
                "explanations": _concept_explanations(concept, self.config.probe.gate),
                "timings": {"concept": time.perf_counter() - start}}

    def features(self, state: ShardState, loaded: Any) -> dict[str, Any]:
        from mechsieve.capture.shared import Pooled

        return {"acts": Pooled(concept_pass_key(self.config), state["layer"], "mean_response")}

    def from_features(self, shard: Pool, state: ShardState, arrays: dict, seconds: float,
                      loaded: Any = None) -> ScoreResult:
        acts = arrays["acts"]["pooled"]
        return ScoreResult(acts.astype(np.float64) @ state["unit"].astype(np.float64), {}, {"score": seconds})


@dataclass
class ProjectionDiffConfig(ConceptSource):
    """Settings of `projection-diff`."""

    temperature: float = 1.0
    """Sampling temperature of the model's own response y' (0: greedy)."""
    max_new_tokens: int = 128
    """Longest sampled response."""
    generate_batch: int = 16
    """Prompts per generation batch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0 or self.max_new_tokens < 1 or self.generate_batch < 1:
            raise ConfigError("projection-diff: temperature must be >= 0, max_new_tokens and "
                              "generate_batch >= 1")


def sample_responses(loaded: Any, examples: list[Example], max_new_tokens: int, temperature: float,
                     seed: int, batch: int = 16, max_len: int = MAX_LEN, progress: bool = True,
                     render: RenderConfig | None = None) -> list[str]:
    """The model's own response to each prompt (left-padded batches, seeded sampling), rendered
    with `render` (default: the RenderConfig defaults cut at `max_len`). Generation stops at the
    tokenizer's stop tokens (EOS and end-of-turn markers, evaluate.generate.stop_ids) and the text
    is cut at the first one, as generate_greedy does."""
    import torch
    from tqdm.auto import tqdm

    from mechsieve.capture.batching import collate
    from mechsieve.data.render import render_example
    from mechsieve.evaluate.generate import stop_ids

    tok, model = loaded.tokenizer, loaded.model
    rcfg = render or render_config(max_len)
    prompts = [render_example(ex, tok, rcfg, add_generation_prompt=True) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out = [""] * len(prompts)
    torch.manual_seed(seed)
    sample = temperature > 0
    pad = pad_id(tok)
    stops = stop_ids(tok)
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad, "eos_token_id": stops}
    if sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    for s in tqdm(range(0, len(order), batch), desc="sample y'", disable=not progress, leave=False):
        idx = order[s:s + batch]
        b = collate([prompts[i] for i in idx], pad, "left").to(loaded.device)
        with torch.no_grad():
            gen = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)
        for row, i in enumerate(idx):
            tokens = gen[row, b.input_ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            out[i] = tok.decode(tokens[:cut], skip_special_tokens=True)
    return out


class ProjectionDiff(Scorer):
    """Projection Difference (Concept Influence, arXiv 2602.14869): (abar(x, y) - abar(x, y')) . v/|v|
    with y' the model's own seeded sample; one sample per prompt (the paper leaves the count open)."""

    name = "projection-diff"
    config_cls = ProjectionDiffConfig
    needs_model = True

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, target, loaded)
        cfg = self.config
        start = time.perf_counter()
        concept = resolve_concept(loaded, cfg, progress)
        t_concept = time.perf_counter() - start
        acts, t_own = mean_response_acts(loaded, pool.examples, concept.layer, cfg, progress)
        start = time.perf_counter()
        own = sample_responses(loaded, pool.examples, cfg.max_new_tokens, cfg.temperature, seed,
                               cfg.generate_batch, progress=progress, render=render_config(cfg))
        t_sample = time.perf_counter() - start
        sampled = [Example(ex.id, ex.source, ex.prompt, y) for ex, y in zip(pool.examples, own)]
        acts_own, t_theirs = mean_response_acts(loaded, sampled, concept.layer, cfg, progress)
        scores = concept.score(acts) - concept.score(acts_own)
        expl = {**_concept_explanations(concept, cfg.probe.gate), "empty_samples": sum(1 for y in own if not y.strip())}
        return ScoreResult(scores, expl, {"concept": t_concept, "sample": t_sample,
                                          "score": t_own + t_theirs})
