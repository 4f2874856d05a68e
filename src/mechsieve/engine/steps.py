"""The steps the engine runs on shards: scoring, activation capture, XTF token scores.

Each is a function of (shard, settings): the settings (scorer and its prepared state, capture or
XTF settings, which model) live on the step, the model is loaded once per worker by `setup`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mechsieve.engine.base import EngineError, Shard, ShardError, ShardOutput, Step
from mechsieve.engine.shards import to_json

IDENTITY_KEYS = ("kind", "name", "path", "id", "hash", "revision")


def model_key(identity: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a model identity every worker must share (not the dtype, which follows the
    device: a CPU driver and GPU actors load the same weights in different precisions)."""
    return {k: identity[k] for k in IDENTITY_KEYS if identity and k in identity}


class ModelStep(Step):
    """A step that reads a model: given loaded (local) or as a ModelConfig each worker loads."""

    transient = ("_loaded",)

    def __init__(self, model: Any = None) -> None:
        from mechsieve.models.loading import LoadedModel, resolve_model_path

        self._loaded = model if isinstance(model, LoadedModel) else None
        self.model_config = model.config if isinstance(model, LoadedModel) else model
        if isinstance(model, LoadedModel):
            self.identity = model_key(model.identity)
        else:
            self.identity = model_key(resolve_model_path(model)[1]) if model is not None else None

    def __getstate__(self) -> dict[str, Any]:
        if self._loaded is not None and self._loaded.identity.get("kind") not in ("alias", "folder", "hub"):
            raise EngineError("the ray engine loads the model in every actor, but this model was built in "
                              f"memory (identity {self._loaded.identity}); save it with save_pretrained and pass "
                              "its folder (ModelConfig(name=FOLDER)), or use engine.executor=local")
        return super().__getstate__()

    def setup(self) -> None:
        if self._loaded is not None or self.model_config is None:
            return
        from mechsieve.models.loading import load_model

        self._loaded = load_model(self.model_config)
        found = model_key(self._loaded.identity)
        if self.identity is not None and found != self.identity:
            raise EngineError(f"this worker loaded another model than the driver: {found} here, {self.identity} "
                              "there; every node must see the same model folder (or hub revision)")

    @property
    def loaded(self) -> Any:
        if self._loaded is None and self.model_config is not None:
            self.setup()
        return self._loaded


# --- scoring -----------------------------------------------------------------------------------

def encode_result(result: Any) -> ShardOutput:
    """A ScoreResult as shard arrays + meta."""
    arrays = {"scores": np.asarray(result.scores, dtype=np.float64)}
    if result.per_target is not None:
        arrays["per_target"] = np.asarray(result.per_target, dtype=np.float64)
    arrays.update({f"arrays.{k}": np.asarray(v) for k, v in result.arrays.items()})
    meta = {"explanations": result.explanations, "timings": result.timings, "target_names": list(result.target_names)}
    return ShardOutput(arrays, to_json(meta))


def decode_result(output: ShardOutput) -> Any:
    from mechsieve.scorers.base import ScoreResult

    arrays = {k[len("arrays."):]: v for k, v in output.arrays.items() if k.startswith("arrays.")}
    return ScoreResult(output.arrays["scores"], output.meta.get("explanations", {}), output.meta.get("timings", {}),
                       output.arrays.get("per_target"), output.meta.get("target_names", []), arrays)


class ScoreStep(ModelStep):
    """`scorer.score_shard(shard, state, model)` of a sharded scorer."""

    name = "score"
    transient = ("_loaded", "_scorer")

    def __init__(self, scorer: Any, state: dict[str, Any], model: Any = None) -> None:
        super().__init__(model)
        if not getattr(scorer, "shardable", False):
            raise EngineError(f"{scorer.name} does not split into shards (it needs the whole pool at once)")
        # the class and its settings travel, not the instance (which may hold a model's modules)
        self.scorer_cls = type(scorer)
        self.scorer_config = scorer.config
        self.scorer_name = scorer.name
        self.scorer_settings = scorer.settings()
        self.state = state
        self._scorer = None

    def settings(self) -> dict[str, Any]:
        return {"step": self.name, "method": self.scorer_name, "scorer": self.scorer_settings, "model": self.identity}

    def setup(self) -> None:
        super().setup()
        self._scorer = self.scorer_cls(self.scorer_config)

    def run(self, shard: Shard) -> ShardOutput:
        shard = shard.load()  # a streamed shard reads its own records (no-op otherwise)
        if self._scorer is None:
            self.setup()
        result = self._scorer.score_shard(shard.pool(), self.state, self.loaded, progress=False)
        if np.shape(result.scores) != (len(shard.examples),):
            raise ShardError(shard.index, f"{self.scorer_name} returned {np.shape(result.scores)} scores for "
                             f"{shard.describe()}, expected ({len(shard.examples)},)")
        return encode_result(result)


