"""IGDS steering: the first (sink) token left alone, random-direction controls of the same norm,
the keep / stop rules, and batched interventional filtering against the one-at-a-time reference
(same numbers, fewer forwards) on tiny random models and a tiny random SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import IGDS_QA, igds_pool
from mechsieve.capture.batching import collate
from mechsieve.data.render import RenderConfig, pad_id, render_example
from mechsieve.features.sae import random_sae, write_sae
from mechsieve.models.hooks import hook_points
from mechsieve.scorers import make_scorer
from mechsieve.scorers.base import ScorerError
from mechsieve.scorers.igds import IgdsConfig, keep_features
from mechsieve.scorers.igds_steer import (
    BatchedDevLoss,
    SteerPairs,
    control_directions,
    count_forwards,
    dev_loss,
    head_takes_a_mask,
    interventional_filter,
    not_first_token,
    reference_evaluator,
    steering,
    stop_after,
)

pytestmark = pytest.mark.timeout(300)

QA = IGDS_QA


pool_of = igds_pool


@pytest.fixture(scope="module")
def sae():
    return random_sae(32, 48, layer=1, activation="relu", seed=0)


def rendered_qa(tokenizer):
    return [render_example(ex, tokenizer, RenderConfig(max_len=64)) for ex in pool_of(QA, "dev").examples]


def test_not_first_token_with_left_and_right_padding():
    am = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert not_first_token(am, 4).tolist() == [[False, True, True, True], [True, True, False, True],
                                               [False, True, True, True]]
    # a cached generation step sees only its last column: never the first token once past it
    assert not_first_token(am, 1).tolist() == [[True], [True], [True]]


def test_skip_first_leaves_the_sink_token_untouched(loaded, sae):
    """Block 1's steered output at each row's first real token equals the plain one (left padding:
    column 2 of row 1); every other real token moves."""
    rendered = rendered_qa(loaded.tokenizer)[3:5]
    batch = collate(rendered, pad_id(loaded.tokenizer), "left")
    seen = []  # block 1's output after steering = block 2's input
    handle = hook_points(loaded.model).block(2).register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    first = batch.offsets  # left padding: the first real token is at column offsets[r]
    rows = torch.arange(2)
    try:
        with torch.no_grad():
            kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False)
            loaded.model(**kw)
            j = int(sae.encode(seen[0][rows, first]).min(0).values.argmax())  # fires on both first tokens
            assert sae.encode(seen[0][rows, first])[:, j].min() > 0
            with steering(loaded.model, sae, 1, j, 6.0, skip_first=True):
                loaded.model(**kw)
            with steering(loaded.model, sae, 1, j, 6.0):
                loaded.model(**kw)
    finally:
        handle.remove()
    plain, skipped, every = seen
    assert int(first[1]) > 0 or int(first[0]) > 0  # the two rows differ in length
    push = 5.0 * sae.encode(plain)[..., j, None] * sae.W_dec[j]  # (alpha - 1) a_j W_dec[j]
    keep = torch.ones(plain.shape[:2])
    keep[rows, first] = 0.0
    torch.testing.assert_close(skipped, plain + keep[..., None] * push, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(every, plain + push, rtol=1e-5, atol=1e-6)  # the paper's: every token
    assert torch.equal(skipped[rows, first], plain[rows, first])
    assert (every[rows, first] - plain[rows, first]).abs().max() > 1e-3


def test_control_directions_have_the_decoder_norm_and_are_seeded(sae):
    j = 5
    ctrl = control_directions(sae.W_dec[j], 8, 3, j)
    assert ctrl.shape == (8, 32)
    torch.testing.assert_close(ctrl.norm(dim=1), sae.W_dec[j].norm().expand(8), rtol=1e-5, atol=1e-6)
    assert torch.equal(ctrl, control_directions(sae.W_dec[j], 8, 3, j))  # seeded
    assert torch.equal(ctrl[:4], control_directions(sae.W_dec[j], 4, 3, j))  # a prefix of a longer draw
    assert not torch.equal(ctrl, control_directions(sae.W_dec[j], 8, 4, j))  # another seed
    assert not torch.equal(ctrl, control_directions(sae.W_dec[j], 8, 3, j + 1)[:, :])  # another latent
    cos = (ctrl / ctrl.norm(dim=1, keepdim=True)) @ (sae.W_dec[j] / sae.W_dec[j].norm())
    assert cos.abs().max() < 0.9  # random directions, not the decoder row
    pairs = SteerPairs.grid([j, 7], [2.0, 4.0], [-1, 2])
    assert pairs.features.tolist() == [5, 5, 5, 5, 7, 7, 7, 7]
    assert pairs.controls.tolist() == [-1, -1, 2, 2, -1, -1, 2, 2]
    assert pairs.alphas.tolist() == [2.0, 4.0] * 4
    dirs = pairs.directions(sae, 8, 3)
    assert torch.equal(dirs[0], sae.W_dec[5]) and torch.equal(dirs[2], ctrl[2])
    assert torch.equal(dirs[6], control_directions(sae.W_dec[7], 8, 3, 7)[2])


def test_interventional_filter_rounds_against_a_table_of_metrics():
    """A fake loss table: base 2.0; latents 10, 11, 12 at alphas (2, 5); controls only for the
    latents with delta > 0, best over alphas, and their 0.75 quantile."""
    base = 2.0
    latent = {(10, 2.0): 1.9, (10, 5.0): 1.7, (11, 2.0): 2.1, (11, 5.0): 2.3, (12, 2.0): 1.95, (12, 5.0): 1.99}
    # control k of latent j at alpha a: loss = 2.0 - 0.01 * (k + 1) * (a / 5) * (j - 9)
    calls = []

    def evaluate(pairs: SteerPairs) -> np.ndarray:
        calls.append(pairs)
        out = []
        for j, a, k in zip(pairs.features.tolist(), pairs.alphas.tolist(), pairs.controls.tolist()):
            if a == 1.0:
                out.append(base)
            elif k < 0:
                out.append(latent[(j, a)])
            else:
                out.append(2.0 - 0.01 * (k + 1) * (a / 5) * (j - 9))
        return np.array(out)

    filt = interventional_filter(evaluate, np.array([10, 11, 12]), [2.0, 5.0], -1.0, 4, 0.75, "positive", 9)
    np.testing.assert_allclose(filt.deltas, [0.3, -0.1, 0.05])
    assert filt.best_alpha.tolist() == [5.0, 2.0, 2.0]
    assert filt.base == base and filt.pairs == 1 + 6 + 2 * 4 * 2
    assert set(calls[1].features.tolist()) == {10, 12}  # no controls for latent 11 (delta <= 0)
    # latent 10 controls (best alpha 5): 0.01, 0.02, 0.03, 0.04; latent 12: 0.03, 0.06, 0.09, 0.12
    np.testing.assert_allclose(filt.control_deltas[0], [0.01, 0.02, 0.03, 0.04])
    assert np.isnan(filt.control_deltas[1]).all()
    np.testing.assert_allclose(filt.control_deltas[2], [0.03, 0.06, 0.09, 0.12])
    np.testing.assert_allclose(filt.control_q[[0, 2]], [0.0325, 0.0975])  # linear: x3 + .25 (x4 - x3)
    assert np.isnan(filt.control_q[1])
    kept, fallback = keep_features(filt.deltas, "positive", 9, filt.control_q, "stop")
    assert kept.tolist() == [0] and not fallback  # latent 12 (0.05 <= 0.0975) is dropped
    rows = filt.table(np.array([10, 11, 12]), kept, fallback)
    assert [r["why"] for r in rows] == ["kept", "dropped: delta <= 0", "dropped: delta <= the controls' 0.75 quantile"]
    assert rows[2]["control_q"] == pytest.approx(0.0975) and rows[1]["control_q"] is None
    # keep=top: controls for the keep_top best only, kept regardless of them
    calls.clear()
    top = interventional_filter(evaluate, np.array([10, 11, 12]), [2.0, 5.0], -1.0, 4, 0.75, "top", 2)
    assert set(calls[1].features.tolist()) == {10, 12}
    assert keep_features(top.deltas, "top", 2, top.control_q, "stop")[0].tolist() == [0, 2]
    # no controls: one round only
    calls.clear()
    none = interventional_filter(evaluate, np.array([10, 11, 12]), [2.0, 5.0], -1.0, 0, 0.75, "positive", 9)
    assert len(calls) == 1 and none.control_deltas.shape == (3, 0) and np.isnan(none.control_q).all()
    assert keep_features(none.deltas, "positive", 9, none.control_q, "stop")[0].tolist() == [0, 2]


def test_stop_after_is_where_the_quantile_starts():
    # linear quantile of n sorted values starts at index floor(q (n - 1)): 8 at 0.95 -> 6.65, so the
    # 2 largest decide; 4 at 0.75 -> 2.25, 2 decide; 1 -> 1. 5 at 0.5 -> 2.0 exactly: 3 would do, 4
    # are asked (an index on an integer counts one more, so float rounding never stops too early)
    assert [stop_after(8, 0.95), stop_after(4, 0.75), stop_after(5, 0.5), stop_after(1, 0.95)] == [2, 2, 4, 1]
    rng = np.random.default_rng(0)
    for n in range(1, 12):
        for q in (0.5, 0.75, 0.9, 0.95):
            m = stop_after(n, q)
            v = rng.random(n)
            delta = np.sort(v)[-m]  # exactly m values >= delta: the quantile must be >= delta
            assert np.quantile(v, q) >= delta, (n, q)


def test_control_stop_keeps_what_every_control_keeps_for_fewer_pairs():
    """Random fake metrics, 40 candidates, 8 controls at q = 0.95: the early-stopped round 2 keeps
    the same latents (and the exact quantiles of those it keeps) while evaluating fewer pairs."""
    rng = np.random.default_rng(3)
    feats = np.arange(100, 140)
    alphas = [2.0, 5.0, 10.0]
    table = {}

    def evaluate(pairs: SteerPairs) -> np.ndarray:
        out = []
        for j, a, k in zip(pairs.features.tolist(), pairs.alphas.tolist(), pairs.controls.tolist()):
            if a == 1.0:
                out.append(2.0)
                continue
            key = (j, a, k)
            if key not in table:  # latents 100-104 help a lot; the rest are noise like the controls
                table[key] = 2.0 - (0.05 if (k < 0 and j < 105) else 0.0) + 0.02 * rng.standard_normal()
            out.append(table[key])
        return np.array(out)

    full = interventional_filter(evaluate, feats, alphas, -1.0, 8, 0.95, "positive", 10)
    fast = interventional_filter(evaluate, feats, alphas, -1.0, 8, 0.95, "positive", 10, control_stop=True)
    np.testing.assert_array_equal(fast.deltas, full.deltas)
    kept_full = keep_features(full.deltas, "positive", 10, full.control_q, "stop")[0]
    kept_fast = keep_features(fast.deltas, "positive", 10, fast.control_q, "stop")[0]
    assert kept_fast.tolist() == kept_full.tolist()
    assert set(feats[kept_fast].tolist()) >= {100, 101, 102, 103, 104} and len(kept_fast) < 20
    np.testing.assert_allclose(fast.control_q[kept_fast], full.control_q[kept_fast])
    runs = np.array([fast.ran(c) for c in range(len(feats))])
    assert (runs[kept_fast] == 8).all()
    positive = full.deltas > 0
    stopped = positive & (runs < 8)
    assert stopped.sum() > 10 and fast.pairs < full.pairs
    assert fast.pairs == 1 + 40 * 3 + 3 * int(runs.sum())
    # an early-stopped candidate's control_q: the 2nd largest of its controls run, at or above its delta
    for c in np.flatnonzero(stopped):
        ran = fast.control_deltas[c, :runs[c]]
        assert fast.control_q[c] == np.sort(ran)[-2] and fast.control_q[c] >= fast.deltas[c]
        assert np.isnan(fast.control_deltas[c, runs[c]:]).all()
    rows = fast.table(feats, kept_fast, False)
    c = int(np.flatnonzero(stopped)[0])
    assert rows[c]["why"].startswith("dropped: delta <= the controls' 0.95 quantile (decided after")
    assert rows[c]["controls_run"] == int(runs[c])
    # keep=top ignores control_stop: all controls of the keep_top best
    top = interventional_filter(evaluate, feats, alphas, -1.0, 8, 0.95, "top", 4, control_stop=True)
    assert top.pairs == 1 + 40 * 3 + 4 * 8 * 3


def test_keep_features_stop_and_fallback():
    deltas, q = np.array([0.02, -0.1, 0.01]), np.array([0.03, np.nan, 0.05])
    with pytest.raises(ScorerError, match=r"none by more than its random-direction controls.*scorer\.keep=top"):
        keep_features(deltas, "positive", 9, q, "stop")
    with pytest.raises(ScorerError, match=r"no candidate latent improved.*scorer\.none_kept=best"):
        keep_features(np.array([-0.1, 0.0]), "positive", 9, None, "stop")
    kept, fallback = keep_features(deltas, "positive", 9, q, "best")
    assert kept.tolist() == [0] and fallback
    kept, fallback = keep_features(deltas, "top", 2, q, "stop")
    assert kept.tolist() == [0, 2] and not fallback


def test_presets_of_the_steering_settings():
    paper, robust = IgdsConfig(preset="paper"), IgdsConfig()
    assert (paper.steer_first, paper.controls, paper.none_kept) == (True, 0, "best")
    assert (robust.steer_first, robust.controls, robust.none_kept) == (False, 8, "stop")
    assert IgdsConfig(preset="paper", controls=4).controls == 4  # an explicit value wins
    from mechsieve.config import ConfigError

    with pytest.raises(ConfigError, match="none_kept"):
        IgdsConfig(none_kept="maybe")
    with pytest.raises(ConfigError, match="control_quantile"):
        IgdsConfig(control_quantile=1.5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("where,steer_first", [("all", False), ("all", True), ("prompt", False), ("position", False)])
def test_batched_filtering_equals_the_reference_with_fewer_forwards(make_model, tokenizer, arch, where, steer_first):
    from mechsieve.models.loading import LoadedModel

    loaded = LoadedModel(make_model(arch), tokenizer, {"name": arch, "kind": "test"})
    sae = random_sae(32, 48, layer=1, activation="relu", seed=1)
    rendered = rendered_qa(tokenizer)
    # small batches, so the dev set spans several (3 of 2 rows) and the pairs several forwards
    cfg = IgdsConfig(steer_positions=where, steer_first=steer_first, max_tokens=128, max_batch=2, steer_batch=4,
                     render={"max_len": 64}, preset="paper")
    features = np.array([3, 17, 40])
    pairs = SteerPairs.grid(features, [1.0, 3.0, 8.0], [-1]) + SteerPairs.grid(features[:2], [3.0, 8.0], [0, 1, 2])
    with count_forwards(loaded.model) as n_ref:
        ref = reference_evaluator(loaded, [], rendered, sae, cfg, 3, 7)(pairs)
    with count_forwards(loaded.model) as n_bat:
        bat = BatchedDevLoss(loaded, rendered, sae, cfg, 3, 7)(pairs)
    np.testing.assert_allclose(bat, ref, rtol=1e-5, atol=1e-5)
    assert head_takes_a_mask(loaded.model)  # the batched run above skipped the head on prompt tokens
    full_head = BatchedDevLoss(loaded, rendered, sae, cfg, 3, 7)
    full_head.head_on_response = False  # ... and the fallback for models that cannot
    np.testing.assert_allclose(full_head(pairs), ref, rtol=1e-5, atol=1e-5)
    assert np.ptp(ref[[1, 2, 4, 5, 7, 8]]) > 1e-4  # the pairs do differ, so equality means something
    assert ref[0] == ref[3] == ref[6]  # alpha 1: no push at all
    n_batches, n_pairs = 3, len(pairs)
    assert n_ref[0] == n_batches * n_pairs  # 63
    assert n_bat[0] == n_batches * (1 + -(-n_pairs // 4))  # one residual pass + 6 steered forwards each: 21
    # the model is back to normal afterwards
    assert dev_loss(loaded, rendered, sae, None, 1.0, cfg) == pytest.approx(ref[0], abs=1e-6)
    assert all("forward" not in hook_points(loaded.model).block(i).__dict__ for i in range(3))


def test_reference_control_is_the_push_along_the_control_direction(loaded, sae):
    """A control pair's metric = dev_loss with W_dec[j] replaced by its control direction."""
    rendered = rendered_qa(loaded.tokenizer)[:3]
    cfg = IgdsConfig(render={"max_len": 64}, steer_first=False)
    j = 9
    got = reference_evaluator(loaded, [], rendered, sae, cfg, 2, 5)(SteerPairs.grid([j], [4.0], [1]))
    want = dev_loss(loaded, rendered, sae, j, 4.0, cfg, control_directions(sae.W_dec[j], 2, 5, j)[1])
    assert got[0] == want
    assert want != dev_loss(loaded, rendered, sae, j, 4.0, cfg)


