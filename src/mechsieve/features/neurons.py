"""NAIT capability directions: per-layer directions of activation drift.

A `CapabilityDirections` holds, for each target capability `c` and chosen layer `l`, the unit
direction `v[c, l]` (`pca`: first principal component of the target set's drifts, sign-calibrated
so that the mean drift projects non-negatively; `contrast`: the target's mean drift minus a
reference mean drift, `centre[l]`, drawn from the pool), the share of variance it explains, and
the mean and standard deviation over the target set of each layer's dot product and cosine with it
(for z-normalisation), optionally the reference `centre: [L, d]` every drift is centred on before
it is projected, and which of its layers each capability's score sums (`layer_mask`, chosen by
held-out separation: `roc_auc`, `choose_layers`). It is a
reusable artefact ("capability fingerprint"): `nait_directions.safetensors` + `.json` of the
settings that made it; loading under other settings is refused naming the differing ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechsieve.data.readers import DataError

ARTEFACT = "nait_directions"
LEGACY_SETTINGS = {"anchor": "first_content", "layer_select": "none", "direction": "pca"}
"""How artefacts saved before these settings existed were made (read as their values on load)."""


def first_component(drifts: np.ndarray) -> tuple[np.ndarray, float]:
    """First principal component of `drifts: [m, d]` (centred), unit norm, and its variance share.

    Sign calibration (NAIT, step 3): flipped so that mean(drifts) . v >= 0.
    """
    x = np.asarray(drifts, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DataError(f"a principal direction needs at least 2 target examples, got {x.shape[0]}; give a "
                        "larger target set (--target)")
    centred = x - x.mean(axis=0, keepdims=True)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[0]
    if x.mean(axis=0) @ v < 0:
        v = -v
    total = float((sing**2).sum())
    return v, (float(sing[0] ** 2) / total if total > 0 else 0.0)


def contrast_component(drifts: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit `mean(drifts) - reference` of `drifts: [m, d]` against a reference mean drift `[d]`,
    and the share of the drifts' second moment about the reference that lies along it."""
    x = np.asarray(drifts, dtype=np.float64) - np.asarray(reference, dtype=np.float64)[None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise DataError("a contrast direction needs at least 1 target example")
    mean = x.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        raise DataError("the target's mean drift equals the reference's: no contrast direction (nait.direction="
                        "contrast); use direction=pca or another target set")
    v = mean / norm
    total = float((x**2).sum())
    return v, (float(((x @ v) ** 2).sum()) / total if total > 0 else 0.0)


@dataclass
class CapabilityDirections:
    """directions: [c, L, d] float32 unit rows; explained and the target statistics: [c, L]."""

    names: list[str]
    layers: list[int]
    directions: np.ndarray
    explained: np.ndarray
    proj_mean: np.ndarray
    proj_std: np.ndarray
    cos_mean: np.ndarray
    cos_std: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    layer_mask: np.ndarray | None = None
    """[c, L] float64, 1 where capability c's score sums layer l, 0 where not (None: every layer)."""
    centre: np.ndarray | None = None
    """[L, d] float32 reference drift subtracted from every drift before it is projected
    (direction=contrast); None: drifts are projected as they are."""

    def mask(self) -> np.ndarray:
        """[c, L] float64 layer mask (all ones when none is set)."""
        if self.layer_mask is None:
            return np.ones(self.explained.shape, dtype=np.float64)
        return np.asarray(self.layer_mask, dtype=np.float64)

    def subset(self, keep: list[int], layer_mask: np.ndarray | None = None) -> CapabilityDirections:
        """These directions at layer positions `keep` (indices into `layers`), with a new mask."""
        k = list(keep)
        return CapabilityDirections(self.names, [self.layers[i] for i in k], self.directions[:, k],
                                    self.explained[:, k], self.proj_mean[:, k], self.proj_std[:, k],
                                    self.cos_mean[:, k], self.cos_std[:, k], dict(self.settings), layer_mask,
                                    None if self.centre is None else self.centre[k])

    def save(self, folder: str | Path) -> Path:
        from mechsieve.store.artefacts import save_artefact

        tensors = {"directions": self.directions.astype(np.float32), "explained": self.explained,
                   "proj_mean": self.proj_mean, "proj_std": self.proj_std,
                   "cos_mean": self.cos_mean, "cos_std": self.cos_std}
        if self.layer_mask is not None:
            tensors["layer_mask"] = self.mask()
        if self.centre is not None:
            tensors["centre"] = np.asarray(self.centre, dtype=np.float32)
        return save_artefact(folder, ARTEFACT, tensors, self.settings,
                             extra={"names": self.names, "layers": self.layers})

    @classmethod
    def load(cls, folder: str | Path, expected: dict[str, Any] | None = None) -> CapabilityDirections:
        """Read the artefact; settings named in `expected` must match (SettingsMismatch otherwise).

        Keys of the saved settings that `expected` does not name (e.g. the target set's
        fingerprint, when scoring without the target at hand) are not compared.
        """
        from mechsieve.store.artefacts import SettingsMismatch, diff_settings, load_artefact

        tensors, meta = load_artefact(folder, ARTEFACT)
        saved = {**LEGACY_SETTINGS, **meta.get("settings", {})}
        if expected is not None:
            differences = diff_settings({k: saved.get(k) for k in expected}, expected)
            if differences:
                raise SettingsMismatch(Path(folder) / ARTEFACT, differences)
        return cls(meta["names"], meta["layers"], tensors["directions"], tensors["explained"],
                   tensors["proj_mean"], tensors["proj_std"], tensors["cos_mean"], tensors["cos_std"], saved,
                   tensors.get("layer_mask"), tensors.get("centre"))


def fit_directions(drifts: dict[str, np.ndarray], layers: list[int], settings: dict[str, Any] | None = None,
                   direction: str = "pca", centre: np.ndarray | None = None) -> CapabilityDirections:
    """Fit one direction per capability and layer from `drifts[name]: [m, L, d]` target drifts:
    `pca` (first principal component) or `contrast` (the mean drift minus `centre[l]`, which
    contrast needs). With a `centre: [L, d]`, the drifts are centred on it before the direction
    (pca) and the target statistics are computed, as every drift projected later is."""
    if direction not in ("pca", "contrast"):
        raise ValueError(f"direction={direction!r}: pca or contrast")
    if direction == "contrast" and centre is None:
        raise ValueError("direction=contrast needs the reference drift (centre)")
    names = list(drifts)
    n_layers = len(layers)
    d = next(iter(drifts.values())).shape[-1]
    dirs = np.zeros((len(names), n_layers, d), dtype=np.float64)
    explained = np.zeros((len(names), n_layers))
    mean = np.zeros((len(names), n_layers))
    std = np.zeros((len(names), n_layers))
    cmean = np.zeros((len(names), n_layers))
    cstd = np.zeros((len(names), n_layers))
    ref = None if centre is None else np.asarray(centre, dtype=np.float64)
    for c, name in enumerate(names):
        x = np.asarray(drifts[name], dtype=np.float64)
        if ref is not None:
            x = x - ref[None]
        for k in range(n_layers):
            if direction == "contrast":
                dirs[c, k], explained[c, k] = contrast_component(x[:, k], np.zeros(x.shape[-1]))
            else:
                dirs[c, k], explained[c, k] = first_component(x[:, k])
            proj = x[:, k] @ dirs[c, k]
            mean[c, k], std[c, k] = proj.mean(), proj.std()
            norms = np.linalg.norm(x[:, k], axis=1)
            cos = proj / np.where(norms > 0, norms, 1.0)
            cmean[c, k], cstd[c, k] = cos.mean(), cos.std()
    return CapabilityDirections(names, list(layers), dirs.astype(np.float32), explained, mean, std, cmean, cstd,
                                dict(settings or {}), None, None if ref is None else ref.astype(np.float32))


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of scores `pos: [p]` (positives) against `neg: [q]`: P(pos > neg) + P(pos = neg) / 2
    (the Mann-Whitney statistic over all p * q pairs); NaN when either side is empty."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.sort(np.asarray(neg, dtype=np.float64))
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def layer_aucs(held: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """[L] ROC AUC per layer of held-out target terms `held: [h, L]` against pool terms `pool: [s, L]`."""
    return np.array([roc_auc(held[:, k], pool[:, k]) for k in range(held.shape[1])])


def choose_layers(aucs: np.ndarray, top: int) -> np.ndarray:
    """[c, L] float64 mask keeping, per row of `aucs: [c, L]`, the `top` layers of highest AUC
    (ties: the earlier layer; NaN ranks last); every layer when `top` >= L."""
    aucs = np.nan_to_num(np.asarray(aucs, dtype=np.float64), nan=-np.inf)
    mask = np.zeros(aucs.shape, dtype=np.float64)
    for c, row in enumerate(aucs):
        mask[c, np.argsort(-row, kind="stable")[:max(int(top), 0)]] = 1.0
    return mask
