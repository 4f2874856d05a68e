"""NAIT against a hand-computed PCA and projection, sign calibration, options, and the artefact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechsieve.data.records import Example, Pool
from mechsieve.data.render import RenderConfig, render_example
from mechsieve.features.neurons import CapabilityDirections, first_component
from mechsieve.models.loading import LoadedModel
from mechsieve.scorers import make_scorer
from mechsieve.store.artefacts import SettingsMismatch
from test_scorers import make_pool


@pytest.fixture(scope="module")
def loaded(make_model, tokenizer) -> LoadedModel:
    return LoadedModel(make_model("llama"), tokenizer, {"name": "tiny-llama", "kind": "test"})


def reference_drifts(loaded: LoadedModel, ex: Example, layers: list[int], site: str) -> np.ndarray:
    """[L, d] last token minus first content token, one example, unbatched, own hooks / hidden states."""
    r = render_example(ex, loaded.tokenizer, RenderConfig())
    ids = torch.from_numpy(r.input_ids)[None]
    model = loaded.model
    with torch.no_grad():
        if site == "resid":
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            acts = [hs[layer + 1][0].double() for layer in layers]
        else:
            seen: dict[int, torch.Tensor] = {}
            handles = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
                lambda m, args, layer=layer: seen.__setitem__(layer, args[0][0].double())) for layer in layers]
            model(input_ids=ids)
            for h in handles:
                h.remove()
            acts = [seen[layer] for layer in layers]
    return np.stack([(a[-1] - a[r.content_start]).numpy() for a in acts])


def hand_pca(x: np.ndarray) -> np.ndarray:
    """Top eigenvector of the covariance matrix (not an SVD), sign so the mean projects >= 0."""
    vals, vecs = np.linalg.eigh(np.cov(x.T))
    v = vecs[:, np.argmax(vals)]
    return v if x.mean(0) @ v >= 0 else -v


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_nait_matches_hand_computed_pca_and_projection(loaded, site):
    layers = [0, 1]  # below the last block: hidden_states[l + 1] is the plain block output there
    pool, target = make_pool(5), make_pool(6, start=1, source="gsm8k")
    t = np.stack([reference_drifts(loaded, ex, layers, site) for ex in target.examples])  # [m, L, d]
    dirs = [hand_pca(t[:, k]) for k in range(len(layers))]
    p = np.stack([reference_drifts(loaded, ex, layers, site) for ex in pool.examples])  # [n, L, d]
    expected = sum(p[:, k] @ dirs[k] for k in range(len(layers)))
    res = make_scorer("nait", {"layers": layers, "site": site}).score(pool, target=target, loaded=loaded,
                                                                      progress=False)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # cosine: each layer's term divided by the drift's norm
    cos = sum((p[:, k] @ dirs[k]) / np.linalg.norm(p[:, k], axis=1) for k in range(len(layers)))
    res = make_scorer("nait", {"layers": layers, "site": site, "similarity": "cosine"}).score(
        pool, target=target, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.scores, cos, rtol=1e-4, atol=1e-5)
    # z-normalisation with the target's statistics of each layer's projection
    proj_t = [t[:, k] @ dirs[k] for k in range(len(layers))]
    z = sum((p[:, k] @ dirs[k] - proj_t[k].mean()) / proj_t[k].std() for k in range(len(layers)))
    res = make_scorer("nait", {"layers": layers, "site": site, "normalize": "target"}).score(
        pool, target=target, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.scores, z, rtol=1e-4, atol=1e-4)


def test_sign_calibration():
    x = np.array([[1.0, 0.1], [3.0, -0.1], [5.0, 0.0], [7.0, 0.05]])
    v, explained = first_component(x)
    assert v[0] > 0.99 and explained > 0.99
    v_neg, _ = first_component(-x)
    np.testing.assert_allclose(v_neg, -v)  # the same axis, flipped so the mean projects >= 0
    assert (-x).mean(0) @ v_neg > 0
    # A principal direction that the SVD returns pointing against the mean drift is flipped. The
    # centred data t * (2, -1) fixes the SVD's answer; the mean is chosen opposite to that answer.
    centred = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])[:, None] * np.array([2.0, -1.0])
    raw = np.linalg.svd(centred, full_matrices=False)[2][0]
    mean = -np.sign(raw @ np.array([1.0, 1.0])) * np.array([1.0, 1.0])
    y = centred + mean
    assert raw @ y.mean(0) < 0  # the precondition: unflipped, the mean would project negatively
    w, _ = first_component(y)
    np.testing.assert_allclose(w, -raw, atol=1e-12)
    assert y.mean(0) @ w > 0
    with pytest.raises(ValueError, match="at least 2"):
        first_component(x[:1])


def test_sign_follows_the_target(loaded):
    """Scoring the target set itself: its mean score is positive (its drifts project along v)."""
    target = make_pool(6, start=1, source="gsm8k")
    res = make_scorer("nait", {"layers": [0, 1]}).score(target, target=target, loaded=loaded, progress=False)
    assert res.scores.mean() > 0


def test_several_capabilities_union(loaded):
    a, b = make_pool(4, start=0, source="math"), make_pool(4, start=3, source="code")
    target = Pool(a.examples + b.examples, "", "memory", "memory")
    pool = make_pool(7)
    res = make_scorer("nait", {"layers": [0, 1]}).score(pool, target=target, loaded=loaded, progress=False)
    assert res.per_target.shape == (7, 2) and res.target_names == ["math", "code"]
    single_a = make_scorer("nait", {"layers": [0, 1]}).score(pool, target=a, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.per_target[:, 0], single_a.scores, rtol=1e-6)
    np.testing.assert_allclose(res.scores, res.per_target.max(axis=1))
    from mechsieve.select import select_examples

    # A budget of 2 takes the best example of each capability, not the two best combined scores.
    # In this trio (seeded model) pool-02 is the best at math, pool-03 the best at code, and
    # pool-04's combined score beats pool-03's: the two rules pick different pairs.
    trio = Pool([pool.examples[i] for i in (2, 3, 4)], "", "memory", "memory")
    per_target = make_scorer("nait", {"layers": [0, 1]}).score(trio, target=target, loaded=loaded,
                                                               progress=False).per_target
    assert list(per_target.argmax(axis=0)) == [0, 1]
    assert per_target[2].max() > per_target[1].max()
    sel = select_examples("nait", trio, 2, target=target, loaded=loaded, settings={"layers": [0, 1]}, progress=False)
    assert set(sel.ids) == {"pool-02", "pool-03"}
    with pytest.raises(Exception, match="fewer than 2"):
        make_scorer("nait").score(pool, target=make_pool(1, source="x"), loaded=loaded, progress=False)


def test_directions_artefact_roundtrip_and_refusal(loaded, tmp_path):
    pool, target = make_pool(5), make_pool(6, start=1, source="gsm8k")
    fitted = make_scorer("nait", {"layers": [0, 2], "save_directions": str(tmp_path / "dirs")}).score(
        pool, target=target, loaded=loaded, progress=False)
    assert (tmp_path / "dirs" / "nait_directions.safetensors").exists()
    reused = make_scorer("nait", {"layers": [0, 2], "directions": str(tmp_path / "dirs")}).score(
        pool, target=None, loaded=loaded, progress=False)
    np.testing.assert_allclose(reused.scores, fitted.scores, rtol=1e-6)
    art = CapabilityDirections.load(tmp_path / "dirs")
    assert art.directions.shape == (1, 2, 32) and art.layers == [0, 2]
    np.testing.assert_allclose(np.linalg.norm(art.directions, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(SettingsMismatch, match="layers"):
        make_scorer("nait", {"layers": [0, 1], "directions": str(tmp_path / "dirs")}).score(
            pool, loaded=loaded, progress=False)
    with pytest.raises(SettingsMismatch, match="site"):
        make_scorer("nait", {"layers": [0, 2], "site": "mlp", "directions": str(tmp_path / "dirs")}).score(
            pool, loaded=loaded, progress=False)
