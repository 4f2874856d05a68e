"""IGDS: steering with the SAE error re-added, frequency recall and FRS against hand counts, the
pipeline against a manual hidden-state computation, ablation switches, and the select command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import IGDS_QA, igds_pool, write_jsonl
from mechsieve.data.render import RenderConfig, render_example
from mechsieve.features.sae import random_sae, write_sae
from mechsieve.scorers import make_scorer
from mechsieve.scorers.igds import Igds, feature_resonant_score, frequency_recall, keep_features
from mechsieve.scorers.igds_steer import dev_loss, steer, steering

QA = IGDS_QA


pool_of = igds_pool




@pytest.fixture(scope="module")
def sae():
    return random_sae(32, 48, layer=1, activation="relu", seed=0)


def test_steering_alpha_one_is_exact_and_other_alphas_change_the_output(loaded, sae):
    ids = loaded.tokenizer("Tom has 3 apples and buys 4 more.", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
        j = int(sae.encode(torch.randn(1, 32)).argmax())
        with steering(loaded.model, sae, 1, j, 1.0):
            same = loaded.model(input_ids=ids).logits
        # pick a latent that fires on this input so steering it has an effect
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        j = int(sae.encode(hidden)[0].sum(0).argmax())
        with steering(loaded.model, sae, 1, j, 1.0):
            same_j = loaded.model(input_ids=ids).logits
        with steering(loaded.model, sae, 1, j, 5.0):
            moved = loaded.model(input_ids=ids).logits
    assert torch.equal(plain, same) and torch.equal(plain, same_j)
    assert (moved - plain).abs().max() > 1e-4
    after = loaded.model(input_ids=ids).logits  # the hook is removed on exit
    assert torch.equal(after.detach(), plain)


def test_steer_is_decode_of_scaled_latent_plus_error(sae):
    h = 2 * torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    a = sae.encode(h)
    j = int(a.sum((0, 1)).argmax())
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 4] = True
    out = steer(h, sae, j, 3.0, mask)
    scaled = a.clone()
    scaled[..., j] *= 3.0
    expected = sae.decode(scaled) + sae.error(h)
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~mask], h[~mask])  # unmasked positions untouched
    assert (out[mask] - h[mask]).abs().max() > 1e-3


def test_frequency_recall_against_hand_counts():
    # 5 probe inputs x 6 latents
    acts = np.array([[1.0, 0.0, 2.0, 0.5, 0.0, 3.0],
                     [1.0, 0.0, 0.0, 0.5, 0.0, 3.0],
                     [1.0, 4.0, 2.0, 0.5, 0.0, 3.0],
                     [1.0, 0.0, 2.0, 0.0, 0.0, 3.0],
                     [1.0, 0.0, 2.0, 0.5, 0.1, 0.0]])
    counts, sums = (acts > 0).sum(0), acts.sum(0)
    # freq: 1, .2, .8, .8, .2, .8; mean: 1, .8, 1.6, .4, .02, 2.4
    rec = frequency_recall(counts, sums, 5, 0.6, 0.0, 10)
    np.testing.assert_allclose(rec.freq, [1, .2, .8, .8, .2, .8])
    np.testing.assert_allclose(rec.mean, [1, .8, 1.6, .4, .02, 2.4])
    assert rec.features.tolist() == [5, 2, 0, 3]  # freq > .6, by mean
    assert frequency_recall(counts, sums, 5, 0.6, 0.5, 2).features.tolist() == [5, 2]  # floor .5, top 2
    # contrast: general text fires latent 0 always and latent 5 on 1 of 4 inputs
    general = np.array([4, 0, 0, 0, 0, 1])
    rec = frequency_recall(counts, sums, 5, 0.6, 0.0, 10, general, 4, contrast_ratio=2.0)
    np.testing.assert_allclose(rec.contrast_freq, [1, 0, 0, 0, 0, .25])
    assert rec.features.tolist() == [5, 2, 3]  # latent 0 (1 vs 1) drops; latent 5 (.8 >= 2 x .25) stays


def test_frs_against_manual_sum_and_keep_rules():
    lat = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 0.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(feature_resonant_score(lat, np.array([1, 3])), [4.0, 0.0, 2.0])
    np.testing.assert_allclose(feature_resonant_score(lat, np.array([0, 2]), np.array([0.5, 2.0])), [4.0, 3.0, 2.5])
    kept, fb = keep_features(np.array([0.1, -0.2, 0.3, 0.0]), "positive", 9)
    assert kept.tolist() == [2, 0] and not fb
    kept, fb = keep_features(np.array([-0.1, -0.2, -0.05]), "positive", 9)
    assert kept.tolist() == [2] and fb
    assert keep_features(np.array([0.1, -0.2, 0.3]), "top", 2)[0].tolist() == [2, 0]


def manual_latents(loaded, sae, examples):
    """[n, d_sae] SAE latents at the last prompt token, from hidden_states (no mechsieve hooks)."""
    rows = []
    for ex in examples:
        r = render_example(ex, loaded.tokenizer, RenderConfig(max_len=64))
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.as_tensor(r.input_ids)[None], output_hidden_states=True).hidden_states
        rows.append(sae.encode(hs[sae.layer + 1][0, r.prompt_len - 1]).numpy())
    return np.stack(rows)


def test_igds_pipeline_against_manual_computation(loaded, sae, tmp_path):
    folder = write_sae(tmp_path / "sae", sae)
    target, pool = pool_of(QA[:3] + QA[5:], "target"), pool_of(QA, "pool")
    settings = {"sae": str(folder), "freq_threshold": 0.5, "top_k": 5, "dev_size": 4, "alphas": [2.0, 4.0],
                "render": {"max_len": 64}, "preset": "paper"}
    scorer = make_scorer("igds", settings)
    res = scorer.score(pool, target=target, loaded=loaded, progress=False)
    lat_t = manual_latents(loaded, sae, target.examples)
    rec = frequency_recall((lat_t > 0).sum(0), lat_t.sum(0), len(target), 0.5, 0.0, 5)
    assert res.explanations["candidates"] == rec.features.tolist()
    kept = np.array(res.explanations["kept"])
    assert set(kept) <= set(rec.features) and len(kept) >= 1
    lat_p = manual_latents(loaded, sae, pool.examples)
    np.testing.assert_allclose(res.scores, lat_p[:, kept].sum(1), rtol=1e-4, atol=1e-5)
    table = res.explanations["features"]
    assert [row["feature"] for row in table] == kept.tolist()
    # each kept latent's delta is the base dev loss minus its best steered loss
    rendered = [render_example(ex, loaded.tokenizer, RenderConfig(max_len=64)) for ex in target.examples]
    base = dev_loss(loaded, rendered, sae, None, 1.0, scorer.config)
    assert res.explanations["base_dev_metric"] == pytest.approx(base, abs=5e-6)  # rounded to 6 places; float32 sums
    assert dev_loss(loaded, rendered, sae, int(kept[0]), 1.0, scorer.config) == base
    row = table[0]
    steered = dev_loss(loaded, rendered, sae, row["feature"], row["best_alpha"], scorer.config)
    assert row["delta"] == pytest.approx(base - steered, abs=5e-6)
    assert res.explanations["fallback"] == (row["delta"] <= 0)
    assert row["freq"] == pytest.approx(float((lat_t[:, row["feature"]] > 0).mean()), abs=1e-4)
    assert all("[[" in s["text"] for s in row["snippets"])


def test_ablation_switches(loaded, sae, tmp_path):
    folder = str(write_sae(tmp_path / "sae", sae))
    target, pool = pool_of(QA[:3], "target"), pool_of(QA, "pool")
    base = {"sae": folder, "freq_threshold": 0.3, "top_k": 4, "dev_size": 2, "alphas": [3.0],
            "render": {"max_len": 64}, "preset": "paper"}
    no_filter = make_scorer("igds", {**base, "filtering": False}).score(pool, target=target, loaded=loaded,
                                                                      progress=False)
    assert no_filter.explanations["kept"] == no_filter.explanations["candidates"]
    assert no_filter.explanations["base_dev_metric"] is None
    assert make_scorer("igds", {**base, "reverse": True}).order == "bottom"
    assert make_scorer("igds", base).order == "top"
    no_recall = make_scorer("igds", {**base, "recall": False, "filtering": False})
    out = no_recall.score(pool, target=target, loaded=loaded, seed=3, progress=False)
    lat_t = manual_latents(loaded, sae, target.examples)
    active = set(np.flatnonzero((lat_t > 0).any(0)).tolist())
    assert len(out.explanations["candidates"]) == min(4, len(active))
    assert set(out.explanations["candidates"]) <= active
    weighted = make_scorer("igds", {**base, "weight": "delta", "keep": "top", "keep_top": 2})
    res = weighted.score(pool, target=target, loaded=loaded, progress=False)
    lat_p = manual_latents(loaded, sae, pool.examples)
    w = np.array([row["delta"] for row in res.explanations["features"]])
    np.testing.assert_allclose(res.scores, lat_p[:, res.explanations["kept"]] @ w, rtol=1e-3, atol=1e-6)


def test_igds_refuses_a_mismatched_sae(loaded, tmp_path):
    from mechsieve.features.sae import SaeError

    folder = str(write_sae(tmp_path / "small", random_sae(16, 20, layer=1)))
    with pytest.raises(SaeError, match="16.*32"):
        make_scorer("igds", {"sae": folder}).score(pool_of(QA, "pool"), target=pool_of(QA[:2], "t"), loaded=loaded,
                                                   progress=False)


def test_igds_trains_its_own_sae_when_none_is_given(loaded, tmp_path):
    settings = {"freq_threshold": 0.0, "top_k": 2, "dev_size": 2, "alphas": [2.0], "render": {"max_len": 64},
                "train": {"d_sae": 32, "k": 4, "batch_size": 16, "buffer_tokens": 64, "holdout": 0.2},
                "save_sae": str(tmp_path / "trained"), "preset": "paper"}
    res = Igds(settings).score(pool_of(QA, "pool"), target=pool_of(QA[:3], "t"), loaded=loaded, progress=False)
    assert res.explanations["sae"]["d_sae"] == 32 and res.explanations["layer"] == 1  # middle of 3 blocks
    assert "heldout_fvu" in res.explanations["sae_training"]
    assert (tmp_path / "trained" / "mechsieve_sae.safetensors").exists()
    again = Igds(settings).score(pool_of(QA, "pool"), target=pool_of(QA[:3], "t"), loaded=loaded, progress=False)
    assert again.explanations["sae_training"]["reused"] == str(tmp_path / "trained")
    np.testing.assert_allclose(again.scores, res.scores, rtol=1e-6, atol=1e-7)
    from mechsieve.store.artefacts import SettingsMismatch

    with pytest.raises(SettingsMismatch, match="train.k"):
        Igds({**settings, "train": {**settings["train"], "k": 3}}).score(
            pool_of(QA, "pool"), target=pool_of(QA[:3], "t"), loaded=loaded, progress=False)


def test_select_command_with_igds(model_dir, tmp_path, capsys):
    from mechsieve.cli import main

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = write_jsonl(tmp_path / "target.jsonl", rows[:3])
    folder = write_sae(tmp_path / "sae", random_sae(32, 48, layer=1))
    out = tmp_path / "sel"
    assert main(["select", "--method", "igds", "--model", str(model_dir), "--pool", str(pool), "--target", str(target),
                 "--budget", "0.5", "--out", str(out), "--quiet", "--set", f"scorer.sae={folder}",
                 "--set", "scorer.freq_threshold=0.3", "--set", "scorer.top_k=3", "--set", "scorer.dev_size=2",
                 "--set", "scorer.alphas=[2.0]", "--set", "scorer.preset=paper"]) == 0
    assert "igds: selected 3 of 6" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    table = summary["explanations"]["features"]
    assert table and {"feature", "freq", "mean_act", "delta", "best_alpha", "snippets"} <= set(table[0])


def test_select_command_reports_a_mismatched_sae_in_one_line(model_dir, tmp_path, capsys):
    from mechsieve.cli import main

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    folder = write_sae(tmp_path / "sae", random_sae(16, 20, layer=1))
    assert main(["select", "--method", "igds", "--model", str(model_dir), "--pool", str(pool), "--target", str(pool),
                 "--quiet", "--out", str(tmp_path / "o"), "--set", f"scorer.sae={folder}"]) == 2
    err = capsys.readouterr().err
    assert "d_in=16" in err and "hidden size is 32" in err and "Traceback" not in err