def igds_settings(folder, **over):
    return {"sae": str(folder), "freq_threshold": 0.3, "top_k": 4, "dev_size": 3, "alphas": [3.0, 6.0],
            "render": {"max_len": 64}, "reference": "none", "template_filter": False, "position": "last_prompt",
            **over}


def test_igds_stops_when_no_latent_is_kept_unless_keep_top(loaded, sae, tmp_path):
    folder = write_sae(tmp_path / "sae", sae)
    target, pool = pool_of(QA[:3] + QA[5:], "target"), pool_of(QA, "pool")
    # alpha 1 pushes by exactly 0: every delta is 0, so no latent can be kept
    with pytest.raises(ScorerError, match=r"no candidate latent improved.*scorer\.keep=top"):
        make_scorer("igds", igds_settings(folder, alphas=[1.0])).score(pool, target=target, loaded=loaded,
                                                                     progress=False)
    paper = make_scorer("igds", igds_settings(folder, alphas=[1.0], preset="paper"))
    res = paper.score(pool, target=target, loaded=loaded, progress=False)
    assert res.explanations["fallback"] and len(res.explanations["kept"]) == 1  # today's behaviour
    top = make_scorer("igds", igds_settings(folder, keep="top", keep_top=2))
    res = top.score(pool, target=target, loaded=loaded, progress=False)
    filt = res.explanations["filtering"]
    assert (filt["controls"], filt["steer_first"], filt["impl"]) == (8, False, "batched")
    rows = {r["feature"]: r for r in filt["candidates"]}
    assert [r["feature"] for r in filt["candidates"]] == res.explanations["candidates"]
    assert sorted(res.explanations["kept"]) == sorted(j for j, r in rows.items() if r["kept"])
    for row in res.explanations["features"]:  # kept: the two best by delta, with their controls' quantile
        assert row["control_q"] == rows[row["feature"]]["control_q"] is not None
    best = sorted(rows.values(), key=lambda r: -r["delta"])[:2]
    assert res.explanations["kept"] == [r["feature"] for r in best]


