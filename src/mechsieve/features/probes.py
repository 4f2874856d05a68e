"""Concept directions at one layer: difference of means, a logistic-regression probe, or an SAE
feature's decoder row; with a held-out separation score, saved as an artefact and reused.

Concept Influence (arXiv 2602.14869, section 3 of METHODS.md): the concept `v` at layer `l` is
read from behaviour-showing (`pos`) vs behaviour-free (`neg`) examples, from their mean response
activations `abar(x) = mean_t h_l(x)_t`; the concept score is `f_v(x) = abar(x) . v/|v|`
(a mean of per-token projections equals the projection of the mean). Differences from the paper:
the held-out separation score is an AUC-ROC of `f_v` on a seeded held-out split, computed with a
direction fitted on the rest, so a direction that only memorises its few examples shows as ~0.5.

The probe gate (METHODS.md section 7: "report held-out separation per layer; warn below 0.7"):
every concept carries `separation_by_layer`, the held-out AUC at each block it was tried at
(`separation_by_layer` below; one entry for a fixed `concept.layer`, every candidate for
`concept.layer=auto`, which fits at `choose_layer`'s pick); `gate_report` says whether the chosen
block's separation reaches `concept.gate` and, where not, the warning to show.

Pure math on arrays; `save_concept` / `load_concept` go through mechsieve.store.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    layer: int | Literal["auto"] = -4
    """Block whose residual-stream output is read (negative counts from the end), or `auto`: the
    block of `layers` with the best held-out separation (ties go to the earlier block)."""
    layers: list[int] | Literal["all"] = "all"
    """`layer=auto`: the candidate blocks (negative counts from the end), or `all` (every block).
    They are read in one forward pass per side, which runs to the deepest candidate; ignored
    with a fixed `layer`."""
    gate: float = 0.7
    """Held-out separation (AUC-ROC) below which the concept counts as not linearly readable at
    its block: a ProbeGateWarning, and `probe_gate.readable: false` in the scorers'
    explanations. The concept is still fitted and used; the gate only reports."""
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
        if isinstance(self.layer, str) and self.layer != "auto":
            raise ConfigError(f"concept.layer={self.layer!r}: give a block index (negative counts from the end) "
                              "or auto")
        if isinstance(self.layers, str):
            check_choice("concept.layers", self.layers, ("all",))
        elif not self.layers:
            raise ConfigError("concept.layers is empty; give the candidate blocks, e.g. [4, 8, -4], or all")
        if not 0.0 <= self.gate <= 1.0:
            raise ConfigError(f"concept.gate={self.gate} must be in [0, 1] (an AUC-ROC; 0.5 is chance)")
        if self.layer == "auto" and self.holdout == 0:
            raise ConfigError("concept.layer=auto picks the block by held-out separation, and concept.holdout=0 "
                              "holds nothing out: set concept.holdout > 0 (e.g. 0.25), or give a concept.layer")
        if self.layer == "auto" and self.method == "sae":
            raise ConfigError("concept.layer=auto with concept.method=sae: an SAE's decoder belongs to the block "
                              "it was trained on; give that block as concept.layer")
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
    separation_by_layer: dict[int, float | None] = field(default_factory=dict)
    """Held-out AUC-ROC at each block tried (None: not measured); `layer` is one of them."""

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


def held_out_separation(pos: np.ndarray, neg: np.ndarray, cfg: ConceptConfig | None = None,
                        decoder: np.ndarray | None = None, groups: tuple[Sequence[Any], Sequence[Any]] | None = None
                        ) -> float | None:
    """AUC-ROC of the concept score on a seeded held-out share (`cfg.holdout`) of `pos: [n, d]`
    and `neg: [m, d]`, the direction fitted on the rest; None with no hold-out or fewer than 2
    examples on a side. The split depends only on the seed, the counts and `groups`, so every
    layer of the same examples is split alike.

    `groups` (one label per positive, one per negative; e.g. the prompt): when a label occurs on
    both sides (contrast pairs, the same prompt answered with and without the behaviour), the
    split is by label, a seeded `holdout` share of the labels held out with all their examples.
    Split side by side instead, a held-out positive's twin would train the direction as a
    negative: everything prompt-specific in it then counts against the held-out positive, and
    the separation of paired data reads far below what the direction does.
    """
    cfg = cfg or ConceptConfig()
    if not (cfg.holdout > 0 and min(len(pos), len(neg)) >= 2):
        return None
    rng = np.random.default_rng(cfg.seed)
    if groups is not None:
        gp, gn = np.array([str(g) for g in groups[0]]), np.array([str(g) for g in groups[1]])
        if (len(gp), len(gn)) != (len(pos), len(neg)):
            raise ValueError(f"groups: {len(gp)} and {len(gn)} labels for {len(pos)} positives and {len(neg)} negatives")
        if not np.intersect1d(gp, gn).size:  # no contrast pairs: the side-by-side split below
            groups = None
    if groups is not None:
        labels = np.unique(np.r_[gp, gn])
        held_labels = labels[rng.permutation(len(labels))[:max(1, int(round(cfg.holdout * len(labels))))]]
        hp, hn = np.isin(gp, held_labels), np.isin(gn, held_labels)
        if not (hp.any() and hn.any() and (~hp).any() and (~hn).any()):
            return None
        held = Concept(_direction(pos[~hp], neg[~hn], cfg, decoder), 0)
        return auc_roc(held.score(pos[hp]), held.score(neg[hn]))
    pos_perm, neg_perm = rng.permutation(len(pos)), rng.permutation(len(neg))
    kp = max(1, int(round(cfg.holdout * len(pos))))
    kn = max(1, int(round(cfg.holdout * len(neg))))
    held = Concept(_direction(pos[pos_perm[kp:]], neg[neg_perm[kn:]], cfg, decoder), 0)
    return auc_roc(held.score(pos[pos_perm[:kp]]), held.score(neg[neg_perm[:kn]]))


def separation_by_layer(pos: np.ndarray, neg: np.ndarray, cfg: ConceptConfig | None = None,
                        layers: Sequence[int] | None = None, decoder: np.ndarray | None = None,
                        groups: tuple[Sequence[Any], Sequence[Any]] | None = None) -> dict[int, float | None]:
    """Held-out separation at each layer of `pos: [L, n, d]`, `neg: [L, m, d]` -> {block: AUC or
    None}; `layers` names the L blocks (default 0..L-1); `groups` as in `held_out_separation`."""
    if pos.ndim != 3 or neg.ndim != 3 or pos.shape[0] != neg.shape[0]:
        raise ValueError(f"separation_by_layer wants [L, n, d] and [L, m, d] arrays; got {pos.shape} and {neg.shape}")
    names = list(range(pos.shape[0])) if layers is None else [int(x) for x in layers]
    if len(names) != pos.shape[0]:
        raise ValueError(f"{len(names)} layer names for {pos.shape[0]} layers of activations")
    return {name: held_out_separation(pos[k], neg[k], cfg, decoder, groups) for k, name in enumerate(names)}


def choose_layer(separations: dict[int, float | None]) -> int:
    """The block with the highest measured separation; ties go to the earlier block."""
    measured = {layer: sep for layer, sep in separations.items() if sep is not None}
    if not measured:
        raise DataError("concept.layer=auto could not measure a held-out separation at any block: it needs at "
                        "least 2 positive and 2 negative examples with response tokens (raise max_len if their "
                        "responses were cut away), or give a concept.layer")
    return min(measured, key=lambda layer: (-measured[layer], layer))


def fit_concept(pos: np.ndarray, neg: np.ndarray, layer: int, cfg: ConceptConfig | None = None,
                decoder: np.ndarray | None = None, settings: dict[str, Any] | None = None,
                groups: tuple[Sequence[Any], Sequence[Any]] | None = None) -> Concept:
    """A concept from mean response activations `pos: [n, d]` and `neg: [m, d]` at `layer`.

    The separation score uses a direction fitted without the held-out examples (split by
    `groups` when they pair the sides, see `held_out_separation`); the returned direction is then
    fitted on all of them. `separation_by_layer` has this one block.
    """
    cfg = cfg or ConceptConfig()
    separation = held_out_separation(pos, neg, cfg, decoder, groups)
    v = _direction(pos, neg, cfg, decoder)
    return Concept(v, layer, {**(settings or {}), "concept": to_dict(cfg)}, separation,
                   {"positive": int(len(pos)), "negative": int(len(neg))}, separation_by_layer={layer: separation})


class ProbeGateWarning(UserWarning):
    """A concept's held-out separation is below `concept.gate` (or could not be measured)."""


