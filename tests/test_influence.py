"""Per-example gradients (batched vs looped, projected vs dense), where the concept measurement's
gradient goes, grad-sim, and the kronfluence path of `influence` / `concept-influence` against an
explicit reference (exact gradients; identity curvature; a dense EK-FAC built by hand)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import probe_pool as _pool
from mechsieve.capture.gradients import (
    KronProjector,
    concept_objective,
    linear_modules,
    per_example_grads,
    per_example_grads_loop,
    response_loss,
)

PAD = 3






def _rendered(pool, tokenizer, max_len=64):
    from mechsieve.data.render import RenderConfig, render_pool

    return render_pool(pool.examples, tokenizer, RenderConfig(max_len=max_len))[0]


def _unit(seed=0, d=32):
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


def test_batched_gradients_equal_the_loop(loaded):
    rend = _rendered(_pool(6), loaded.tokenizer)
    mods = linear_modules(loaded.model, [0, 2])
    for objective in (response_loss, concept_objective(2, _unit())):
        ref = per_example_grads_loop(loaded.model, rend, mods, objective, pad_id=PAD).numpy()
        fast = per_example_grads(loaded.model, rend, mods, objective, pad_id=PAD, max_tokens=120)
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert all(p.requires_grad for p in loaded.model.parameters())  # flags restored


def test_kron_projection_equals_dense_projection(loaded):
    rend = _rendered(_pool(5), loaded.tokenizer)
    mods = linear_modules(loaded.model, [1], "mlp")
    shapes = [tuple(m.weight.shape) for _, m in mods]
    proj = KronProjector.make(shapes, 8, 4, seed=1)
    assert proj.dim == 3 * 8 * 4
    dense = proj.project_dense(per_example_grads_loop(loaded.model, rend, mods, pad_id=PAD), shapes).numpy()
    fast = per_example_grads(loaded.model, rend, mods, projector=proj, pad_id=PAD)
    np.testing.assert_allclose(fast, dense, rtol=1e-4, atol=1e-5 * np.abs(dense).max())


def test_concept_gradient_reaches_only_blocks_up_to_the_concept_layer(loaded):
    from mechsieve.capture.batching import collate

    model = loaded.model
    rend = _rendered(_pool(2), loaded.tokenizer)
    value = concept_objective(1, _unit())(model, collate(rend, PAD)).sum()
    named = dict(model.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(value, list(named.values()), allow_unused=True)))
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().max() > 0}
    assert any(n.startswith("model.layers.0.") for n in nonzero)
    assert any(n.startswith("model.layers.1.") for n in nonzero)
    assert not any(n.startswith("model.layers.2.") or n.startswith("lm_head") or n == "model.norm.weight"
                   for n in nonzero)


def test_grad_sim_is_the_cosine_of_projected_gradients(loaded):
    from mechsieve.scorers.registry import make_scorer

    pool, queries = _pool(6), _pool(3, shift=1, tag="q")
    cfg = {"probe": {"layer": 1}, "track_kinds": "mlp", "proj_in": 8, "proj_out": 8, "max_len": 64}
    res = make_scorer("grad-sim", cfg).score(pool, target=queries, loaded=loaded, seed=2, progress=False)
    mods = linear_modules(loaded.model, [0, 1], "mlp")
    shapes = [tuple(m.weight.shape) for _, m in mods]
    proj = KronProjector.make(shapes, 8, 8, seed=2)
    g = proj.project_dense(per_example_grads_loop(loaded.model, _rendered(pool, loaded.tokenizer), mods,
                                                  pad_id=PAD), shapes).double()
    q = proj.project_dense(per_example_grads_loop(loaded.model, _rendered(queries, loaded.tokenizer), mods,
                                                  pad_id=PAD), shapes).double().mean(0)
    manual = (g @ q / (g.norm(dim=1) * q.norm())).numpy()
    np.testing.assert_allclose(res.scores, manual, rtol=1e-4, atol=1e-6)
    assert res.explanations["tracked_blocks"] == [0, 1]


def test_missing_kronfluence_fails_at_construction(monkeypatch):
    from mechsieve.scorers.registry import make_scorer

    monkeypatch.setitem(sys.modules, "kronfluence", None)
    with pytest.raises(ImportError, match="make influence"):
        make_scorer("influence", {})


# --- the kronfluence path against explicit references ---------------------------------------


def _concept_dir(loaded, tmp_path):
    from mechsieve.features.probes import ConceptConfig, save_concept
    from mechsieve.scorers.concept import ConceptSource, build_concept

    src = ConceptSource(max_len=64, probe=ConceptConfig(layer=1, holdout=0.0))
    concept = build_concept(loaded, _pool(4, tag="p"), _pool(4, shift=1, tag="n"), src, progress=False)
    save_concept(tmp_path / "concept", concept)
    return str(tmp_path / "concept"), concept


def test_identity_curvature_equals_gradient_dot_products(loaded, tmp_path):
    pytest.importorskip("kronfluence")
    from mechsieve.scorers.registry import make_scorer

    pool, queries = _pool(6), _pool(2, shift=1, tag="q")
    cdir, concept = _concept_dir(loaded, tmp_path)
    cfg = {"concept_dir": cdir, "probe": {"layer": 1}, "strategy": "identity", "track_kinds": "mlp",
           "batch_size": 4, "max_len": 64}
    mods = linear_modules(loaded.model, [0, 1], "mlp")
    g = per_example_grads_loop(loaded.model, _rendered(pool, loaded.tokenizer), mods, pad_id=PAD).double()
    q_rend = _rendered(queries, loaded.tokenizer)
    # influence: mean over queries of grad L_q . grad L_z
    gq = per_example_grads_loop(loaded.model, q_rend, mods, pad_id=PAD).double()
    res = make_scorer("influence", cfg).score(pool, target=queries, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.scores, (gq @ g.T).mean(0).numpy(), rtol=1e-4)
    # concept influence: grad f_v(x_q) . grad L_z (sign: + = up-weighting z raises f_v)
    f = concept_objective(1, torch.from_numpy(concept.unit))
    gf = per_example_grads_loop(loaded.model, q_rend, mods, f, pad_id=PAD).double()
    res_c = make_scorer("concept-influence", cfg).score(pool, target=queries, loaded=loaded, progress=False)
    np.testing.assert_allclose(res_c.scores, -(gf @ g.T).mean(0).numpy(), rtol=1e-4,
                               atol=1e-6 * float((gf @ g.T).abs().max()))


def _ekfac_reference(model, rend, q_rend, mods, measurement, damping):
    """EK-FAC by hand (George et al. 2018; Grosse et al. 2023): eigenbases of the token covariances of
    layer inputs A and output gradients G, eigenvalue corrections = mean squared per-example
    gradient in that basis; score = <rotated query grad / (lambda + damping), rotated train grad>."""
    from mechsieve.capture.batching import collate

    k_mods = range(len(mods))
    cov_a, cov_g, per_ex = [0.0] * len(mods), [0.0] * len(mods), [[] for _ in mods]
    for r in rend:
        saved: dict = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, k=k, saved=saved: saved.__setitem__(k, (a[0], o)))
                 for k, (_, m) in enumerate(mods)]
        loss = response_loss(model, collate([r], PAD)).sum()
        outs = torch.autograd.grad(loss, [saved[k][1] for k in k_mods])
        for h in hooks:
            h.remove()
        for k, g in enumerate(outs):
            a, g = saved[k][0][0].detach().double(), g[0].double()
            cov_a[k] = cov_a[k] + a.T @ a
            cov_g[k] = cov_g[k] + g.T @ g
            per_ex[k].append(g.T @ a)
    qa = [torch.linalg.eigh(c)[1] for c in cov_a]
    qg = [torch.linalg.eigh(c)[1] for c in cov_g]
    lam = [torch.stack([(qg[k].T @ d @ qa[k]) ** 2 for d in per_ex[k]]).mean(0) for k in k_mods]
    gq = per_example_grads_loop(model, q_rend, mods, measurement, pad_id=PAD).double()
    total, start = 0.0, 0
    for k, (_, m) in enumerate(mods):
        o, i = m.weight.shape
        q = gq[:, start:start + o * i].reshape(-1, o, i)
        z = torch.stack(per_ex[k])
        total = total + torch.einsum("qoi,zoi->qz", qg[k].T @ q @ qa[k] / (lam[k] + damping),
                                     qg[k].T @ z @ qa[k])
        start += o * i
    return total.mean(0).numpy()


def test_ekfac_influence_equals_a_hand_built_ekfac(loaded, tmp_path):
    pytest.importorskip("kronfluence")
    from mechsieve.scorers.registry import make_scorer

    pool, queries = _pool(8), _pool(2, shift=1, tag="q")
    cdir, concept = _concept_dir(loaded, tmp_path)
    cfg = {"concept_dir": cdir, "probe": {"layer": 1}, "strategy": "ekfac", "track_kinds": "mlp",
           "track_blocks": 1, "empirical_fisher": True, "damping": 1e-3, "batch_size": 4, "max_len": 64}
    mods = linear_modules(loaded.model, [1], "mlp")
    rend, q_rend = _rendered(pool, loaded.tokenizer), _rendered(queries, loaded.tokenizer)
    res = make_scorer("influence", cfg).score(pool, target=queries, loaded=loaded, progress=False)
    ref = _ekfac_reference(loaded.model, rend, q_rend, mods, response_loss, 1e-3)
    np.testing.assert_allclose(res.scores, ref, rtol=2e-3, atol=1e-4 * np.abs(ref).max())
    f = concept_objective(1, torch.from_numpy(concept.unit))
    res_c = make_scorer("concept-influence", cfg).score(pool, target=queries, loaded=loaded, progress=False)
    assert res_c.explanations["factors_cached"] is True  # fitted once by the influence run
    ref_c = -_ekfac_reference(loaded.model, rend, q_rend, mods, f, 1e-3)
    np.testing.assert_allclose(res_c.scores, ref_c, rtol=2e-3, atol=1e-4 * np.abs(ref_c).max())
