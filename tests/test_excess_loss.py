"""Excess-loss token masking (Rho-1 / TokenCleaning): token NLL by hand, excess loss against two
hand-set references, the pool-wide keep-top and threshold rules, special tokens kept, the fitted
reference (base untouched) and its adapter folder loaded back, config errors naming the field."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mechsieve.config import ConfigError, from_dict
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, render_pool
from mechsieve.tokens.base import MASKERS, TokenScores
from mechsieve.tokens.excess_loss import (
    EL,
    ExcessLoss,
    ExcessLossConfig,
    ReferenceTrainConfig,
    below_threshold_mask,
    keep_top_mask,
    token_nll,
)

RENDER = RenderConfig(max_len=64)
NAN = float("nan")


def _examples(n: int = 6) -> list[Example]:
    base = [("Natalia sold clips to 48 of her friends in April.", "She sold 48 / 2 = 24 clips in May. #### 72"),
            ("How many clips did Natalia sell?", "The answer is 12 + 30 = 42. #### 42"),
            ("Answer the question step by step.", "12 + 30 = 42. #### 42"),
            ("Natalia sold half as many clips in May.", "She sold 48 + 24 = 72 clips. #### 72"),
            ("How many clips did Natalia sell altogether?", "48 + 24 = 72. #### 72"),
            ("Natalia sold clips in April and May.", "The answer is 48 + 24 = 72. #### 72")]
    return [Example(id=f"e{i}", source="t", prompt=[{"role": "user", "content": p}], response=r, meta={})
            for i, (p, r) in enumerate((base * 2)[:n])]


def _hand_nll(model, ids: np.ndarray) -> np.ndarray:
    """-log_softmax(logits[j - 1])[ids[j]] of one unpadded example, NaN at j = 0: [t] float64."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.as_tensor(ids)[None]).logits[0].double(), -1)
    return np.array([NAN] + [-float(logp[j - 1, ids[j]]) for j in range(1, len(ids))])