class ScoreManyStep(ModelStep):
    """Several forward-only scorers on a shard from one shared feature pass (scorers.many): each
    scorer's ScoreResult encoded as by ScoreStep, its arrays under `LABEL/`, its meta under LABEL."""

    name = "score_many"
    transient = ("_loaded", "_scorers")

    def __init__(self, scorers: dict[str, Any], states: dict[str, dict[str, Any]], model: Any = None) -> None:
        super().__init__(model)
        self.specs = {label: (type(s), s.config, s.name, s.settings()) for label, s in scorers.items()}
        self.states = states
        self._scorers: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        return {"step": self.name, "methods": {label: {"method": name, "scorer": settings}
                                               for label, (_, _, name, settings) in self.specs.items()},
                "model": self.identity}

    def setup(self) -> None:
        super().setup()
        self._scorers = {label: cls(config) for label, (cls, config, _, _) in self.specs.items()}

    def run(self, shard: Shard) -> ShardOutput:
        shard = shard.load()  # a streamed shard reads its own records (no-op otherwise)
        from mechsieve.scorers.many import shard_many

        if self._scorers is None:
            self.setup()
        parts, _ = shard_many(self._scorers, self.states, shard.pool(), self.loaded, progress=False)
        arrays, meta = {}, {}
        for label, part in parts.items():
            if np.shape(part.scores) != (len(shard.examples),):
                raise ShardError(shard.index, f"{label} returned {np.shape(part.scores)} scores for "
                                 f"{shard.describe()}, expected ({len(shard.examples)},)")
            encoded = encode_result(part)
            arrays.update({f"{label}/{k}": v for k, v in encoded.arrays.items()})
            meta[label] = encoded.meta
        return ShardOutput(arrays, meta)


def decode_many(output: ShardOutput, label: str) -> Any:
    """One scorer's ScoreResult out of a ScoreManyStep shard output."""
    prefix = f"{label}/"
    arrays = {k[len(prefix):]: v for k, v in output.arrays.items() if k.startswith(prefix)}
    return decode_result(ShardOutput(arrays, output.meta.get(label, {})))


# --- activation capture ------------------------------------------------------------------------

class CaptureStep(ModelStep):
    """Activation capture with reductions of a shard: [m, layers, d] per reduction."""

    name = "capture"

    def __init__(self, capture_cfg: Any, render_cfg: Any, model: Any = None) -> None:
        super().__init__(model)
        self.capture_cfg = capture_cfg
        self.render_cfg = render_cfg

    def settings(self) -> dict[str, Any]:
        from mechsieve.config import to_dict

        return {"step": self.name, "capture": to_dict(self.capture_cfg), "render": to_dict(self.render_cfg),
                "model": self.identity}

    def run(self, shard: Shard) -> ShardOutput:
        shard = shard.load()  # a streamed shard reads its own records (no-op otherwise)
        from mechsieve.capture.activations import capture
        from mechsieve.data.render import pad_id, render_pool

        loaded = self.loaded
        rendered, stats = render_pool(shard.examples, loaded.tokenizer, self.render_cfg)
        result = capture(loaded.model, rendered, self.capture_cfg, pad_id=pad_id(loaded.tokenizer), progress=False)
        arrays = {**result.arrays, "n_response_tokens": result.n_response_tokens}
        meta = {"layers": result.layers,
                "render": {"examples": stats.examples, "tokens": stats.tokens, "response_tokens": stats.response_tokens,
                           "truncated": stats.truncated, "truncated_ids": stats.truncated_ids,
                           "no_response_left": stats.no_response_left, "plain_fallback": stats.plain_fallback,
                           "fallback_ids": stats.fallback_ids},
                "forward": {"batches": result.stats.batches, "real_tokens": result.stats.real_tokens,
                            "padded_tokens": result.stats.padded_tokens, "seconds": result.stats.seconds}}
        return ShardOutput(arrays, meta)