def test_igds_batched_and_reference_agree_end_to_end(loaded, sae, tmp_path):
    folder = write_sae(tmp_path / "sae", sae)
    target, pool = pool_of(QA[:3] + QA[5:], "target"), pool_of(QA, "pool")
    out = {}
    for impl in ("batched", "reference"):
        s = igds_settings(folder, keep="top", keep_top=3, controls=3, filter_impl=impl, max_batch=2)
        out[impl] = make_scorer("igds", s).score(pool, target=target, loaded=loaded, progress=False)
    a, b = (out[k].explanations for k in ("batched", "reference"))
    assert a["kept"] == b["kept"]
    for ra, rb in zip(a["filtering"]["candidates"], b["filtering"]["candidates"]):
        assert ra["delta"] == pytest.approx(rb["delta"], abs=1e-5)
        assert (ra["control_q"] is None) == (rb["control_q"] is None)
        if ra["control_q"] is not None:
            assert ra["control_q"] == pytest.approx(rb["control_q"], abs=1e-5)
    assert a["base_dev_metric"] == pytest.approx(b["base_dev_metric"], abs=1e-5)
    assert a["filtering"]["forwards"] < b["filtering"]["forwards"]
    np.testing.assert_allclose(out["batched"].scores, out["reference"].scores, rtol=1e-6)