def test_token_nll_hand_values():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 4, 0, 2], [3, 3, 1, 0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    out = token_nll(logits, ids, valid)
    for b in range(2):
        for j in range(4):
            if j == 0 or not valid[b, j]:
                assert math.isnan(out[b, j])
            else:
                ref = -torch.log_softmax(logits[b, j - 1], -1)[ids[b, j]]
                assert float(out[b, j]) == pytest.approx(float(ref), rel=1e-6)


def test_same_model_as_reference_gives_exactly_zero(make_model, tokenizer):
    model = make_model("llama")
    rendered, _ = render_pool(_examples(5), tokenizer, RENDER)
    masker = ExcessLoss(ExcessLossConfig(max_tokens=90), reference=model)  # several padded batches
    scores = masker.score(model, tokenizer, rendered, progress=False)
    assert scores.info["forward"]["base"]["batches"] > 1
    for r, ex in zip(rendered, scores.scores["el"]):
        scored = r.response_mask.copy()
        scored[0] = False
        np.testing.assert_array_equal(np.isfinite(ex), scored)  # NaN off the response and at position 0
        assert (ex[scored] == 0.0).all()


def test_zeroed_head_reference_gives_ln_v(make_model, tokenizer):
    model = make_model("llama")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_output_embeddings().weight.zero_()  # logits 0: the uniform distribution over V
    vocab = model.get_output_embeddings().weight.shape[0]
    rendered, _ = render_pool(_examples(4), tokenizer, RENDER)
    scores = ExcessLoss(ExcessLossConfig(max_tokens=90), reference=ref).score(model, tokenizer, rendered,
                                                                             progress=False)
    for i, r in enumerate(rendered):
        on = r.response_mask & (np.arange(len(r)) > 0)
        np.testing.assert_allclose(scores.scores["loss_ref"][i][on], math.log(vocab), rtol=1e-6)
        hand = _hand_nll(model, r.input_ids) - math.log(vocab)  # unbatched, float64
        np.testing.assert_allclose(scores.scores["el"][i][on], hand[on], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores.scores["loss_base"][i][on], hand[on] + math.log(vocab), rtol=1e-5)
        assert np.isnan(scores.scores["el"][i][~on]).all()


POOL = [np.array([NAN, 0.5, -1.0, 2.0, 0.5], dtype=np.float32), np.array([NAN, 0.5, 3.0, -2.0], dtype=np.float32)]
ELIGIBLE = [np.array([0, 1, 1, 1, 1], dtype=bool), np.array([0, 1, 1, 0], dtype=bool)]  # 6 eligible, finite


@pytest.mark.parametrize("keep,masked", [
    (0.5, ([1, 2, 4], [])),  # floor(0.5 * 6) = 3: -1.0, then the tied 0.5s in pool order (e0 p1, e0 p4)
    (0.6, ([1, 2], [])),  # floor(0.4 * 6) = 2
    (0.01, ([1, 2, 3, 4], [1])),  # floor(5.94) = 5: all but the highest (3.0)
    (1.0, ([], [])),
])
def test_keep_top_masks_the_lowest_over_the_pool_ties_by_position(keep, masked):
    masks = keep_top_mask(POOL, ELIGIBLE, keep)
    assert [np.flatnonzero(m).tolist() for m in masks] == [list(masked[0]), list(masked[1])]
    assert not masks[1][3]  # the lowest score, but not eligible


def test_decide_keep_top_reasons_and_info():
    out = ExcessLoss(ExcessLossConfig(keep=0.5)).decide(TokenScores({"el": POOL}, ELIGIBLE))
    assert out.masks[0].tolist() == [False, True, True, False, True] and not out.masks[1].any()
    assert out.reasons[0].tolist() == [0, EL, EL, 0, EL] and out.reasons[0].dtype == np.uint8
    assert out.info == {"rule": "keep_top", "keep": 0.5, "cut": 0.5, "masked_share": 0.5}


def test_threshold_rule():
    assert [m.tolist() for m in below_threshold_mask(POOL, ELIGIBLE, 0.5)] == \
        [[False, False, True, False, False], [False] * 4]
    out = ExcessLoss(ExcessLossConfig(rule="threshold", threshold=0.6)).decide(TokenScores({"el": POOL}, ELIGIBLE))
    assert [np.flatnonzero(m).tolist() for m in out.masks] == [[1, 2, 4], [1]]
    assert out.info == {"rule": "threshold", "threshold": 0.6, "cut": 0.6, "masked_share": round(4 / 6, 6)}


def test_special_tokens_are_never_masked(make_model, tokenizer):
    model = make_model("llama")
    rendered, _ = render_pool(_examples(4), tokenizer, RENDER)
    scores = ExcessLoss(reference=model).score(model, tokenizer, rendered, progress=False)
    special = [r.response_mask & np.isin(r.input_ids, tokenizer.all_special_ids) for r in rendered]
    assert all(s.any() for s in special)  # the end-of-turn marker is a response token
    for s, e, ex in zip(special, scores.eligible, scores.scores["el"]):
        assert not (e & s).any()
        ex[s] = -1e9  # the lowest scores of the pool
    for cfg in (ExcessLossConfig(keep=0.2), ExcessLossConfig(rule="threshold", threshold=1.0)):
        masks = ExcessLoss(cfg).decide(scores).masks
        assert sum(int(m.sum()) for m in masks) > 0
        assert not any((m & s).any() for m, s in zip(masks, special))


@pytest.fixture(scope="module")
def fitted(loaded, tmp_path_factory):
    """A reference fitted on the in-domain examples (adapter saved), and the base before it."""
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    cfg = ExcessLossConfig(train=ReferenceTrainConfig(max_steps=10, learning_rate=2e-2, lora_r=4, lora_alpha=8,
                                                      lora_dropout=0.0))
    masker = ExcessLoss(cfg)
    out = tmp_path_factory.mktemp("excess") / "reference"
    ref = masker.fit_reference(loaded, _examples(6), RENDER, progress=False, out_dir=out)
    return masker, ref, before, grads, out


def test_fit_reference_lowers_in_domain_loss_and_leaves_the_base_alone(fitted, loaded, tokenizer):
    masker, ref, before, grads, _ = fitted
    assert masker.reference is ref and hasattr(ref.model, "peft_config")
    assert not hasattr(loaded.model, "peft_config")
    assert not any("lora_" in n for n, _ in loaded.model.named_modules())
    after = loaded.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in loaded.model.named_parameters()} == grads
    info = masker.reference_info
    assert info["source"] == "fitted" and info["steps"] == 10 and info["loss_last"] < info["loss_first"]
    rendered, _ = render_pool(_examples(6), tokenizer, RENDER)
    scores = masker.score(loaded.model, tokenizer, rendered, progress=False)
    base = np.concatenate([s[e] for s, e in zip(scores.scores["loss_base"], scores.eligible)])
    ref_loss = np.concatenate([s[e] for s, e in zip(scores.scores["loss_ref"], scores.eligible)])
    assert ref_loss.mean() < base.mean() - 0.05


