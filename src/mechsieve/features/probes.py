"""Concept directions at one layer: difference of means, a logistic-regression probe, or an SAE
feature's decoder row; with a held-out separation score, saved as an artefact and reused.

Concept Influence (arXiv 2602.14869, section 3 of METHODS.md): the concept `v` at layer `l` is
read from behaviour-showing (`pos`) vs behaviour-free (`neg`) examples, from their mean response
activations `abar(x) = mean_t h_l(x)_t`; the concept score is `f_v(x) = abar(x) . v/|v|`
(a mean of per-token projections equals the projection of the mean). Differences from the paper:
the held-out separation score is an AUC-ROC of `f_v` on a seeded held-out split, computed with a
direction fitted on the rest, so a direction that only memorises its few examples shows as ~0.5.

Pure math on arrays; `save_concept` / `load_concept` go through mechsieve.store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice, to_dict
from mechsieve.data.readers import DataError

METHODS = ("diff_means", "logreg", "sae")


@dataclass
class ConceptConfig:
    """How a concept direction is made."""

    layer: int = -4
    """Block whose residual-stream output is read (negative counts from the end)."""
    method: Literal["diff_means", "logreg", "sae"] = "diff_means"
    """`diff_means`: mean(pos) - mean(neg); `logreg`: logistic-regression weight on standardised
    activations mapped back to activation space; `sae`: decoder row `sae_feature` of `sae_decoder`."""
    holdout: float = 0.25
    """Share of each side kept out to measure separation (0 disables the held-out score)."""
    seed: int = 0
    """Seed of the held-out split."""
    logreg_c: float = 1.0
    """Inverse L2 strength of the logistic-regression probe."""
    sae_decoder: str = ""
    """`sae`: a .safetensors/.npy file holding the decoder matrix [n_latents, d] (key W_dec)."""
    sae_feature: int = -1
    """`sae`: the latent whose decoder row is the concept."""

    def __post_init__(self) -> None:
        check_choice("concept.method", self.method, METHODS)
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"concept.holdout={self.holdout} must be in [0, 1)")
        if self.logreg_c <= 0:
            raise ConfigError(f"concept.logreg_c={self.logreg_c} must be > 0")
        if self.method == "sae" and (not self.sae_decoder or self.sae_feature < 0):
            raise ConfigError("concept.method=sae needs concept.sae_decoder (file) and concept.sae_feature (>= 0)")


@dataclass
class Concept:
    """direction: [d] float32 (not normalised; `unit` is); layer: the block it was read at."""

    direction: np.ndarray
    layer: int
    settings: dict[str, Any] = field(default_factory=dict)
    separation: float | None = None
    """Held-out AUC-ROC of the concept score, positives vs negatives (None: no hold-out)."""
    counts: dict[str, int] = field(default_factory=dict)
    folder: str = ""
    """Where it was saved / loaded from (reuse it with concept_dir / --concept-dir)."""

    @property
    def unit(self) -> np.ndarray:
        norm = float(np.linalg.norm(self.direction))
        if norm == 0.0:
            raise DataError("the concept direction is zero: positives and negatives have equal means; give "
                            "positive and negative files that differ in the behaviour (or another concept.layer)")
        return (self.direction / norm).astype(np.float32)

    def score(self, acts: np.ndarray) -> np.ndarray:
        """f_v for mean response activations `acts: [n, d]` -> [n] float64."""
        return acts.astype(np.float64) @ self.unit.astype(np.float64)


def diff_of_means(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """mean(pos) - mean(neg) for `pos: [n, d]`, `neg: [m, d]` -> [d]."""
    if len(pos) == 0 or len(neg) == 0:
        raise DataError(f"a concept needs examples on both sides; got {len(pos)} positive, {len(neg)} negative "
                        "(examples whose response was cut away by max_len are dropped: raise max_len)")
    return (pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0)).astype(np.float32)


def logreg_direction(pos: np.ndarray, neg: np.ndarray, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Logistic-regression probe (positives = 1) -> its weight in activation space, [d].

    The probe is fitted on standardised features (activations have outlier dimensions); the
    weight `w/sigma` is the direction whose dot product with raw activations is the probe logit.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mu) / sigma, y)
    return (clf.coef_[0] / sigma).astype(np.float32)


def sae_direction(decoder: np.ndarray, feature: int) -> np.ndarray:
    """Row `feature` of an SAE decoder `[n_latents, d]` -> [d]."""
    if not 0 <= feature < decoder.shape[0]:
        raise ConfigError(f"concept.sae_feature={feature} is out of range: the decoder has {decoder.shape[0]} "
                          f"latents (0..{decoder.shape[0] - 1})")
    return decoder[feature].astype(np.float32)


def auc_roc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    p = np.asarray(pos_scores, np.float64)[:, None]
    n = np.asarray(neg_scores, np.float64)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def _direction(pos: np.ndarray, neg: np.ndarray, cfg: ConceptConfig, decoder: np.ndarray | None) -> np.ndarray:
    if cfg.method == "diff_means":
        return diff_of_means(pos, neg)
    if cfg.method == "logreg":
        return logreg_direction(pos, neg, cfg.logreg_c, cfg.seed)
    if decoder is None:
        raise ValueError("concept.method=sae needs the decoder matrix")
    return sae_direction(decoder, cfg.sae_feature)


def fit_concept(pos: np.ndarray, neg: np.ndarray, layer: int, cfg: ConceptConfig | None = None,
                decoder: np.ndarray | None = None, settings: dict[str, Any] | None = None) -> Concept:
    """A concept from mean response activations `pos: [n, d]` and `neg: [m, d]` at `layer`.

    The separation score uses a direction fitted without the held-out examples; the returned
    direction is then fitted on all of them.
    """
    cfg = cfg or ConceptConfig()
    separation = None
    if cfg.holdout > 0 and min(len(pos), len(neg)) >= 2:
        rng = np.random.default_rng(cfg.seed)
        pos_perm, neg_perm = rng.permutation(len(pos)), rng.permutation(len(neg))
        kp = max(1, int(round(cfg.holdout * len(pos))))
        kn = max(1, int(round(cfg.holdout * len(neg))))
        v = _direction(pos[pos_perm[kp:]], neg[neg_perm[kn:]], cfg, decoder)
        held = Concept(v, layer)
        separation = auc_roc(held.score(pos[pos_perm[:kp]]), held.score(neg[neg_perm[:kn]]))
    v = _direction(pos, neg, cfg, decoder)
    return Concept(v, layer, {**(settings or {}), "concept": to_dict(cfg)}, separation,
                   {"positive": int(len(pos)), "negative": int(len(neg))})


def load_decoder(path: str) -> np.ndarray:
    """The decoder matrix [n_latents, d] of an SAE file (.npy, or .safetensors key W_dec/decoder)."""
    if path.endswith(".npy"):
        return np.load(path)
    from safetensors.numpy import load_file

    tensors = load_file(path)
    for key in ("W_dec", "decoder.weight", "W_d"):
        if key in tensors:
            dec = tensors[key]
            # nn.Linear decoders store [d, n_latents]
            return dec.T if key == "decoder.weight" else dec
    raise ConfigError(f"concept.sae_decoder={path}: no decoder matrix (looked for W_dec, decoder.weight, W_d); "
                      f"keys: {sorted(tensors)}")


def save_concept(folder: str | Path, concept: Concept) -> Path:
    """`concept.safetensors` (direction) + `concept.json` (settings, layer, separation)."""
    from mechsieve.store.artefacts import save_artefact

    concept.folder = str(folder)
    return save_artefact(folder, "concept", {"direction": concept.direction}, concept.settings,
                         extra={"layer": concept.layer, "separation": concept.separation,
                                "counts": concept.counts})


def load_concept(folder: str | Path, expected: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None) -> Concept:
    """Read a saved concept; with `expected` settings, refuse one made otherwise (SettingsMismatch);
    with `model` (a LoadedModel identity), refuse one fitted for another model (ConfigError)."""
    from mechsieve.store.artefacts import load_artefact

    tensors, meta = load_artefact(folder, "concept", expected=expected)
    settings = meta.get("settings", {})
    fitted_for = settings.get("model") if isinstance(settings, dict) else None
    if model is not None and fitted_for is not None and not same_model(fitted_for, model):
        raise ConfigError(f"{folder}: this concept was fitted for model {describe_model(fitted_for)}, not for "
                          f"{describe_model(model)}; a direction only means something in the model it was read "
                          "from: pass that --model, or fit the concept for this one (--concept POS NEG)")
    return Concept(tensors["direction"], int(meta["layer"]), settings,
                   meta.get("separation"), meta.get("counts", {}), str(folder))


# Where a model lives and the dtype it was loaded in do not change what its directions mean.
_PLACE_KEYS = ("path", "dtype")


def same_model(a: Any, b: Any) -> bool:
    """Whether two model identities name the same weights: the content hash where both have one,
    else every key but the place it was loaded from and its dtype."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a == b
    if a.get("hash") and b.get("hash"):
        return a["hash"] == b["hash"]
    return ({k: v for k, v in a.items() if k not in _PLACE_KEYS}
            == {k: v for k, v in b.items() if k not in _PLACE_KEYS})


def describe_model(identity: Any) -> str:
    """A model identity in a few words: hub id@revision, alias or folder, with its content hash."""
    if not isinstance(identity, dict):
        return repr(identity)
    name = identity.get("id") or identity.get("name") or identity.get("path") or "?"
    if identity.get("revision"):
        name = f"{name}@{identity['revision']}"
    return f"{name} (hash {identity['hash']})" if identity.get("hash") else str(name)
