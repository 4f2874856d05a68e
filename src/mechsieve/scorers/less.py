"""LESS: gradient-similarity data selection with a warmed-up LoRA and Adam-preconditioned features.

Paper: Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning"
(arXiv 2402.04333; code princeton-nlp/LESS). Recipe (METHODS.md section 5):

1. Warm-up: LoRA on a seeded random `warmup_fraction` (5%) of the pool for `train.epochs`
   epochs with the project's trainer; at the end of epoch i the adapter and the AdamW moments are
   kept (checkpoint i), with the epoch's mean learning rate eta_i.
2. Features at each checkpoint: per-example gradients g of the token-mean response loss with
   respect to the LoRA weights (batched, capture/gradients.py). A pool example z takes the Adam
   update direction with its gradient folded into the moments (paper, section 2.2),
       m = b1 m_t + (1 - b1) g,   v = b2 v_t + (1 - b2) g^2,
       Gamma(z) = (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps),
   t = optimizer steps taken; a target example takes its plain gradient. Both are projected by
   the same seeded dense Rademacher matrix to `proj_dim` (default 8192).
3. Score: s(z) = max over subtasks S of mean over z' in S of sum_i w_i cos(Gamma_i(z), g_i(z')),
   w_i = eta_i / sum_j eta_j; subtasks are the target examples' `source` values.

Faults of the published code that are not copied: its Adam direction is m / sqrt(v + eps), with
no bias correction, eps inside the root, and betas / eps hard-coded to 0.9 / 0.999 / 1e-8 (here
the paper's formula with the optimizer's own betas and eps); it lines the moments up with the
gradient by parameter order (here by parameter name); it takes the max over subtasks by
reshaping the [n, m] score matrix to [n, N_SUBTASKS, -1], which silently assumes equal-size,
contiguous subtasks (here explicit groups of any size); checkpoint weights are typed on the
command line (here the mean logged learning rate of each epoch); gradients come from a bfloat16
model and are projected in float16 (here float32 throughout); its scripts parse argv at import.

Differences from the paper: LoRA on the trainer's modules (`all-linear`, rank 16 by default; the
paper uses q/k/v/o at rank 128) with the trainer's schedule; the per-example gradients are taken
with dropout off; the warm-up sample does not depend on the pool's order; examples left without
response tokens (cut by `render.max_len`) get a NaN score (never selected).

Warm-up checkpoints are cached by the warm-up examples and settings, features per checkpoint by
the pool (and target) and settings, under the mechsieve cache; a rerun reuses what is there.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.config import ConfigError, check_choice, to_dict
from mechsieve.data.records import Example, Pool, fingerprint_examples
from mechsieve.data.render import pad_id
from mechsieve.scorers.base import Scorer, ScorerError, ScoreResult
from mechsieve.scorers.common import ModelScorerConfig, render
from mechsieve.train.config import TrainConfig

BLOCK_ROWS = 1024  # rows of the projection generated at a time; part of the projection's identity


def _warmup_train() -> TrainConfig:
    return TrainConfig(epochs=4)


@dataclass
class LessConfig(ModelScorerConfig):
    """Settings of `less` (ModelScorerConfig's max_tokens / max_batch size the gradient batches)."""

    max_batch: int = 16
    """At most this many examples in one backward batch."""
    warmup_fraction: float = 0.05
    """Share of the pool (a seeded sample, at least one example) the warm-up LoRA trains on."""
    train: TrainConfig = field(default_factory=_warmup_train)
    """Warm-up training; one checkpoint per epoch, so `epochs` must be whole and max_steps 0."""
    proj_dim: int = 8192
    """Dimension of the Rademacher projection of the LoRA gradients."""
    pool_gradient: Literal["adam", "sgd"] = "adam"
    """Pool features: the Adam update direction (LESS) or the plain gradient (its ablation)."""
    subtasks: Literal["source", "none"] = "source"
    """Target subtasks: one per `source` of the target examples (max over them), or one."""
    project_mb: float = 2048.0
    """Memory for full gradients gathered before one projection pass (more = fewer regenerations)."""
    cache: bool = True
    """Keep warm-up checkpoints and features in the mechsieve cache and reuse them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must be in (0, 1] (LESS: 0.05)")
        if self.train.max_steps:
            raise ConfigError(f"train.max_steps={self.train.max_steps}: LESS keeps one checkpoint per "
                              "epoch; set train.epochs instead and leave train.max_steps at 0")
        if self.train.epochs < 1 or self.train.epochs != int(self.train.epochs):
            raise ConfigError(f"train.epochs={self.train.epochs} must be a whole number >= 1 "
                              "(one checkpoint per epoch)")
        if self.train.full_finetune:
            raise ConfigError("train.full_finetune=true: LESS takes gradients of a LoRA adapter; set it false")
        if self.proj_dim < 1:
            raise ConfigError(f"proj_dim={self.proj_dim} must be >= 1 (LESS: 8192)")
        if self.project_mb <= 0:
            raise ConfigError(f"project_mb={self.project_mb} must be > 0")
        check_choice("pool_gradient", self.pool_gradient, ("adam", "sgd"))
        check_choice("subtasks", self.subtasks, ("source", "none"))


@dataclass
class Checkpoint:
    """The end of one warm-up epoch: LoRA weights and AdamW moments by parameter name ([out, in]
    float32 on the CPU), optimizer steps taken, the epoch's mean learning rate, betas and eps."""

    epoch: int
    step: int
    mean_lr: float
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    betas: tuple[float, float]
    eps: float


def adam_direction(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   betas: tuple[float, float], eps: float) -> torch.Tensor:
    """LESS's Adam feature (paper section 2.2): the update direction m_hat / (sqrt(v_hat) + eps)
    Adam would take with each example's gradient folded into the moments as step `step + 1`.

    grads: [b, P]; exp_avg, exp_avg_sq: [P] (the state after `step` steps) -> [b, P]."""
    b1, b2 = betas
    t = step + 1
    m = grads.mul(1 - b1).add_(exp_avg, alpha=b1).div_(1 - b1 ** t)
    v = grads.square().mul_(1 - b2).add_(exp_avg_sq, alpha=b2).div_(1 - b2 ** t)
    return m.div_(v.sqrt_().add_(eps))


def less_scores(pool_feats: list[np.ndarray], target_feats: list[np.ndarray], weights: np.ndarray,
                groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """LESS's score from projected features: per checkpoint i, pool [n, d] and target [m, d];
    `weights` [k] sum to 1; `groups`: column indices of each target subtask.

    -> (scores [n] = max over subtasks, per-subtask [n, G] = mean over the subtask of
    sum_i w_i cos(pool_i, target_i)), float64; a zero feature has cosine 0."""
    total = None
    for p, q, w in zip(pool_feats, target_feats, weights):
        sim = w * (_unit(p) @ _unit(q).T)
        total = sim if total is None else total + sim
    per_group = np.stack([total[:, g].mean(1) for g in groups], 1)
    return per_group.max(1), per_group


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def warmup_sample(examples: list[Example], fraction: float, seed: int) -> list[int]:
    """Indices of the warm-up examples: a seeded `fraction` (at least one) drawn from the pool in
    content-hash order, returned in that order, so the pool's own order changes nothing."""
    canonical = sorted(range(len(examples)), key=lambda i: (examples[i].content_hash(), examples[i].id))
    k = max(1, round(fraction * len(examples)))
    pick = np.random.default_rng(seed).permutation(len(examples))[:k]
    return [canonical[j] for j in sorted(pick)]


def subtask_groups(target: Pool, usable: np.ndarray, by: str) -> tuple[list[str], list[np.ndarray]]:
    """Target columns per subtask (by `source`, or one group), leaving out unusable examples."""
    names = list(dict.fromkeys(ex.source for ex in target.examples)) if by == "source" else ["all"]
    groups = []
    for name in names:
        cols = [j for j, ex in enumerate(target.examples) if usable[j] and (by != "source" or ex.source == name)]
        groups.append(np.array(cols, dtype=np.int64))
    keep = [i for i, g in enumerate(groups) if len(g)]
    if not keep:
        raise ScorerError("no target example has a response token left after rendering; raise "
                          "render.max_len or check the target file's responses")
    return [names[i] for i in keep], [groups[i] for i in keep]


class Less(Scorer):
    """LESS (arXiv 2402.04333): cosine of Adam-preconditioned, randomly projected LoRA gradients of
    each pool example to the target gradients, over warm-up checkpoints (see the module docstring)."""

    name = "less"
    config_cls = LessConfig
    needs_model = True
    needs_target = True

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, target, loaded)
        assert target is not None
        cfg = self.config
        timings: dict[str, float] = {}
        start = time.perf_counter()
        warm = [pool.examples[i] for i in warmup_sample(pool.examples, cfg.warmup_fraction, seed)]
        run = _Run(cfg, loaded, seed, progress)
        ckpts = run.checkpoints(warm)
        timings["warmup"] = time.perf_counter() - start
        pool_rend, target_rend = render(pool.examples, loaded, cfg), render(target.examples, loaded, cfg)
        pool_feats, target_feats = [], []
        for ck in ckpts:
            start = time.perf_counter()
            pool_feats.append(run.features(pool, pool_rend, ck, "pool", cfg.pool_gradient))
            timings["features_pool"] = timings.get("features_pool", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            target_feats.append(run.features(target, target_rend, ck, "target", "sgd"))
            timings["features_target"] = timings.get("features_target", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        lrs = np.array([ck.mean_lr for ck in ckpts], dtype=np.float64)
        if not lrs.sum() > 0:
            raise ScorerError(f"the warm-up checkpoints' mean learning rates {lrs.tolist()} sum to 0; "
                              "check train.learning_rate and train.schedule")
        weights = lrs / lrs.sum()
        names, groups = subtask_groups(target, _has_response(target_rend), cfg.subtasks)
        scores, _ = less_scores(pool_feats, target_feats, weights, groups)
        no_response = ~_has_response(pool_rend)
        scores[no_response] = np.nan
        timings["score"] = time.perf_counter() - start
        expl = {"warmup_examples": len(warm), "warmup_fingerprint": fingerprint_examples(warm),
                "checkpoints": [{"epoch": ck.epoch, "step": ck.step, "mean_lr": ck.mean_lr, "weight": float(w)}
                                for ck, w in zip(ckpts, weights)],
                "lora_parameters": run.n_params, "proj_dim": cfg.proj_dim,
                "subtasks": {n: len(g) for n, g in zip(names, groups)},
                "no_response_pool": int(no_response.sum()), "reused": run.reused,
                "cache": str(run.feature_folder(pool)) if cfg.cache else None}
        return ScoreResult(scores, expl, timings)


def _has_response(rendered: list) -> np.ndarray:
    return np.array([bool(np.asarray(r.response_mask)[1:].any()) for r in rendered], dtype=bool)


class _Run:
    """One scoring call's warm-up model, checkpoints and feature cache (I/O kept out of the math)."""

    def __init__(self, cfg: LessConfig, loaded: Any, seed: int, progress: bool) -> None:
        self.cfg, self.loaded, self.seed, self.progress = cfg, loaded, seed, progress
        self.model: Any = None  # the peft copy, built only when a gradient is needed
        self.n_params = 0
        self.warm_key: dict[str, Any] = {}
        self.reused: dict[str, int] = {"checkpoints": 0, "features": 0}

    # -- warm-up ---------------------------------------------------------------------------
    def checkpoints(self, warm: list[Example]) -> list[Checkpoint]:
        """Checkpoints of the warm-up run on `warm`, from the cache or trained now."""
        from mechsieve.models.loading import LoadedModel, cache_root
        from mechsieve.store.artefacts import SettingsMismatch, diff_settings
        from mechsieve.store.atomic import write_json
        from mechsieve.store.cache import Cache
        from mechsieve.train import items_from_examples, train

        cfg = self.cfg
        settings = {"train": to_dict(cfg.train), "render": to_dict(cfg.render), "warmup": fingerprint_examples(warm)}
        entry = Cache(cache_root()).entry("less-warmup", self.loaded.identity, settings["warmup"], settings)
        self.warm_key = entry.key
        manifest = entry.folder / "warmup.json"
        if cfg.cache and manifest.exists():
            done = json.loads(manifest.read_text())
            differences = diff_settings(done.get("settings", {}), entry.key)
            if differences:
                raise SettingsMismatch(entry.folder, differences)
            if all(_exists(entry.folder, n) for n in done["checkpoints"]):
                self.reused["checkpoints"] = len(done["checkpoints"])
                return [_load_checkpoint(entry.folder, n, entry.key) for n in done["checkpoints"]]
        work = LoadedModel(copy.deepcopy(self.loaded.model), self.loaded.tokenizer, self.loaded.identity,
                           self.loaded.config)
        items = items_from_examples(warm, self.loaded.tokenizer, cfg.render)
        ckpts: list[Checkpoint] = []

        def keep(ev) -> None:
            ck = _capture(ev)
            ckpts.append(ck)
            if cfg.cache:
                _save_checkpoint(entry.folder, f"ckpt-{ck.epoch}", ck, entry.key)

        manifest.unlink(missing_ok=True)
        try:
            train(work, items, cfg.train, progress=self.progress, on_epoch_end=keep)
        except ValueError as err:
            raise ScorerError(f"less warm-up on {len(warm)} examples failed: {err}") from None
        self.model = work.model
        if cfg.cache:  # written last: marks the warm-up as complete
            write_json(manifest, {"settings": entry.key, "checkpoints": [f"ckpt-{ck.epoch}" for ck in ckpts]})
        return ckpts

    def _peft_model(self) -> Any:
        if self.model is None:
            from mechsieve.train import wrap_for_training
            from mechsieve.train.lora import PEFT_DEPRECATION

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
                self.model = wrap_for_training(copy.deepcopy(self.loaded.model), self.cfg.train)
        self.model.eval()  # no LoRA dropout in the per-example gradients
        return self.model

    # -- features --------------------------------------------------------------------------
    def feature_folder(self, pool: Pool):
        return self._feature_entry(pool).folder

    def _feature_entry(self, pool: Pool):
        from mechsieve.models.loading import cache_root
        from mechsieve.store.cache import Cache

        cfg = self.cfg
        settings = {"warmup": self.warm_key, "proj_dim": cfg.proj_dim, "seed": self.seed,
                    "block_rows": BLOCK_ROWS, "projection": "pcg64-bits", "render": to_dict(cfg.render),
                    "loss": "mean_response", "pool_gradient": cfg.pool_gradient}
        return Cache(cache_root()).entry("less-features", self.loaded.identity, pool.fingerprint(), settings)

    def features(self, data: Pool, rendered: list, ck: Checkpoint, side: str, kind: str) -> np.ndarray:
        """Projected features [n, proj_dim] of `data` at checkpoint `ck` (cached per checkpoint)."""
        from mechsieve.store.artefacts import load_artefact, save_artefact

        cfg = self.cfg
        entry = self._feature_entry(data)
        name = f"{side}-{kind}-ckpt{ck.epoch}"
        self.n_params = sum(w.numel() for w in ck.weights.values())
        if cfg.cache and _exists(entry.folder, name):
            self.reused["features"] += 1
            return load_artefact(entry.folder, name, expected=entry.key)[0]["features"]
        feats = self._compute(rendered, ck, kind)
        if cfg.cache:
            save_artefact(entry.folder, name, {"features": feats}, entry.key,
                          {"examples": len(rendered), "checkpoint": ck.epoch, "side": side, "kind": kind})
        return feats

    def _compute(self, rendered: list, ck: Checkpoint, kind: str) -> np.ndarray:
        from mechsieve.capture.gradients import (
            RademacherProjector,
            iter_per_example_grads,
            lora_modules,
            mean_response_loss,
            project_rows,
        )

        cfg = self.cfg
        model = self._peft_model()
        mods = lora_modules(model)
        names = [f"{n}.weight" for n, _ in mods]
        if set(names) != set(ck.weights):
            missing, extra = sorted(set(ck.weights) - set(names)), sorted(set(names) - set(ck.weights))
            raise ScorerError(f"the warm-up checkpoint does not fit the adapter: trained but not LoRA A/B "
                              f"{missing[:3]}, LoRA A/B not in the checkpoint {extra[:3]}")
        params = dict(model.named_parameters())
        device = self.loaded.device
        with torch.no_grad():
            for n in names:
                params[n].copy_(ck.weights[n].to(params[n].dtype))
        transform = None
        if kind == "adam":
            m = torch.cat([ck.exp_avg[n].reshape(-1) for n in names]).to(device)
            v = torch.cat([ck.exp_avg_sq[n].reshape(-1) for n in names]).to(device)

            def transform(g: torch.Tensor) -> torch.Tensor:
                return adam_direction(g, m, v, ck.step, ck.betas, ck.eps)

        projector = RademacherProjector(sum(ck.weights[n].numel() for n in names), cfg.proj_dim, self.seed,
                                        BLOCK_ROWS)
        rows = iter_per_example_grads(model, rendered, mods, mean_response_loss, pad_id=pad_id(self.loaded.tokenizer),
                                      max_tokens=cfg.max_tokens, max_batch=cfg.max_batch, progress=self.progress)
        return project_rows(rows, projector, len(rendered), transform, cfg.project_mb, self.progress)


def _capture(ev: Any) -> Checkpoint:
    """A Checkpoint from the trainer's EpochEnd: trainable weights and their AdamW state by name."""
    opt = ev.optimizer
    names = {id(p): n.removeprefix("module.") for n, p in ev.model.named_parameters() if p.requires_grad}
    weights, m, v, step = {}, {}, {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            name = names[id(p)]
            weights[name] = p.detach().float().cpu().clone()
            m[name] = state["exp_avg"].detach().float().cpu().clone() if state else torch.zeros_like(weights[name])
            v[name] = state["exp_avg_sq"].detach().float().cpu().clone() if state else torch.zeros_like(weights[name])
            step = max(step, int(state["step"])) if state else step
    group = opt.param_groups[0]
    return Checkpoint(ev.epoch, step, float(np.mean(ev.learning_rates)), weights, m, v,
                      (float(group["betas"][0]), float(group["betas"][1])), float(group["eps"]))


def _exists(folder: Any, name: str) -> bool:
    from mechsieve.store.artefacts import artefact_exists

    return artefact_exists(folder, name)


def _save_checkpoint(folder: Any, name: str, ck: Checkpoint, settings: dict[str, Any]) -> None:
    from mechsieve.store.artefacts import save_artefact

    tensors = {**{f"weight/{n}": t for n, t in ck.weights.items()},
               **{f"exp_avg/{n}": t for n, t in ck.exp_avg.items()},
               **{f"exp_avg_sq/{n}": t for n, t in ck.exp_avg_sq.items()}}
    save_artefact(folder, name, tensors, settings,
                  {"epoch": ck.epoch, "step": ck.step, "mean_lr": ck.mean_lr, "betas": list(ck.betas), "eps": ck.eps})


def _load_checkpoint(folder: Any, name: str, settings: dict[str, Any]) -> Checkpoint:
    from mechsieve.store.artefacts import load_artefact

    arrays, meta = load_artefact(folder, name, expected=settings)
    parts: dict[str, dict[str, torch.Tensor]] = {"weight": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for key, arr in arrays.items():
        kind, _, pname = key.partition("/")
        parts[kind][pname] = torch.from_numpy(arr)
    return Checkpoint(int(meta["epoch"]), int(meta["step"]), float(meta["mean_lr"]), parts["weight"],
                      parts["exp_avg"], parts["exp_avg_sq"], (float(meta["betas"][0]), float(meta["betas"][1])),
                      float(meta["eps"]))
