"""Influence functions through kronfluence (EK-FAC): `concept-influence` and `influence`.

- `concept-influence` (`ConceptInfluence`, Concept Influence, arXiv 2602.14869, eq. 5):
  `I(z) = grad f_v(x_q)^T H^-1 grad L(z)` with the concept score `f_v` of the query examples as the
  measurement, averaged over the queries. Differences from the paper: the sign is flipped so that a
  high score means that up-weighting `z` *raises* the concept score (kronfluence ranks by how much
  a measurement *drops*; the measurement here is `-f_v`).
- `influence` (`Influence`, Koh & Liang 2017; EK-FAC as Grosse et al. 2023, arXiv 2308.03296):
  the same machinery with the query loss (summed response cross entropy) as the measurement; a
  high score means up-weighting `z` lowers the query loss.

Both track the nn.Linear layers of the blocks at or below the concept layer (`probe.layer`; the
concept measurement has no gradient above it), with `track_blocks` / `track_stride` /
`track_kinds` to restrict them. `H` is the EK-FAC (or `strategy`) approximation of the Fisher of
the training loss on the pool (true Fisher: labels sampled from the model, unless
`empirical_fisher`). Factors are fitted once per (model, pool, tracked modules, strategy) and
cached under the mechsieve cache (`influence/<key>/`), so both scorers and reruns reuse them.
kronfluence is optional: `make influence` installs it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.capture.batching import Collated, collate
from mechsieve.capture.gradients import Objective, concept_objective, linear_modules, token_losses
from mechsieve.config import ConfigError, check_choice, to_dict
from mechsieve.data.records import Pool
from mechsieve.data.render import pad_id
from mechsieve.scorers.base import Scorer, ScoreResult
from mechsieve.scorers.concept import render_config, resolve_concept
from mechsieve.scorers.grad_sim import (
    GradientTargetConfig,
    boundary_layer,
    resolve_queries,
    tracked_blocks,
)

INSTALL = (
    "make influence   (or: pip install --no-deps kronfluence==1.0.1 einops==0.8.2 einconv==0.1.0 "
    "opt_einsum==3.4.0)")


def require_kronfluence() -> None:
    try:
        import kronfluence  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the influence scorers need kronfluence, which is not installed; run: {INSTALL}") from err


@dataclass
class InfluenceConfig(GradientTargetConfig):
    """Settings of `influence` and `concept-influence`."""

    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac"
    """Curvature approximation (kronfluence factor strategy)."""
    damping: float | None = 1e-3
    """Damping added to the curvature eigenvalues; None: 0.1 x their mean (kronfluence heuristic)."""
    empirical_fisher: bool = False
    """Fit the curvature with the data's labels instead of labels sampled from the model."""
    factor_max_examples: int = 0
    """Fit the factors on at most this many pool examples (0: all)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy", self.strategy, ("ekfac", "kfac", "diagonal", "identity"))
        if self.damping is not None and self.damping < 0:
            raise ConfigError(f"damping={self.damping} must be >= 0 (or null for the heuristic)")
        if self.factor_max_examples < 0:
            raise ConfigError("factor_max_examples must be >= 0")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rendered: list[Any]):
        self.rendered = rendered

    def __len__(self) -> int:
        return len(self.rendered)

    def __getitem__(self, i: int) -> Any:
        return self.rendered[i]


def _collate_fn(pad: int):
    def fn(items: list[Any]) -> dict[str, torch.Tensor]:
        b = collate(items, pad)
        return {name: getattr(b, name) for name in b.__dataclass_fields__}
    return fn


def make_task(tracked: list[str], measurement: Objective, empirical_fisher: bool = False) -> Any:
    """A kronfluence Task: summed response loss for training, `measurement` summed over queries."""
    from kronfluence.task import Task

    class MechsieveTask(Task):
        def compute_train_loss(self, batch: dict, model: Any, sample: bool = False) -> torch.Tensor:
            b = Collated(**batch)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=b.position_ids, use_cache=False).logits
            if not sample or empirical_fisher:
                return token_losses(logits, b.input_ids, b.response_mask).sum()
            with torch.no_grad():  # true Fisher: labels drawn from the model itself
                drawn = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
            ids = torch.cat([b.input_ids[:, :1], drawn], 1)
            return token_losses(logits, ids, b.response_mask).sum()

        def compute_measurement(self, batch: dict, model: Any) -> torch.Tensor:
            return measurement(model, Collated(**batch)).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

        def get_attention_mask(self, batch: dict) -> torch.Tensor:
            return batch["attention_mask"]

    return MechsieveTask()


def kronfluence_scores(loaded: Any, pool: Pool, queries: Pool, measurement: Objective,
                       tracked: list[str], cfg: InfluenceConfig, progress: bool = True,
                       kind: str = "measure", seed: int = 0
                       ) -> tuple[np.ndarray, dict[str, float], dict[str, Any]]:
    """Pairwise scores [n_queries, n_pool] (pool order) from kronfluence; the factors are cached
    by (model, pool, tracked modules, strategy, fisher, seed) and reused by either measurement."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from mechsieve.data.render import render_pool
    from mechsieve.models.loading import cache_root
    from mechsieve.store.cache import Cache

    rcfg = render_config(cfg)
    rend, _ = render_pool(pool.examples, loaded.tokenizer, rcfg)
    q_rend, _ = render_pool(queries.examples, loaded.tokenizer, rcfg)
    order = sorted(range(len(rend)), key=lambda i: (-len(rend[i]), i))  # length-sorted batches
    fit_order = order
    if cfg.factor_max_examples and cfg.factor_max_examples < len(order):
        pick = np.random.default_rng(0).choice(len(order), cfg.factor_max_examples, replace=False)
        fit_order = sorted(pick.tolist(), key=lambda i: (-len(rend[i]), i))
    key = {"tracked": tracked, "strategy": cfg.strategy, "empirical_fisher": cfg.empirical_fisher,
           "factor_max_examples": cfg.factor_max_examples, "render": to_dict(rcfg),
           "seed": None if cfg.empirical_fisher else seed}
    entry = Cache(cache_root()).entry("influence", loaded.identity, pool.fingerprint(), key)
    entry.folder.mkdir(parents=True, exist_ok=True)
    task = make_task(tracked, measurement, cfg.empirical_fisher)
    # kronfluence wraps modules in place and freezes parameters: work on a copy
    model = prepare_model(copy.deepcopy(loaded.model), task)
    analyzer = Analyzer("mechsieve", model, task, cpu=loaded.device.type == "cpu",
                        disable_tqdm=not progress, output_dir=str(entry.folder),
                        log_level=logging.WARNING)
    loader = DataLoaderKwargs(collate_fn=_collate_fn(pad_id(loaded.tokenizer)))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    factors_name = cfg.strategy
    fitted = analyzer.factors_output_dir(factors_name)
    cached = fitted.exists() and any(fitted.glob("*.safetensors"))
    torch.manual_seed(seed)  # labels sampled for the true Fisher
    analyzer.fit_all_factors(factors_name, _Rows([rend[i] for i in fit_order]),
                             per_device_batch_size=cfg.batch_size, dataloader_kwargs=loader,
                             factor_args=FactorArguments(strategy=cfg.strategy,
                                                         use_empirical_fisher=cfg.empirical_fisher),
                             overwrite_output_dir=False)
    timings["factors"] = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name=f"{kind}-{factors_name}", factors_name=factors_name,
        query_dataset=_Rows(q_rend), train_dataset=_Rows([rend[i] for i in order]),
        per_device_query_batch_size=min(cfg.batch_size, len(q_rend)),
        per_device_train_batch_size=cfg.batch_size, dataloader_kwargs=loader,
        score_args=ScoreArguments(damping_factor=cfg.damping), overwrite_output_dir=True)
    timings["score"] = time.perf_counter() - start
    mat = analyzer.load_pairwise_scores(f"{kind}-{factors_name}")["all_modules"].double().cpu().numpy()
    out = np.empty_like(mat)
    out[:, order] = mat
    info = {"factors_cached": bool(cached), "cache": str(entry.folder), "settings": to_dict(cfg)}
    return out, timings, info


