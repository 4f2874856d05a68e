"""Multi-Otsu thresholds of a 1-D sample (no scikit-image at run time).

Same histogram and objective as `skimage.filters.threshold_multiotsu` (Liao, Chen & Chung 2001,
"A fast algorithm for multilevel thresholding"): `nbins` equal bins over [min, max], choose
`classes - 1` cut bins maximising the between-class variance sum_k P_k mu_k^2, thresholds at the
centres of the cut bins. scikit-image searches every combination (O(nbins^(classes-1))); this is
the exact optimum by dynamic programming (O(classes * nbins^2)), ties going to the
lexicographically smallest cuts as skimage's loop order does. tests/test_xtf.py checks that the
two agree.
"""

from __future__ import annotations

import numpy as np

from mechsieve.config import ConfigError


def multi_otsu(values: np.ndarray, classes: int = 3, nbins: int = 256) -> np.ndarray:
    """Thresholds [classes - 1] (ascending) splitting `values` [n] into `classes` groups.

    A value v belongs to class `np.digitize(v, thresholds)` (v < t0 -> 0, t0 <= v < t1 -> 1 ...).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if classes < 2:
        raise ConfigError(f"multi_otsu: classes={classes}; need at least 2 (xtf.tr_classes)")
    if v.size == 0:
        raise ConfigError("multi_otsu: no finite values to threshold; pass examples with response tokens "
                          "(or leave tr out of xtf.attributes)")
    hist, edges = np.histogram(v, bins=nbins, range=(v.min(), v.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    prob = hist / hist.sum()
    nonzero = np.flatnonzero(prob)
    if nonzero.size < classes:
        raise ConfigError(f"multi_otsu: only {nonzero.size} distinct binned values among {v.size}, cannot make "
                          f"{classes} classes; lower xtf.tr_classes (now {classes}) or pass more examples "
                          "(more response tokens)")
    if nonzero.size == classes:
        return centers[nonzero[:-1]]
    idx = np.arange(nbins, dtype=np.float64)
    cum_p = np.concatenate([[0.0], np.cumsum(prob)])
    cum_m = np.concatenate([[0.0], np.cumsum(prob * idx)])
    # h[a, b]: contribution of a class made of bins a..b (inclusive); -inf where b < a.
    a = np.arange(nbins)[:, None]
    b = np.arange(nbins)[None, :]
    p = cum_p[b + 1] - cum_p[a]
    m = cum_m[b + 1] - cum_m[a]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(p > 0, m * m / np.where(p > 0, p, 1.0), 0.0)
    h = np.where(b >= a, h, -np.inf)
    # best[k][i]: best value of classes k..classes-1 covering bins i..nbins-1 (class k starts at i).
    k_last = classes - 1
    best = np.full((classes, nbins + 1), -np.inf)
    best[k_last, :nbins] = h[:, nbins - 1]
    for k in range(k_last - 1, -1, -1):
        # class k covers i..j, the rest starts at j + 1
        rest = best[k + 1, 1:]  # rest[j] = best[k+1][j+1]
        best[k, :nbins] = np.max(h + rest[None, :], axis=1)
    # Walk forward choosing the smallest cut that reaches the optimum (skimage's tie order).
    cuts = []
    start = 0
    for k in range(k_last):
        total = h[start, :] + best[k + 1, 1:]
        target = total.max()
        tol = 1e-12 * max(1.0, abs(target))
        j = int(np.flatnonzero(total >= target - tol)[0])
        cuts.append(j)
        start = j + 1
    return centers[np.asarray(cuts)]