def test_igds_control_stop_end_to_end_keeps_the_same_latents(loaded, sae, tmp_path):
    """keep=positive with 8 controls at q = 0.95 (none_kept=best, so the run goes on whatever
    passes): stopping the controls early keeps the same latents and gives the same scores, for
    fewer pairs."""
    folder = write_sae(tmp_path / "sae", sae)
    target, pool = pool_of(QA[:3] + QA[5:], "target"), pool_of(QA, "pool")
    out = {}
    for stop in (False, True):
        s = igds_settings(folder, controls=8, control_stop=stop, none_kept="best", alphas=[2.0, 5.0])
        out[stop] = make_scorer("igds", s).score(pool, target=target, loaded=loaded, progress=False)
    full, fast = (out[k].explanations for k in (False, True))
    assert fast["kept"] == full["kept"] and fast["filtering"]["control_stop"] is True
    np.testing.assert_array_equal(out[True].scores, out[False].scores)
    assert fast["filtering"]["pairs"] < full["filtering"]["pairs"], (fast["filtering"], full["filtering"])
    for ra, rb in zip(fast["filtering"]["candidates"], full["filtering"]["candidates"]):
        assert ra["delta"] == rb["delta"] and ra["kept"] == rb["kept"]
        if ra["kept"]:
            assert ra["control_q"] == rb["control_q"] and ra["controls_run"] == 8