def test_load_reference_from_the_adapter_folder_scores_as_the_fitted_one(fitted, loaded, tokenizer):
    masker, _, _, _, out = fitted
    rendered, _ = render_pool(_examples(4), tokenizer, RENDER)
    want = masker.score(loaded.model, tokenizer, rendered, progress=False)
    again = ExcessLoss(ExcessLossConfig(reference=str(out)))
    again.load_reference(loaded)
    assert again.reference_info["source"] == "adapter" and not hasattr(loaded.model, "peft_config")
    got = again.score(loaded.model, tokenizer, rendered, progress=False)
    for name in ("el", "loss_base", "loss_ref"):
        for a, b in zip(got.scores[name], want.scores[name]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_load_reference_from_a_model_folder(loaded, tokenizer, model_dir):
    masker = ExcessLoss(ExcessLossConfig(reference=str(model_dir)))  # the base itself, saved
    masker.load_reference(loaded)
    assert masker.reference_info["source"] == "model"
    rendered, _ = render_pool(_examples(3), tokenizer, RENDER)
    scores = masker.score(loaded.model, tokenizer, rendered, progress=False)
    for ex in scores.scores["el"]:
        np.testing.assert_allclose(ex[np.isfinite(ex)], 0.0, atol=1e-5)


def test_registered_and_refuses_to_score_without_a_reference(loaded, tokenizer):
    assert MASKERS["excess-loss"] is ExcessLoss and ExcessLoss.name == "excess-loss"
    rendered, _ = render_pool(_examples(1), tokenizer, RENDER)
    with pytest.raises(ConfigError, match="fit_reference"):
        ExcessLoss().score(loaded.model, tokenizer, rendered, progress=False)
    with pytest.raises(ConfigError, match="excess_loss.reference"):
        ExcessLoss(ExcessLossConfig(reference="/no/such/folder")).load_reference(loaded)


@pytest.mark.parametrize("settings,field", [
    ({"rule": "top"}, "excess_loss.rule"),
    ({"keep": 0.0}, "excess_loss.keep"),
    ({"keep": 1.5}, "excess_loss.keep"),
    ({"threshold": NAN}, "excess_loss.threshold"),
    ({"max_tokens": 0}, "excess_loss.max_tokens"),
    ({"max_batch": -1}, "excess_loss.max_batch"),
    ({"train": {"epochs": 2}}, "excess_loss.train"),
])
def test_config_errors_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ExcessLossConfig(**settings)


def test_yaml_section_keeps_the_reference_training_defaults():
    cfg = from_dict(ExcessLossConfig, {"rule": "threshold", "train": {"lora_r": 8}})
    assert isinstance(cfg.train, ReferenceTrainConfig)
    assert (cfg.train.lora_r, cfg.train.epochs, cfg.train.learning_rate) == (8, 3.0, 1e-4)
    assert ExcessLossConfig().train.epochs == 3.0
