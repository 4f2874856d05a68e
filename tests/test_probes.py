"""Concept directions: difference of means against hand values, probes, hold-out, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from mechsieve.config import ConfigError
from mechsieve.features.probes import (
    Concept,
    ConceptConfig,
    auc_roc,
    diff_of_means,
    fit_concept,
    load_concept,
    logreg_direction,
    sae_direction,
    save_concept,
)
from mechsieve.store import SettingsMismatch


def test_diff_of_means_hand_values():
    pos = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 2.0]])
    neg = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    # mean pos = [2, 3, 1], mean neg = [1, 1, 1]
    np.testing.assert_allclose(diff_of_means(pos, neg), [1.0, 2.0, 0.0])
    c = Concept(diff_of_means(pos, neg), layer=2)
    np.testing.assert_allclose(c.unit, np.array([1.0, 2.0, 0.0]) / np.sqrt(5), rtol=1e-6)
    # f_v([5, 0, 7]) = 5 / sqrt(5)
    np.testing.assert_allclose(c.score(np.array([[5.0, 0.0, 7.0]])), [np.sqrt(5)], rtol=1e-6)


def test_diff_of_means_refuses_empty_side():
    with pytest.raises(ValueError, match="both sides"):
        diff_of_means(np.zeros((0, 3)), np.ones((2, 3)))


def test_auc_roc_hand_values():
    assert auc_roc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(3.5 / 4)
    assert auc_roc(np.array([0.0]), np.array([1.0])) == 0.0


def _blobs(seed=0, n=40, d=6):
    rng = np.random.default_rng(seed)
    shift = np.zeros(d)
    shift[1] = 3.0
    return rng.normal(size=(n, d)) + shift, rng.normal(size=(n, d))


def test_fit_concept_separation_and_direction():
    pos, neg = _blobs()
    c = fit_concept(pos, neg, layer=1, cfg=ConceptConfig(holdout=0.25, seed=0))
    assert c.separation is not None and c.separation > 0.95
    assert int(np.argmax(np.abs(c.unit))) == 1 and c.unit[1] > 0
    np.testing.assert_allclose(c.direction, diff_of_means(pos, neg), rtol=1e-6)
    assert c.counts == {"positive": 40, "negative": 40}
    # no signal: held-out separation near chance
    rng = np.random.default_rng(1)
    flat = fit_concept(rng.normal(size=(200, 6)), rng.normal(size=(200, 6)), 1, ConceptConfig(holdout=0.5))
    assert 0.35 < flat.separation < 0.65


def test_logreg_direction_points_at_the_shift():
    pos, neg = _blobs(seed=2)
    w = logreg_direction(pos, neg)
    assert int(np.argmax(np.abs(w))) == 1 and w[1] > 0
    c = fit_concept(pos, neg, 0, ConceptConfig(method="logreg"))
    assert c.separation >= 0.9


def test_sae_direction_and_config_checks():
    dec = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(sae_direction(dec, 2), [8, 9, 10, 11])
    with pytest.raises(ValueError, match="out of range"):
        sae_direction(dec, 3)
    with pytest.raises(ConfigError, match="sae_decoder"):
        ConceptConfig(method="sae")
    with pytest.raises(ConfigError, match="concept.method"):
        ConceptConfig(method="pca")


def test_save_load_roundtrip_and_refusal(tmp_path):
    pos, neg = _blobs()
    c = fit_concept(pos, neg, 3, ConceptConfig(), settings={"model": "m1"})
    save_concept(tmp_path, c)
    back = load_concept(tmp_path, expected=c.settings)
    np.testing.assert_array_equal(back.direction, c.direction)
    assert back.layer == 3 and back.separation == pytest.approx(c.separation)
    with pytest.raises(SettingsMismatch, match="model"):
        load_concept(tmp_path, expected={**c.settings, "model": "m2"})