def test_select_command_stops_in_one_line_and_goes_on_with_keep_top(model_dir, tmp_path, capsys):
    import json

    from conftest import write_jsonl
    from mechsieve.cli import main

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = write_jsonl(tmp_path / "target.jsonl", rows[:3])
    folder = write_sae(tmp_path / "sae", random_sae(32, 48, layer=1))
    args = ["select", "--method", "igds", "--model", str(model_dir), "--pool", str(pool), "--target", str(target),
            "--budget", "0.5", "--quiet", "--set", f"scorer.sae={folder}", "--set", "scorer.freq_threshold=0.3",
            "--set", "scorer.top_k=3", "--set", "scorer.dev_size=2", "--set", "scorer.alphas=[1.0]",
            "--set", "scorer.reference=none", "--set", "scorer.template_filter=false",
            "--set", "scorer.position=last_prompt"]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err
    assert "no candidate latent improved" in err and "scorer.keep=top" in err and "Traceback" not in err
    assert main([*args, "--out", str(tmp_path / "top"), "--set", "scorer.keep=top", "--set", "scorer.keep_top=2"]) == 0
    summary = json.loads((tmp_path / "top" / "summary.json").read_text())
    assert len(summary["explanations"]["kept"]) == 2
    assert all(r["delta"] == 0.0 for r in summary["explanations"]["filtering"]["candidates"])  # alpha 1: no push