def gate_report(concept: Concept, gate: float) -> dict[str, Any]:
    """The probe gate of `concept`: {separation_by_layer, layer, gate, readable, warning}.

    readable: the separation at the concept's block (the best one tried, under layer=auto)
    reaches `gate`; warning: the text to show when it does not (None when it does).
    """
    seps = dict(concept.separation_by_layer) or {concept.layer: concept.separation}
    sep = seps.get(concept.layer)
    readable = sep is not None and sep >= gate
    return {"separation_by_layer": seps, "layer": concept.layer, "gate": gate, "readable": readable,
            "warning": None if readable else gate_warning(concept.layer, seps, gate)}


def gate_warning(layer: int, separations: dict[int, float | None], gate: float) -> str:
    """Why the concept at `layer` is not (known to be) linearly readable, naming the blocks tried."""
    sep = separations.get(layer)
    if len(separations) > 1:
        shown = ", ".join(f"{b}: {'n/a' if s is None else f'{s:.2f}'}" for b, s in sorted(separations.items()))
        tried = f" (blocks tried: {shown})"
        fix = "give more, or more distinct, positive and negative examples"
    else:
        tried = ""
        fix = "try concept.layer=auto (or another concept.layer), or more distinct positive and negative examples"
    if sep is None:
        return (f"concept at block {layer}{tried}: held-out separation could not be measured (concept.holdout=0, "
                f"or fewer than 2 examples with a response on a side), so it is not known to reach {gate:g}: "
                "attribution through it is unreliable; set concept.holdout > 0 and give at least 2 examples a side")
    return (f"concept at block {layer}: held-out separation {sep:.2f} < {gate:g}: this concept is not linearly "
            f"readable here; attribution through it is unreliable{tried}; {fix}")


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
    """`concept.safetensors` (direction) + `concept.json` (settings, layer, separation, the
    separation at each block tried)."""
    from mechsieve.store.artefacts import save_artefact

    concept.folder = str(folder)
    by_layer = {str(layer): sep for layer, sep in sorted(concept.separation_by_layer.items())}
    return save_artefact(folder, "concept", {"direction": concept.direction}, concept.settings,
                         extra={"layer": concept.layer, "separation": concept.separation,
                                "counts": concept.counts, "separation_by_layer": by_layer})


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
    layer, separation = int(meta["layer"]), meta.get("separation")
    saved = meta.get("separation_by_layer")
    # concepts saved before the probe gate have only the separation at their own block
    by_layer = ({int(b): (None if s is None else float(s)) for b, s in saved.items()} if isinstance(saved, dict)
                else {layer: separation})
    return Concept(tensors["direction"], layer, settings, separation, meta.get("counts", {}), str(folder),
                   by_layer)


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