# --- XTF token scores --------------------------------------------------------------------------

class TokenScoreStep(ModelStep):
    """XTF per-token scores (RI, KN, TR) of a shard. Arrays are per token, concatenated over the
    shard's examples in order; `lengths` [m] splits them back."""

    name = "token-scores"
    transient = ("_loaded", "_masker")

    def __init__(self, xtf_cfg: Any, words: list[str], render_cfg: Any, model: Any = None,
                 target: list[Any] | None = None) -> None:
        super().__init__(model)
        self.xtf_cfg = xtf_cfg
        self.words = list(words)
        self.render_cfg = render_cfg
        self.target = list(target or [])
        self._masker = None

    def settings(self) -> dict[str, Any]:
        import hashlib

        from mechsieve.config import to_dict
        from mechsieve.data.records import fingerprint_examples

        words = hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]
        return {"step": self.name, "xtf": to_dict(self.xtf_cfg), "render": to_dict(self.render_cfg),
                "words": words, "model": self.identity,
                "target": fingerprint_examples(self.target) if self.target else None}

    def run(self, shard: Shard) -> ShardOutput:
        shard = shard.load()  # a streamed shard reads its own records (no-op otherwise)
        from mechsieve.data.render import render_pool
        from mechsieve.tokens.xtf import Xtf

        loaded = self.loaded
        if self._masker is None:  # one per worker: its context-free embedding cache spans shards
            self._masker = Xtf(self.xtf_cfg, words=self.words, target=self.target, render_cfg=self.render_cfg)
        rendered, _ = render_pool(shard.examples, loaded.tokenizer, self.render_cfg)
        scores = self._masker.score(loaded.model, loaded.tokenizer, rendered, progress=False)
        return encode_token_scores(scores)

    def check_output(self, shard: Shard, output: ShardOutput) -> None:
        """`lengths` has a row per example, every other array a row per token (their sum)."""
        m = shard.size
        lengths = output.arrays.get("lengths")
        if lengths is None or np.shape(lengths) != (m,):
            raise ShardError(shard.index, f"{shard.describe()}: lengths has shape {np.shape(lengths)} for its "
                             f"{m} examples; a bug of the {self.name} step, please report")
        tokens = int(np.sum(lengths))
        for name, values in output.arrays.items():
            rows = np.shape(values)[0] if np.ndim(values) else None
            if name != "lengths" and rows != tokens:
                raise ShardError(shard.index, f"{shard.describe()}: {name} has {rows} rows for its {tokens} "
                                 f"tokens; a bug of the {self.name} step, please report")


def encode_token_scores(scores: Any) -> ShardOutput:
    lengths = np.array([len(e) for e in scores.eligible], dtype=np.int64)
    arrays = {"lengths": lengths, "eligible": np.concatenate(scores.eligible or [np.zeros(0, bool)]).astype(bool)}
    for name, values in scores.scores.items():
        arrays[f"score.{name}"] = np.concatenate(values or [np.zeros(0, np.float32)]).astype(np.float32)
    return ShardOutput(arrays, to_json({"info": scores.info}))


def decode_token_scores(outputs: list[ShardOutput]) -> Any:
    """The pool's TokenScores from its shards' outputs, in shard order."""
    from mechsieve.tokens.base import TokenScores

    eligible: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {}
    for out in outputs:
        cuts = np.cumsum(out.arrays["lengths"])[:-1]
        eligible.extend(np.split(out.arrays["eligible"], cuts))
        for key, values in out.arrays.items():
            if key.startswith("score."):
                scores.setdefault(key[len("score."):], []).extend(np.split(values, cuts))
    return TokenScores(scores, eligible, merge_info([out.meta.get("info", {}) for out in outputs]))


def merge_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers summed over shards (tokens, seconds, batches), anything else from the first shard."""
    if not infos:
        return {}
    out: dict[str, Any] = {}
    for key, value in infos[0].items():
        values = [info.get(key) for info in infos]
        if isinstance(value, dict):
            out[key] = merge_info([v for v in values if isinstance(v, dict)])
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = round(sum(values), 4) if isinstance(value, float) else sum(values)
        else:
            out[key] = value
    return out
