"""XTF token masking: hand-computed RI / KN / TR values, caps, union and overlaps, the written
dataset, and the published-code fault (RI identical for every token) kept out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechsieve.config import ConfigError
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, render_pool
from mechsieve.tokens.attributes import (
    above_threshold,
    cap_count,
    in_clusters,
    iqr_low_outliers,
    received_attention,
    token_probabilities,
)
from mechsieve.tokens.base import KN, RI, TR, TokenMasks, TokenScores
from mechsieve.tokens.otsu import multi_otsu
from mechsieve.tokens.summary import marked_response, mask_counts
from mechsieve.tokens.xtf import Xtf, XtfConfig, context_free_embeddings, word_token_ids

HEAD0 = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]]
HEAD1 = [[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.4, 0.4, 0.2, 0], [0.4, 0.3, 0.2, 0.1]]


def _examples(n: int = 6) -> list[Example]:
    base = [("Natalia sold clips to 48 of her friends in April.", "She sold 48 / 2 = 24 clips in May. #### 72"),
            ("How many clips did Natalia sell?", "Once upon a time there was a little dog. The answer is 12 + 30 = 42."),
            ("Write a function to find the similar elements.", "def similar_elements(a, b):\n    return a"),
            ("The patient presents with fever and cough.", "The most likely diagnosis is a red ball in the park."),
            ("Answer the question step by step.", "12 + 30 = 42. #### 42"),
            ("Natalia sold half as many clips in May.", "How many clips did Natalia sell altogether? 72")]
    return [Example(id=f"e{i}", source="t", prompt=[{"role": "user", "content": p}], response=r, meta={})
            for i, (p, r) in enumerate((base * 2)[:n])]


def test_received_attention_hand_values():
    probs = torch.tensor([HEAD0, HEAD1], dtype=torch.float32)[None].repeat(2, 1, 1, 1)  # [2, 2, 4, 4]
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    total, n_later = received_attention(probs, valid)
    # head mean rows: q1 [.7 .3], q2 [.3 .35 .35], q3 [.25 .25 .25 .25]
    ri = total / n_later.clamp_min(1)
    assert n_later.tolist() == [[3, 2, 1, 0], [2, 1, 0, 0]]
    np.testing.assert_allclose(ri[0, :3].numpy(), [1.25 / 3, 0.6 / 2, 0.25], atol=1e-6)
    np.testing.assert_allclose(ri[1, :2].numpy(), [1.0 / 2, 0.35], atol=1e-6)  # padded query 3 ignored
    # The published code's statistic (row mean of the softmax) is 1/t for every token.
    row_mean = probs[0].mean(0).mean(-1)
    np.testing.assert_allclose(row_mean.numpy(), [0.25] * 4, atol=1e-7)


def test_ri_varies_and_matches_unbatched_reference(make_model, tokenizer):
    model = make_model("llama")
    rendered, _ = render_pool(_examples(5), tokenizer, RenderConfig(max_len=128))
    xtf = Xtf(XtfConfig(preset="paper", attributes=["ri"], max_tokens=90))  # forces several padded batches
    scores = xtf.score(model, tokenizer, rendered, progress=False)
    model.set_attn_implementation("eager")
    try:
        for r, ri in zip(rendered, scores.scores["ri"]):
            with torch.no_grad():
                att = model(torch.as_tensor(r.input_ids)[None], output_attentions=True).attentions
            t = len(r)
            per_layer = [a[0].mean(0) for a in att]  # [t, t]
            ref = np.full(t, np.nan)
            for j in range(t - 1):
                ref[j] = np.mean([float(m[j + 1:, j].mean()) for m in per_layer])
            np.testing.assert_allclose(ri, ref, rtol=1e-4, atol=1e-6)
            finite = ri[np.isfinite(ri)]
            assert finite.std() > 1e-3 and len(np.unique(finite.round(6))) > t // 2  # not one value for all
    finally:
        model.set_attn_implementation("sdpa")


def test_kn_matches_hand_probabilities(make_model, tokenizer):
    model = make_model("llama")
    rendered, _ = render_pool(_examples(4), tokenizer, RenderConfig(max_len=48))
    scores = Xtf(XtfConfig(preset="paper", attributes=["kn"], max_tokens=100)).score(model, tokenizer, rendered, progress=False)
    for r, kn in zip(rendered[:2], scores.scores["kn"][:2]):  # the two longest share a padded batch
        assert np.isnan(kn[0]) and np.isfinite(kn[1:]).all()
        for j in range(1, len(r), 6):
            with torch.no_grad():
                logits = model(torch.as_tensor(r.input_ids[:j])[None]).logits[0, -1]
            p = torch.softmax(logits.double(), -1)[int(r.input_ids[j])].item()
            assert abs(kn[j] - p) < 1e-5


def test_token_probabilities_padding_is_nan():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2]])
    p = token_probabilities(logits, ids, torch.tensor([[True, True, False]]))
    assert np.isnan(p[0, 0]) and np.isnan(p[0, 2])
    assert p[0, 1].item() == pytest.approx(0.25)


def test_tr_embeddings_and_cosine_by_hand(make_model, tokenizer):
    model = make_model("llama")
    ids = [10, 57, 200]
    emb = context_free_embeddings(model, ids, batch=2)
    for k, t in enumerate(ids):
        with torch.no_grad():
            h = model(torch.tensor([[t]]), output_hidden_states=True).hidden_states[-1][0, 0]
        torch.testing.assert_close(emb[k], h, rtol=1e-5, atol=1e-5)
    words = ["clips", "sold"]
    rendered, _ = render_pool(_examples(3), tokenizer, RenderConfig(max_len=64))
    scores = Xtf(XtfConfig(preset="paper", attributes=["tr"]), words=words).score(model, tokenizer, rendered, progress=False)
    word_vecs = [context_free_embeddings(model, word_token_ids(tokenizer, w)).mean(0) for w in words]
    domain = torch.stack(word_vecs).mean(0)
    r, tr = rendered[0], scores.scores["tr"][0]
    pos = int(np.flatnonzero(scores.eligible[0])[2])
    tok = context_free_embeddings(model, [int(r.input_ids[pos])])[0]
    assert tr[pos] == pytest.approx(float(torch.nn.functional.cosine_similarity(tok, domain, dim=0)), abs=1e-5)
    assert np.isnan(tr[0])  # prompt tokens are not scored


@pytest.mark.parametrize("classes,nbins", [(2, 256), (3, 256), (4, 256), (5, 48)])
def test_multi_otsu_matches_scikit_image(classes, nbins):
    skimage_filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(classes)
    for _ in range(3):
        x = np.concatenate([rng.normal(0, 1, 400), rng.normal(3, 0.5, 250), rng.normal(-2.5, 0.3, 150)])
        ours = multi_otsu(x, classes, nbins=nbins)
        theirs = skimage_filters.threshold_multiotsu(x, classes=classes, nbins=nbins)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


def test_rules_and_caps_by_hand():
    elig = np.ones(20, dtype=bool)
    s = np.arange(20, dtype=float)
    s[[3, 7]] = [-50.0, -40.0]  # two low outliers; Q1 - 1.5 IQR is far below the rest
    assert np.flatnonzero(iqr_low_outliers(s, elig, 1.5, 0.10)).tolist() == [3, 7]
    assert np.flatnonzero(iqr_low_outliers(s, elig, 1.5, 0.05)).tolist() == [3]  # cap 1: the lowest
    p = np.linspace(0.5, 0.99, 20)
    assert above_threshold(p, elig, 0.95, 1.0).sum() == int((p > 0.95).sum()) == 2
    assert np.flatnonzero(above_threshold(p, elig, 0.95, 0.05)).tolist() == [19]  # the most probable
    assert cap_count(19, 0.1) == 1 and cap_count(20, 0.1) == 2
    thresholds = np.array([5.0, 10.0])
    assert np.flatnonzero(in_clusters(s, elig, thresholds, [1], 1.0)).tolist() == [5, 6, 8, 9]  # 7 is -40
    assert np.flatnonzero(in_clusters(s, elig, thresholds, [1], 0.1)).tolist() == [5, 6]
    assert np.flatnonzero(in_clusters(s, ~elig, thresholds, [0, 1], 1.0)).tolist() == []


def test_decide_caps_hold_for_every_example():
    rng = np.random.default_rng(0)
    eligible, ri, kn, tr = [], [], [], []
    for _ in range(12):
        t = int(rng.integers(20, 60))
        e = np.zeros(t, dtype=bool)
        e[5:] = True
        eligible.append(e)
        ri.append(rng.standard_cauchy(t).astype(np.float32))
        kn.append(rng.beta(5, 0.3, t).astype(np.float32))  # most above 0.95
        tr.append(rng.normal(0, 1, t).astype(np.float32))
    cfg = XtfConfig(preset="paper", p_ri=0.05, p_kn=0.1, p_tr=0.1, tr_classes=3)
    masks = Xtf(cfg, words=["x"]).decide(TokenScores({"ri": ri, "kn": kn, "tr": tr}, eligible))
    assert len(masks.info["tr_thresholds"]) == 2
    for e, m, reason in zip(eligible, masks.masks, masks.reasons):
        n = int(e.sum())
        assert not (m & ~e).any()
        assert ((reason & RI) > 0).sum() <= cap_count(n, 0.05)
        assert ((reason & KN) > 0).sum() == cap_count(n, 0.1)  # enough candidates: cap is reached
        assert ((reason & TR) > 0).sum() <= cap_count(n, 0.1)
        np.testing.assert_array_equal(m, reason > 0)


def test_union_and_overlap_counts():
    eligible = [np.array([0, 1, 1, 1, 1, 1], bool), np.array([0, 0, 1, 1, 1], bool)]
    reasons = [np.array([0, RI, RI | KN, KN | TR, RI | KN | TR, 0], np.uint8),
               np.array([0, 0, TR, RI | TR, 0], np.uint8)]
    scores = TokenScores({"ri": [np.zeros(6), np.zeros(5)], "kn": [np.zeros(6), np.zeros(5)],
                          "tr": [np.zeros(6), np.zeros(5)]}, eligible)
    counts = mask_counts(scores, TokenMasks([r > 0 for r in reasons], reasons))
    assert counts["eligible_tokens"] == 8
    assert counts["masked_tokens"] == {"ri": 4, "kn": 3, "tr": 4, "union": 6}
    assert counts["masked_share"]["union"] == pytest.approx(6 / 8)
    assert counts["overlaps"]["ri&kn"]["tokens"] == 2
    assert counts["overlaps"]["ri&tr"]["tokens"] == 2
    assert counts["overlaps"]["kn&tr"]["tokens"] == 2
    assert counts["overlaps"]["ri&kn"]["jaccard"] == pytest.approx(2 / 5)
    assert counts["all_attributes"] == 1


def test_mask_tokens_command_labels_line_up_after_collation(model_dir, tmp_path, tokenizer):
    from mechsieve.cli import main
    from mechsieve.train import collate_items, load_tokenized

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": ex.prompt[0]["content"], "answer": ex.response}) + "\n"
                            for ex in _examples(8)))
    out = tmp_path / "masked"
    code = main(["mask-tokens", "--pool", str(pool), "--model", str(model_dir), "--domain", "math",
                 "--out", str(out), "--quiet", "--preset", "paper", "--set", "xtf.p_kn=0.5",
                 "--set", "xtf.tr_classes=3"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masked_tokens"]["union"] > 0 and len(summary["most_masked"]) == 5
    import datasets

    ds = datasets.load_from_disk(str(out))
    items = load_tokenized(out)
    rendered, _ = render_pool(_examples(8), tokenizer, RenderConfig())
    batch = collate_items(items, list(range(len(items))), pad_id=tokenizer.pad_token_id)
    n_masked = 0
    for row, (r, reason, cmask) in enumerate(zip(rendered, ds["mask_reason"], ds["completion_mask"])):
        t = len(r)
        reason = np.asarray(reason)
        np.testing.assert_array_equal(batch.input_ids[row, :t].numpy(), r.input_ids)
        want = np.where(r.response_mask & (reason == 0), r.input_ids, -100)
        np.testing.assert_array_equal(batch.labels[row, :t].numpy(), want)
        np.testing.assert_array_equal(np.asarray(cmask), (want != -100).astype(int))
        assert (batch.labels[row, t:] == -100).all()
        n_masked += int((r.response_mask & (reason > 0)).sum())
    assert n_masked == summary["masked_tokens"]["union"]
    # `mechsieve train --data DIR` trains on it as it is: label tokens = unmasked response tokens.
    assert main(["train", "--data", str(out), "--model", str(model_dir), "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "adapter")]) == 0
    log = json.loads((tmp_path / "adapter" / "train.json").read_text())
    assert log["tokens"] == sum(it.n_targets for it in items)


def test_marked_response_shows_reasons(tokenizer):
    rendered, _ = render_pool(_examples(1), tokenizer, RenderConfig())
    r = rendered[0]
    reasons = np.zeros(len(r), np.uint8)
    pos = int(np.flatnonzero(r.response_mask)[1])
    reasons[pos] = RI | TR
    text = marked_response(tokenizer, r, reasons)
    assert f"[[{tokenizer.decode([int(r.input_ids[pos])])}]]^RT" in text
    assert text.count("[[") == 1


# --- the robust preset ---------------------------------------------------------------------------

def test_relative_received_attention_by_hand():
    """Uniform baseline over the keys a query could see, the sink (first token) and the diagonal
    excluded; left padding gives the same values one column on."""
    from mechsieve.tokens.robust import relative_received_attention

    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 0, 0] = 1.0
    a[0, 0, 1, :2] = torch.tensor([0.9, 0.1])
    a[0, 0, 2, :3] = torch.tensor([0.6, 0.3, 0.1])
    a[0, 0, 3, :] = torch.tensor([0.5, 0.3, 0.1, 0.1])
    total, n = relative_received_attention(a, torch.ones(1, 4, dtype=torch.bool), torch.tensor([0]))
    # query 2 sees key 1 only: rel = 1; query 3 sees keys 1, 2: rel = 0.3 * 2 / 0.4 = 1.5 and 0.5
    np.testing.assert_allclose(total[0].numpy(), [0.0, 1.0 + 1.5, 0.5, 0.0], atol=1e-6)
    assert n[0].tolist() == [0, 2, 1, 0]
    padded = torch.zeros(1, 1, 5, 5)
    padded[0, 0, 1:, 1:] = a[0, 0]
    valid = torch.tensor([[False, True, True, True, True]])
    total2, n2 = relative_received_attention(padded, valid, torch.tensor([1]))
    np.testing.assert_allclose(total2[0, 1:].numpy(), total[0].numpy(), atol=1e-6)
    assert n2[0, 1:].tolist() == n[0].tolist() and n2[0, 0] == 0


def test_spans_numbers_and_the_pool_rules_by_hand():
    from mechsieve.tokens.robust import (
        below_cut,
        centred_cosine,
        example_percentile,
        low_cut,
        numeric_tokens,
        smooth_over_spans,
        span_ids,
    )

    pieces = ["Tom", " has", " 3", ".", " He", " is", " happy", "!\n", "12", "+", " 4.5", " apples"]
    spans = span_ids(pieces)
    assert spans.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert span_ids([" 4", ".", "5", " kg", ".", " Then"]).tolist() == [0, 0, 0, 0, 0, 1]  # a decimal point
    assert numeric_tokens(pieces).tolist() == [False, False, True, False, False, False, False, False,
                                               True, True, True, False]
    scores = np.arange(12, dtype=np.float32)
    scores[2] = np.nan
    elig = np.ones(12, dtype=bool)
    elig[0] = False
    smooth = smooth_over_spans(scores, elig, spans)
    assert smooth[0] == 0 and np.isnan(smooth[2])  # not eligible / not scored: unchanged
    np.testing.assert_allclose(smooth[[1, 3]], [2.0, 2.0])  # mean of 1 and 3
    np.testing.assert_allclose(smooth[4:8], 5.5)
    # mad: median 3, MAD 1 -> cut 3 - 3 * 1.4826; no spread -> no cut
    assert low_cut(np.array([1.0, 2, 3, 4, 5]), "mad", 3.0, 0.05) == pytest.approx(3 - 3 * 1.4826)
    assert np.isnan(low_cut(np.array([1.0, 1, 1, 1, 9]), "mad", 3.0, 0.05))
    assert low_cut(np.arange(101.0), "share", 3.0, 0.05) == pytest.approx(5.0)
    s = np.array([0.0, 5, 5, -9, -8, 5, 5, 5, 5, 5])
    e = np.ones(10, dtype=bool)
    assert np.flatnonzero(below_cut(s, e, -1.0, 1.0, inclusive=False)).tolist() == [3, 4]
    assert np.flatnonzero(below_cut(s, e, -1.0, 0.1, inclusive=False)).tolist() == [3]  # cap 1: the lowest
    assert not below_cut(s, e, float("nan"), 1.0, inclusive=False).any()
    assert np.flatnonzero(example_percentile(s, e, 0.2, 1.0)).tolist() == [3, 4]
    v = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    d, c = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    manual = [float(torch.nn.functional.cosine_similarity(x - c, d - c, dim=0)) for x in v]
    np.testing.assert_allclose(centred_cosine(v, d, c).numpy(), manual, atol=1e-6)


def test_presets_fill_only_what_was_left_unset():
    paper, robust = XtfConfig(preset="paper"), XtfConfig()
    assert (paper.attributes, paper.ri_layers, paper.rule, paper.p_tr) == (["ri", "kn", "tr"], "all", "paper", 0.10)
    assert (robust.attributes, robust.ri_layers, robust.ri_baseline, robust.rule, robust.smooth_spans) == \
        (["ri", "tr"], "middle", "uniform", "mixture", True)
    assert XtfConfig(preset="paper", rule="mad").rule == "mad"
    with pytest.raises(ConfigError, match="xtf.preset"):
        XtfConfig(preset="papr")
    with pytest.raises(ConfigError, match="xtf.rule"):
        XtfConfig(rule="fence")
    with pytest.raises(ConfigError, match="contextual reads the domain from an in-domain set"):
        Xtf(XtfConfig(tr_embedding="contextual"))


def test_robust_scores_on_a_tiny_model(make_model, tokenizer):
    """Contextual TR against a hand computation; numbers never TR noise; spans share a score."""
    from mechsieve.models.hooks import hook_points
    from mechsieve.tokens.robust import numeric_tokens, span_ids

    model = make_model("llama")
    examples = _examples(6)
    rendered, _ = render_pool(examples[:4], tokenizer, RenderConfig(max_len=96))
    cfg = XtfConfig(tr_layer=1, tr_top_k=2, smooth_spans=False, max_tokens=120)
    xtf = Xtf(cfg, target=examples[4:], render_cfg=RenderConfig(max_len=96))
    scores = xtf.score(model, tokenizer, rendered, progress=False)
    assert scores.info["tr"]["embedding"] == "contextual"
    # the in-domain token states at block 1, centred on their mean
    target_r, _ = render_pool(examples[4:], tokenizer, RenderConfig(max_len=96))
    elig_t = [r.response_mask & ~np.isin(r.input_ids, tokenizer.all_special_ids) for r in target_r]
    states = []
    for r, e in zip(target_r, elig_t):
        with torch.no_grad():
            hs = model(torch.as_tensor(r.input_ids)[None], output_hidden_states=True).hidden_states[2][0]
        states.append(hs[torch.from_numpy(e)])
    states = torch.cat(states)
    centre = states.mean(0)
    unit = torch.nn.functional.normalize(states - centre, dim=-1)
    r, tr = rendered[0], scores.scores["tr"][0]
    with torch.no_grad():
        h = model(torch.as_tensor(r.input_ids)[None], output_hidden_states=True).hidden_states[2][0]
    pieces = [tokenizer.decode([int(t)]) for t in r.input_ids]
    numeric = numeric_tokens(pieces)
    checked = 0
    for pos in np.flatnonzero(scores.eligible[0]):
        if numeric[pos]:
            assert np.isnan(tr[pos])
            continue
        sims = torch.nn.functional.normalize(h[pos] - centre, dim=0) @ unit.T
        assert tr[pos] == pytest.approx(float(sims.topk(2).values.mean()), abs=1e-4)
        checked += 1
    assert checked > 3 and numeric[scores.eligible[0]].any()
    assert hook_points(model).n_layers >= 2
    # with span smoothing (the preset's), every scored token of a span has one value
    smooth = Xtf(XtfConfig(tr_layer=1, max_tokens=120), target=examples[4:],
                 render_cfg=RenderConfig(max_len=96)).score(model, tokenizer, rendered, progress=False)
    spans = span_ids(pieces)
    ri = smooth.scores["ri"][0]
    for span in np.unique(spans[smooth.eligible[0]]):
        vals = ri[(spans == span) & smooth.eligible[0] & np.isfinite(ri)]
        assert len(vals) == 0 or np.ptp(vals) < 1e-6
    masks = xtf.decide(smooth)
    assert masks.info["rule"] == "mixture" and set(masks.info["cuts"]) == set(masks.info["mixture"]) == {"ri", "tr"}


def test_robust_context_free_tr_is_centred_on_a_vocabulary_sample(make_model, tokenizer):
    from mechsieve.tokens.robust import centred_cosine
    from mechsieve.tokens.xtf import vocabulary_sample

    model = make_model("llama")
    rendered, _ = render_pool(_examples(2), tokenizer, RenderConfig(max_len=64))
    words = ["clips", "sold"]
    scores = Xtf(XtfConfig(attributes=["tr"], smooth_spans=False, tr_protect_numeric=False), words=words).score(
        model, tokenizer, rendered, progress=False)
    sample = vocabulary_sample(model, tokenizer)
    assert scores.info["tr"]["centre_tokens"] == len(sample) > 0
    centre = context_free_embeddings(model, sample).mean(0)
    domain = torch.stack([context_free_embeddings(model, word_token_ids(tokenizer, w)).mean(0) for w in words]).mean(0)
    pos = int(np.flatnonzero(scores.eligible[0])[1])
    tok = context_free_embeddings(model, [int(rendered[0].input_ids[pos])])
    assert scores.scores["tr"][0][pos] == pytest.approx(float(centred_cosine(tok, domain, centre)[0]), abs=1e-5)


def test_mask_tokens_robust_with_a_target_and_excess_loss_through_the_cli(model_dir, tmp_path, capsys):
    import datasets

    from mechsieve.cli import main

    rows = [{"question": ex.prompt[0]["content"], "answer": ex.response} for ex in _examples(8)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "clean.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    common = ["mask-tokens", "--pool", str(pool), "--model", str(model_dir), "--quiet", "--max-len", "64"]
    assert main([*common, "--target", str(target), "--out", str(tmp_path / "robust"),
                 "--set", "xtf.tr_layer=1"]) == 0
    summary = json.loads((tmp_path / "robust" / "summary.json").read_text())
    assert summary["scoring"]["tr"]["embedding"] == "contextual" and summary["decision"]["rule"] == "mixture"
    assert set(summary["masked_share"]) == {"ri", "tr", "union"}
    assert summary["settings"]["target"] == {"path": str(target), "examples": 4}
    assert main([*common, "--masker", "excess-loss", "--target", str(target), "--out", str(tmp_path / "el"),
                 "--set", "excess_loss.train.max_steps=2"]) == 0
    summary = json.loads((tmp_path / "el" / "summary.json").read_text())
    assert set(summary["masked_share"]) == {"el", "union"} and summary["decision"]["rule"] == "keep_top"
    eligible = summary["eligible_tokens"]
    assert summary["masked_tokens"]["el"] == int(0.4 * eligible + 1e-9)  # the lowest 40% of the pool
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "el" / "parquet" / "train.parquet"))["train"]
    assert {"el", "loss_base", "loss_ref", "labels", "mask_reason"} <= set(ds.column_names)
    capsys.readouterr()
    assert main([*common, "--masker", "excess-loss", "--out", str(tmp_path / "none")]) == 2
    assert "--masker excess-loss fits its reference model on clean in-domain examples" in capsys.readouterr().err


def test_mixture_rule_finds_a_separate_low_population_and_only_then():
    from mechsieve.tokens.robust import fit_two_gaussians, low_cut, mixture_cut

    rng = np.random.default_rng(0)
    noise, clean = rng.normal(0.0, 0.1, 100), rng.normal(1.0, 0.1, 900)
    values = np.concatenate([clean, noise])
    m = fit_two_gaussians(values)
    np.testing.assert_allclose(m.weight, [0.1, 0.9], atol=0.01)
    np.testing.assert_allclose(m.mean, [0.0, 1.0], atol=0.02)
    np.testing.assert_allclose(m.std, [0.1, 0.1], atol=0.01)
    cut, info = mixture_cut(values)
    # the low component's posterior is 1/2 at the cut; with the true parameters (equal spreads s)
    # the crossing is (m0 + m1) / 2 - s^2 ln(w1 / w0) / (m1 - m0) = 0.5 - 0.01 ln 9 = 0.478
    dens = m.weight / m.std * np.exp(-0.5 * ((cut - m.mean) / m.std) ** 2)
    assert dens[0] / dens.sum() == pytest.approx(0.5, abs=1e-9)
    assert m.mean[0] < cut < m.mean[1] and cut == pytest.approx(0.5 - 0.01 * np.log(9), abs=0.01)
    assert info["mixture"] == "low population found" and info["ashman_d"] > 2
    assert low_cut(values, "mixture", 3.0, 0.05) == cut
    # one population: no noise mode, so the rule falls back to the outlier (mad) cut
    single = rng.normal(1.0, 0.1, 1000)
    cut1, info1 = mixture_cut(single)
    assert np.isnan(cut1) and info1["mixture"] == "no separate low population"
    assert low_cut(single, "mixture", 3.0, 0.05) == low_cut(single, "mad", 3.0, 0.05)
    # a low mode that is the larger one is the clean text, not noise
    assert np.isnan(mixture_cut(np.concatenate([rng.normal(0.0, 0.1, 900), rng.normal(1.0, 0.1, 100)]))[0])


def test_mask_tokens_reads_its_token_features_from_the_cache_on_a_rerun(model_dir, tmp_path):
    import datasets

    from mechsieve.cli import main

    rows = [{"question": ex.prompt[0]["content"], "answer": ex.response} for ex in _examples(8)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "clean.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    common = ["mask-tokens", "--pool", str(pool), "--model", str(model_dir), "--quiet", "--max-len", "64",
              "--target", str(target), "--set", "xtf.tr_layer=1"]

    def run(name: str, *extra: str) -> tuple[dict, list]:
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        labels = datasets.load_from_disk(str(tmp_path / name))["labels"]
        return summary["scoring"]["forward"], labels

    first, labels = run("first")
    assert first["features_computed"] > 0 and first["features_cached"] == 0 and first["passes"] >= 1
    again, labels_again = run("again")  # every feature (pool and target) read back: no pass runs
    assert again["features_computed"] == 0 and again["features_cached"] == first["features_computed"]
    assert again["passes"] == 0 and labels_again == labels
    off, labels_off = run("off", "--no-feature-cache")
    assert off["features_computed"] == first["features_computed"] and labels_off == labels
