"""IGDS recall and FRS (issue 18): the template-token mask of rendering, the template check against
a hand reference and a planted template latent, the pool reference, the FRS read positions and
length normalisation, and the `paper` / `robust` presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import IGDS_QA, igds_pool
from mechsieve.capture.batching import collate
from mechsieve.capture.forward import BatchContext
from mechsieve.config import ConfigError
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, render_example
from mechsieve.features.sae import SparseAutoencoder, random_sae, write_sae
from mechsieve.scorers import make_scorer
from mechsieve.scorers.common import pass_key
from mechsieve.scorers.igds import IgdsConfig, KeptLatents, frequency_recall
from mechsieve.scorers.igds_recall import (
    TopActivations,
    frs_scale,
    reference_sample,
    template_share,
)

pytestmark = pytest.mark.timeout(120)

QA = IGDS_QA
RENDER = RenderConfig(max_len=64)


pool_of = igds_pool


def content_text(tokenizer, r) -> str:
    return "".join(tokenizer.decode([int(t)]) for t, own in zip(r.input_ids, r.content_mask) if own)


def template_text(tokenizer, r) -> str:
    return "".join(tokenizer.decode([int(t)]) for t, own in zip(r.input_ids, r.content_mask) if not own)


# --- the template-token mask of rendering -------------------------------------------------------

def test_content_mask_marks_the_chat_templates_own_tokens(tokenizer):
    ex = Example("a", "s", [{"role": "user", "content": "Natalia sold clips"}], "The answer is 42", {})
    r = render_example(ex, tokenizer, RENDER)
    assert content_text(tokenizer, r) == "Natalia sold clipsThe answer is 42"
    # role headers, the newline after each role and after each turn, the special tokens
    assert template_text(tokenizer, r) == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    last_prompt = r.prompt_len - 1
    assert tokenizer.decode([int(r.input_ids[last_prompt])]) == "\n" and not r.content_mask[last_prompt]
    # the response mask holds the end-of-turn marker (to learn to stop), the content mask does not
    assert r.response_mask[~r.content_mask].sum() == 2


def test_content_mask_of_an_automatic_system_prompt_and_a_repeated_text(tokenizer):
    """A template that adds a system prompt: its text is the template's, even where the user's
    message repeats it (each message is looked for inside its own turn)."""
    auto = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
            "{% endif %}") + tokenizer.chat_template
    old = tokenizer.chat_template
    tokenizer.chat_template = auto
    try:
        ex = Example("a", "s", [{"role": "user", "content": "You are a helpful assistant."}], "Yes", {})
        r = render_example(ex, tokenizer, RENDER)
        gen = render_example(ex, tokenizer, RENDER, add_generation_prompt=True)
    finally:
        tokenizer.chat_template = old
    assert content_text(tokenizer, r) == "You are a helpful assistant.Yes"
    assert template_text(tokenizer, r).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    first_own = int(np.flatnonzero(r.content_mask)[0])
    assert tokenizer.decode(r.input_ids[:first_own]).endswith("<|im_start|>user\n")
    assert content_text(tokenizer, gen) == "You are a helpful assistant."


def test_content_mask_of_the_plain_and_no_template(plain_tokenizer):
    ex = Example("a", "s", [{"role": "user", "content": "Name a colour."}], "Red.", {})
    plain = render_example(ex, plain_tokenizer, RENDER)
    assert content_text(plain_tokenizer, plain) == "Name a colour.Red."
    assert template_text(plain_tokenizer, plain) == "<s>User: \n\nAssistant: </s>"  # BOS / EOS are template
    raw = render_example(ex, plain_tokenizer, RenderConfig(max_len=64, template="none"))
    assert raw.content_mask[1:-1].all() and not raw.content_mask[0] and not raw.content_mask[-1]


# --- the template check: pure math ----------------------------------------------------------------

def test_template_share_against_hand_counts():
    acts = np.array([[3.0, 0.0, 0.0, 0.0],
                     [2.0, 1.0, 0.0, 0.0],
                     [1.0, 5.0, 0.0, 0.0],
                     [0.5, 4.0, 7.0, 0.0]])
    on_template = np.array([True, True, False, False])
    # top 2: latent 0 rows 0, 1 (both template); latent 1 rows 2, 3 (neither); latent 2 fires once
    # (row 3, content); latent 3 never fires
    np.testing.assert_allclose(template_share(acts, on_template, 2), [1.0, 0.0, 0.0, 0.0])
    # top 3: latent 0 rows 0, 1, 2 -> 2/3; latent 1 rows 2, 3, 1 -> 1/3
    np.testing.assert_allclose(template_share(acts, on_template, 3), [2 / 3, 1 / 3, 0.0, 0.0])


def test_streaming_top_activations_equal_the_reference():
    g = np.random.default_rng(0)
    acts = np.maximum(g.normal(size=(200, 7)), 0.0)  # ReLU-like: many exact zeros
    acts[:, 6] = 0.0
    acts[5, 6] = 1.0  # fires once
    flags = g.random(200) < 0.3
    top = TopActivations(7, 16)
    for lo in range(0, 200, 37):  # uneven batches
        top.update(torch.from_numpy(acts[lo:lo + 37]).float(), torch.from_numpy(flags[lo:lo + 37]))
    np.testing.assert_allclose(top.share(), template_share(acts.astype(np.float32), flags, 16), atol=1e-12)
    assert top.tokens == 200
    assert top.share()[6] == float(flags[5])


def test_frequency_recall_with_a_pool_reference_and_the_template_check():
    acts = np.array([[1.0, 0.0, 2.0, 0.5, 0.0, 3.0],
                     [1.0, 0.0, 0.0, 0.5, 0.0, 3.0],
                     [1.0, 4.0, 2.0, 0.5, 0.0, 3.0],
                     [1.0, 0.0, 2.0, 0.0, 0.0, 3.0],
                     [1.0, 0.0, 2.0, 0.5, 0.1, 0.0]])
    counts, sums = (acts > 0).sum(0), acts.sum(0)
    # probe freq 1, .2, .8, .8, .2, .8; by mean: 5 (2.4), 2 (1.6), 0 (1), 3 (.4) pass freq > .6
    pool = np.array([10, 0, 3, 4, 0, 1])  # of 10 pool examples: freq 1, 0, .3, .4, 0, .1
    rec = frequency_recall(counts, sums, 5, 0.6, 0.0, 10, pool, 10, contrast_ratio=2.0)
    np.testing.assert_allclose(rec.contrast_freq, [1, 0, .3, .4, 0, .1])
    # latent 0 (always on: 1 < 2 x 1) drops; 3 stays at the bound (.8 >= 2 x .4)
    assert rec.features.tolist() == [5, 2, 3]
    assert rec.funnel == {"frequency": 4, "contrast": 3}
    share = np.array([0.0, 0.0, 0.9, 0.5, 0.0, 0.7])
    rec = frequency_recall(counts, sums, 5, 0.6, 0.0, 10, pool, 10, 2.0, share, 0.5)
    assert rec.features.tolist() == [3]  # 5 (.7) and 2 (.9) sit on the template; .5 is not above .5
    assert rec.template_dropped.tolist() == [5, 2]
    assert rec.funnel == {"frequency": 4, "contrast": 3, "template": 1}
    # without a reference, top 2: the template check makes room for the next ones
    rec = frequency_recall(counts, sums, 5, 0.6, 0.0, 2, template_share=share, template_threshold=0.5)
    assert rec.features.tolist() == [0, 3] and rec.template_dropped.tolist() == [5, 2]
    rec = frequency_recall(counts, sums, 5, 0.6, 0.0, 2, template_share=share, template_threshold=0.95)
    assert rec.features.tolist() == [5, 2] and rec.template_dropped.tolist() == []


def test_reference_sample_is_seeded_and_sorted():
    got = reference_sample(10, 4, seed=3)
    assert got.tolist() == sorted(np.random.default_rng(3).choice(10, 4, replace=False).tolist())
    assert len(set(got.tolist())) == 4 and got.tolist() == reference_sample(10, 4, seed=3).tolist()
    assert reference_sample(10, 0, 3).tolist() == list(range(10)) == reference_sample(10, 12, 3).tolist()


# --- the template check in the scorer: a planted template latent --------------------------------

def token_table(loaded, examples):
    """Hidden states of block 1 (`hidden_states[2]`, no mechsieve hooks), template flags and ids of
    every token of `examples`, and the rendered examples."""
    hs, flags, ids, rendered = [], [], [], []
    for ex in examples:
        r = render_example(ex, loaded.tokenizer, RENDER)
        with torch.no_grad():
            out = loaded.model(input_ids=torch.as_tensor(r.input_ids)[None], output_hidden_states=True)
        hs.append(out.hidden_states[2][0])
        flags.append(~r.content_mask)
        ids.append(r.input_ids)
        rendered.append(r)
    return torch.cat(hs), np.concatenate(flags), np.concatenate(ids), rendered


def planted_sae(loaded, examples) -> SparseAutoencoder:
    """Latent 0 fires only on template tokens (its direction: the mean state at `<|im_end|>`, its
    bias above every content token); latent 1 only on content tokens; 2..5 random, no bias."""
    h, flags, ids, _ = token_table(loaded, examples)
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    base = random_sae(32, 6, layer=1, seed=4)
    w = base.W_enc.clone()
    b = torch.zeros(6)
    u = h[torch.from_numpy(ids == end)].mean(0)
    w[:, 0] = u / u.norm()
    b[0] = -(h[torch.from_numpy(~flags)] @ w[:, 0]).max() - 1e-3
    v = h[torch.from_numpy(~flags)].mean(0) - h[torch.from_numpy(flags)].mean(0)
    w[:, 1] = v / v.norm()
    b[1] = -(h[torch.from_numpy(flags)] @ w[:, 1]).max() - 1e-3
    return SparseAutoencoder(w, b, base.W_dec, base.b_dec, "relu", 0, None, 1, True, "planted")


def test_a_latent_planted_on_template_tokens_is_dropped(loaded, tmp_path):
    target, pool = pool_of(QA[:3] + QA[5:], "target"), pool_of(QA, "pool")
    sae = planted_sae(loaded, target.examples + pool.examples)
    settings = {"sae": str(write_sae(tmp_path / "sae", sae)), "reference": "none", "filtering": False,
                "freq_threshold": 0.0, "top_k": 10, "template_top": 16, "reference_size": 0, "render": {"max_len": 64}}
    res = make_scorer("igds", settings).score(pool, target=target, loaded=loaded, progress=False)
    # the hand reference: every token of the probe set, then of the (whole) pool sample
    h, flags, _, rendered = token_table(loaded, target.examples + pool.examples)
    with torch.no_grad():
        acts = sae.encode(h).numpy()
    share = template_share(acts, flags, 16)
    assert share[0] == 1.0 and share[1] == 0.0 and (acts[:, 0] > 0).sum() >= 4
    # recall at the robust position (mean over all tokens) over the probe set
    n_t = len(target)
    counts, sums, start = np.zeros(6), np.zeros(6), 0
    for r in rendered[:n_t]:
        a = acts[start:start + len(r)].mean(0)
        counts, sums, start = counts + (a > 0), sums + a, start + len(r)
    assert counts[0] == n_t  # the template latent fires in every example (on its end-of-turn markers)
    want = frequency_recall(counts, sums, n_t, 0.0, 0.0, 10, template_share=share, template_threshold=0.5)
    ex = res.explanations
    assert ex["candidates"] == want.features.tolist() == ex["kept"] and 0 not in ex["kept"] and 1 in ex["kept"]
    dropped = ex["recall"]["template"]["dropped"]
    assert [d["feature"] for d in dropped] == want.template_dropped.tolist()
    by_feature = {d["feature"]: d["template_share"] for d in dropped}
    assert by_feature[0] == 1.0 and all(v == pytest.approx(share[j], abs=1e-4) and v > 0.5 for j, v in by_feature.items())
    for row in ex["features"]:
        assert row["template_share"] == pytest.approx(share[row["feature"]], abs=1e-4)
        assert row["template_share"] <= 0.5
    assert ex["recall"]["template"]["tokens"] == len(h) and ex["recall"]["reference"] == "none"
    # the paper's recipe (no template check) keeps it
    paper = make_scorer("igds", {**settings, "preset": "paper", "position": "mean_all"})
    assert 0 in paper.score(pool, target=target, loaded=loaded, progress=False).explanations["candidates"]


def test_the_pool_reference_by_default(loaded, tmp_path):
    """robust: recall contrasts against a seeded pool sample; the candidates are those of a manual
    recall (probe and reference firing rates at the recall position computed here by hand)."""
    target, pool = pool_of(QA[:3], "target"), pool_of(QA * 2, "pool")
    sae = random_sae(32, 48, layer=1, activation="relu", seed=0)
    sae.b_enc = sae.b_enc - 0.04  # sparser: latents fire on some examples, not all
    settings = {"sae": str(write_sae(tmp_path / "sae", sae)), "filtering": False, "template_filter": False,
                "freq_threshold": 0.0, "top_k": 48, "contrast_ratio": 1.0, "reference_size": 5,
                "render": {"max_len": 64}}
    res = make_scorer("igds", settings).score(pool, target=target, loaded=loaded, seed=7, progress=False)

    def stats(examples):
        h, _, _, rendered = token_table(loaded, examples)
        with torch.no_grad():
            acts = sae.encode(h).numpy()
        counts, sums, start = np.zeros(48), np.zeros(48), 0
        for r in rendered:
            a = acts[start:start + len(r)].mean(0)  # robust: the mean over all tokens
            counts, sums, start = counts + (a > 0), sums + a, start + len(r)
        return counts, sums

    sample = [pool.examples[i] for i in reference_sample(len(pool), 5, 7)]
    ref, _ = stats(sample)
    counts, sums = stats(target.examples)
    want = frequency_recall(counts, sums, 3, 0.0, 0.0, 48, ref, 5, 1.0)
    ex = res.explanations
    assert ex["recall"]["reference"] == "pool" and ex["recall"]["reference_examples"] == 5
    assert ex["candidates"] == want.features.tolist()
    assert ex["recall"]["funnel"] == want.funnel and want.funnel["contrast"] < want.funnel["frequency"]
    cf = [row["contrast_freq"] for row in ex["features"]]
    assert cf == pytest.approx([ref[row["feature"]] / 5 for row in ex["features"]], abs=1e-4)
    assert any(0 < c < 1 for c in cf)
    # a pool of the probe set itself leaves nothing at ratio 2, and the error says what to set
    with pytest.raises(Exception, match="reference=none"):
        make_scorer("igds", {**settings, "contrast_ratio": 2.0, "reference_size": 0}).score(
            pool_of(QA[:3], "pool"), target=target, loaded=loaded, progress=False)


# --- FRS read positions and length normalisation --------------------------------------------------

def test_frs_scale_against_hand_counts(tokenizer):
    rows = [render_example(Example("a", "s", [{"role": "user", "content": q}], a, {}), tokenizer, RENDER)
            for q, a in QA[:2]]
    batch = collate(rows, 3)
    n_resp = [int(r.response_mask.sum()) for r in rows]
    n_prompt = [r.prompt_len for r in rows]
    n_all = [len(r) for r in rows]
    np.testing.assert_allclose(frs_scale(batch, "mean_response", "none"), n_resp)
    np.testing.assert_allclose(frs_scale(batch, "mean_prompt", "sqrt"), np.sqrt(n_prompt))
    np.testing.assert_allclose(frs_scale(batch, "mean_all", "none"), n_all)
    np.testing.assert_allclose(frs_scale(batch, "mean_all", "length"), [1, 1])
    np.testing.assert_allclose(frs_scale(batch, "last_prompt", "none"), [1, 1])


@pytest.mark.parametrize("position,norm", [("mean_response", "length"), ("mean_response", "none"),
                                           ("mean_all", "sqrt"), ("mean_prompt", "none"), ("last_prompt", "sqrt")])
def test_kept_latents_at_each_position_and_norm_against_a_manual_sum(tokenizer, position, norm):
    sae = random_sae(32, 12, layer=1, seed=2)
    rows = [render_example(Example("a", "s", [{"role": "user", "content": q}], a, {}), tokenizer, RENDER)
            for q, a in QA[:3]]
    batch = collate(rows, 3, "left")  # left padding: positions are relative to the first real token
    acts = torch.randn(3, batch.input_ids.shape[1], 32, generator=torch.Generator().manual_seed(0))
    kept = np.array([4, 0, 9])
    feat = KeptLatents(pass_key(IgdsConfig()), sae, kept, position, norm)
    feat.begin(3)
    feat.on_layer(BatchContext([0, 1, 2], batch), 1, acts)
    for i, r in enumerate(rows):
        start = int(batch.offsets[i])
        a = sae.encode(acts[i, start:start + len(r)]).numpy()[:, kept]  # [t, kept]
        tokens = {"last_prompt": np.arange(len(r)) == r.prompt_len - 1, "mean_all": np.ones(len(r), bool),
                  "mean_prompt": np.arange(len(r)) < r.prompt_len, "mean_response": r.response_mask}[position]
        n = tokens.sum()
        want = a[tokens].sum(0) / {"length": n, "sqrt": math.sqrt(n), "none": 1.0}[norm if position != "last_prompt"
                                                                                     else "length"]
        np.testing.assert_allclose(feat.vals[i], want, rtol=1e-5, atol=1e-6)
        masked = np.where(tokens[:, None], a, -1.0)
        np.testing.assert_array_equal(feat.where[i], masked.argmax(0))  # the snippet's token is inside T
    other = KeptLatents(pass_key(IgdsConfig()), sae, kept, position, "sqrt" if norm != "sqrt" else "none")
    assert other.full_key() != feat.full_key()  # the norm is part of the cache key


def test_score_position_and_frs_norm_through_the_scorer(loaded, tmp_path):
    """Given latents, FRS is the manual sum over response (all) tokens divided as frs_norm says."""
    sae = random_sae(32, 48, layer=1, activation="relu", seed=0)
    target, pool = pool_of(QA[:3], "target"), pool_of(QA, "pool")
    kept = [3, 17, 40]
    h, _, _, rendered = token_table(loaded, pool.examples)
    with torch.no_grad():
        acts = sae.encode(h).numpy()[:, kept]
    for score_position, norm, div in [("mean_response", "length", lambda n: n), ("mean_all", "sqrt", math.sqrt),
                                      ("mean_response", "none", lambda n: 1.0)]:
        res = make_scorer("igds", {"sae": str(write_sae(tmp_path / "sae", sae)), "latents": kept,
                                   "preset": "paper", "score_position": score_position, "frs_norm": norm,
                                   "render": {"max_len": 64}}).score(pool, target=target, loaded=loaded,
                                                                     progress=False)
        want, start = [], 0
        for r in rendered:
            a = acts[start:start + len(r)]
            tokens = r.response_mask if score_position == "mean_response" else np.ones(len(r), bool)
            want.append(a[tokens].sum() / div(int(tokens.sum())))
            start += len(r)
        np.testing.assert_allclose(res.scores, want, rtol=1e-4, atol=1e-6, err_msg=f"{score_position}/{norm}")
        assert res.explanations["score_position"] == score_position and res.explanations["frs_norm"] == norm


# --- presets ---------------------------------------------------------------------------------------

def test_presets_fill_the_unset_fields_and_explicit_settings_win():
    robust, paper = IgdsConfig(), IgdsConfig(preset="paper")
    assert (robust.preset, robust.position, robust.reference, robust.template_filter) == (
        "robust", "mean_all", "pool", True)
    assert (paper.position, paper.reference, paper.template_filter, paper.frs_norm, paper.score_position) == (
        "last_prompt", "none", False, "length", "same")
    mixed = IgdsConfig(preset="paper", position="mean_all", template_filter=True)
    assert (mixed.position, mixed.template_filter, mixed.reference) == ("mean_all", True, "none")
    with pytest.raises(ConfigError, match=r"igds.preset.*robust"):
        IgdsConfig(preset="papers")
    with pytest.raises(ConfigError, match=r"igds.position.*mean_response"):
        IgdsConfig(position="first")
    with pytest.raises(ConfigError, match=r"igds.frs_norm"):
        IgdsConfig(frs_norm="log")
    with pytest.raises(ConfigError, match=r"igds.score_position"):
        IgdsConfig(score_position="middle")
    with pytest.raises(ConfigError, match=r"igds.template_threshold"):
        IgdsConfig(template_threshold=1.5)