def test_skip_first_during_generation_reads_the_attention_mask_generate_passes(loaded, sae):
    """Under model.generate (left padding, KV cache): the prefill leaves each row's first real
    token alone and steers the rest by exactly the push; the cached decode step runs too."""
    rendered = [render_example(ex, loaded.tokenizer, RenderConfig(max_len=64), add_generation_prompt=True)
                for ex in pool_of(QA[3:5], "g").examples]
    batch = collate(rendered, pad_id(loaded.tokenizer), "left")
    seen = []
    handle = hook_points(loaded.model).block(2).register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    rows, first = torch.arange(2), batch.offsets
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=2, do_sample=False,
              pad_token_id=pad_id(loaded.tokenizer))
    try:
        with torch.no_grad():
            loaded.model.generate(**kw)
            plain = seen[0]
            j = int(sae.encode(plain[rows, first]).min(0).values.argmax())
            seen.clear()
            with steering(loaded.model, sae, 1, j, 6.0, skip_first=True):
                loaded.model.generate(**kw)
    finally:
        handle.remove()
    prefill, step = seen[0], seen[1]
    assert prefill.shape == plain.shape and step.shape[1] == 1
    push = 5.0 * sae.encode(plain)[..., j, None] * sae.W_dec[j]
    keep = torch.ones(plain.shape[:2])
    keep[rows, first] = 0.0
    torch.testing.assert_close(prefill, plain + keep[..., None] * push, rtol=1e-5, atol=1e-6)
    assert (push[rows, first].abs().amax(-1) > 1e-3).all()  # the first tokens would have moved