class _InfluenceBase(Scorer):
    config_cls = InfluenceConfig
    needs_model = True

    def __init__(self, config: Any = None) -> None:
        require_kronfluence()  # fail at construction with the install command
        super().__init__(config)

    def _measurement(self, loaded: Any, progress: bool) -> tuple[Objective, dict[str, Any]]:
        raise NotImplementedError

    def score(self, pool: Pool, *, target: Pool | None = None, loaded: Any = None, seed: int = 0,
              progress: bool = True) -> ScoreResult:
        self.check_inputs(pool, None, loaded)
        cfg = self.config
        queries = resolve_queries(cfg, target, seed)
        measurement, expl = self._measurement(loaded, progress)
        blocks = tracked_blocks(boundary_layer(loaded, cfg), cfg)
        tracked = [name for name, _ in linear_modules(loaded.model, blocks, cfg.track_kinds)]
        mat, timings, info = kronfluence_scores(loaded, pool, queries, measurement, tracked, cfg,
                                                progress, kind=self.name, seed=seed)
        expl.update(info, tracked_blocks=blocks, tracked_modules=len(tracked), queries=len(queries.examples))
        return ScoreResult(mat.mean(0), expl, timings)


class ConceptInfluence(_InfluenceBase):
    """Concept Influence (arXiv 2602.14869): EK-FAC influence with the concept score as the
    measurement; high = up-weighting z raises the concept score of the queries."""

    name = "concept-influence"

    def _measurement(self, loaded: Any, progress: bool) -> tuple[Objective, dict[str, Any]]:
        concept = resolve_concept(loaded, self.config, progress)
        if concept.layer != boundary_layer(loaded, self.config):
            raise ConfigError(f"the concept was read at block {concept.layer} but probe.layer resolves to "
                              f"{boundary_layer(loaded, self.config)}; set probe.layer={concept.layer}")
        f = concept_objective(concept.layer, torch.from_numpy(concept.unit))

        def negated(model: Any, batch: Collated) -> torch.Tensor:
            return -f(model, batch)

        return negated, {"layer": concept.layer, "separation": concept.separation}


def _query_loss(model: Any, batch: Collated) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    return token_losses(logits, batch.input_ids, batch.response_mask).sum(1)


class Influence(_InfluenceBase):
    """Classical influence function (Koh & Liang 2017) with EK-FAC curvature (Grosse et al. 2023):
    measurement = summed response loss of the queries; high = up-weighting z lowers it."""

    name = "influence"

    def _measurement(self, loaded: Any, progress: bool) -> tuple[Objective, dict[str, Any]]:
        return _query_loss, {}
