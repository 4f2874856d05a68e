"""Per-token features of the shared pass (capture.token_features): ragged arrays through the
FeatureCache, XTF and excess-loss scores equal to their old per-masker passes (kept below as the
reference implementation), one pool pass for selection methods and token maskers together, and a
cached second run that computes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mechsieve.capture.batching import plan_batches
from mechsieve.capture.forward import ForwardSpec, run_forward
from mechsieve.capture.shared import PassKey, feature_pass
from mechsieve.capture.token_features import (
    ContextualRelevance,
    ReceivedAttention,
    TokenNll,
    TokenStates,
    pack,
    rendered_fingerprint,
    split,
)
from mechsieve.data.render import RenderConfig, pad_id, render_pool
from mechsieve.models.hooks import hook_points
from mechsieve.scorers import make_scorer
from mechsieve.store.features import FeatureCache
from mechsieve.tokens.attributes import received_attention, token_probabilities
from mechsieve.tokens.excess_loss import ExcessLoss, ExcessLossConfig, token_nll
from mechsieve.tokens.robust import (
    numeric_tokens,
    relative_received_attention,
    smooth_over_spans,
    span_ids,
)
from mechsieve.tokens.shared import score_and_mask
from mechsieve.tokens.xtf import Xtf, XtfConfig, eligible_tokens, middle_layers
from test_feature_pass import COMMON
from test_scorers import make_pool

pytestmark = pytest.mark.timeout(300)

RENDER = RenderConfig(max_len=64)
BATCH = {"max_tokens": COMMON["max_tokens"], "max_batch": COMMON["max_batch"]}  # several padded batches


# --- the old per-masker passes, as they were before the features (the reference) ----------------

def old_target_states(model, tokenizer, target, cfg: XtfConfig, layer: int):
    rendered, _ = render_pool(target, tokenizer, RENDER)
    elig = eligible_tokens(rendered, tokenizer.all_special_ids)
    parts = []

    def on_layer(ctx, _layer, acts):
        for row, i in enumerate(ctx.indices):
            lo, length = int(ctx.batch.offsets[row]), int(ctx.batch.lengths[row])
            parts.append(acts[row, lo:lo + length][torch.from_numpy(elig[i])].float())

    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    run_forward(model, rendered, plan, ForwardSpec(layers=[layer]), pad_id(tokenizer), on_layer=on_layer,
                progress=False)
    states = torch.cat(parts)
    centre = states.mean(0) if cfg.tr_centre else torch.zeros(states.shape[1])
    return centre, torch.nn.functional.normalize(states - centre, dim=-1)


def old_xtf_pass(model, tokenizer, rendered, cfg: XtfConfig, target=None, tr_layer: int = 1):
    """The old Xtf._forward_scores (RI, KN, contextual TR in one pass) + numeric protection and span
    smoothing, as Xtf.score did them."""
    n_layers = hook_points(model).n_layers
    eligible = eligible_tokens(rendered, tokenizer.all_special_ids)
    want_ri, want_kn, contextual = "ri" in cfg.attributes, "kn" in cfg.attributes, target is not None
    layers = {"all": list(range(n_layers)), "last": [n_layers - 1],
              "middle": middle_layers(n_layers)}[cfg.ri_layers] if want_ri else []
    if contextual:
        centre, unit = old_target_states(model, tokenizer, target, cfg, tr_layer)
        k = min(cfg.tr_top_k, unit.shape[0])
    out = {name: [None] * len(rendered) for name in ("ri", "kn", "tr")}
    acc = {}

    def on_attention(ctx, layer, probs):
        valid = ctx.batch.attention_mask.bool()
        if cfg.ri_baseline == "uniform":
            total, n_later = relative_received_attention(probs, valid, ctx.batch.offsets)
        else:
            total, n_later = received_attention(probs, valid)
        acc["total"] = acc["total"] + total if "total" in acc else total
        acc["n_later"] = n_later

    def on_layer(ctx, layer, acts):
        h = torch.nn.functional.normalize(acts.float() - centre, dim=-1)
        acc["tr"] = (h @ unit.T).topk(k, dim=-1).values.mean(-1)

    def on_logits(ctx, logits):
        acc["kn"] = token_probabilities(logits, ctx.batch.input_ids, ctx.batch.attention_mask.bool())

    def on_batch_end(number, ctx):
        b = ctx.batch
        if want_ri:
            n = acc["n_later"].float()
            value = (acc.pop("total") / len(layers)) / n.clamp_min(1.0)
            value = torch.where(n > 0, value, torch.full_like(value, float("nan"))).numpy()
        for row, i in enumerate(ctx.indices):
            lo, length = int(b.offsets[row]), int(b.lengths[row])
            if want_ri:
                out["ri"][i] = value[row, lo:lo + length].astype(np.float32)
            if want_kn:
                out["kn"][i] = acc["kn"].numpy()[row, lo:lo + length].astype(np.float32)
            if contextual:
                out["tr"][i] = np.where(eligible[i], acc["tr"].numpy()[row, lo:lo + length], np.nan).astype(np.float32)

    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    spec = ForwardSpec(layers=[tr_layer] if contextual else [], attention_layers=layers, need_logits=want_kn)
    run_forward(model, rendered, plan, spec, pad_id(tokenizer), on_layer=on_layer if contextual else None,
                on_attention=on_attention, on_logits=on_logits, on_batch_end=on_batch_end, progress=False)
    scores = {name: v for name, v in out.items() if v[0] is not None}
    pieces = [[tokenizer.decode([int(t)]) for t in r.input_ids] for r in rendered]
    if cfg.tr_protect_numeric and "tr" in scores:
        for k_, p in enumerate(pieces):
            scores["tr"][k_][numeric_tokens(p)] = np.nan
    if cfg.smooth_spans:
        for name in ("ri", "tr"):
            if name in scores:
                scores[name] = [smooth_over_spans(s, e, span_ids(p)) for s, e, p in zip(scores[name], eligible, pieces)]
    return scores


def old_losses(model, tokenizer, rendered, cfg: ExcessLossConfig):
    """The old ExcessLoss._losses: per-token response NLL [t_i] per example."""
    out = [None] * len(rendered)
    acc = {}

    def on_logits(ctx, logits):
        acc["nll"] = token_nll(logits, ctx.batch.input_ids, ctx.batch.attention_mask.bool()).numpy()

    def on_batch_end(number, ctx):
        for row, i in enumerate(ctx.indices):
            lo, length = int(ctx.batch.offsets[row]), int(ctx.batch.lengths[row])
            out[i] = np.where(rendered[i].response_mask, acc["nll"][row, lo:lo + length], np.nan).astype(np.float32)

    plan = plan_batches([len(r) for r in rendered], cfg.max_tokens, cfg.max_batch)
    run_forward(model, rendered, plan, ForwardSpec(need_logits=True), pad_id(tokenizer), on_logits=on_logits,
                on_batch_end=on_batch_end, progress=False)
    return out


def assert_same(new, old, rtol=0.0, err_msg=""):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert a.dtype == np.float32 and a.shape == b.shape, err_msg
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=err_msg)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0.0 if rtol == 0 else 1e-7, err_msg=err_msg)


def perturbed(model, seed: int = 5, scale: float = 0.02):
    ref = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn_like(p))
    return ref


# --- ragged arrays --------------------------------------------------------------------------

def test_ragged_pack_split_by_hand_and_through_the_feature_cache(tmp_path, loaded):
    rows = [np.array([1.0, np.nan, 3.0], np.float32), np.zeros(0, np.float32), np.array([5.0], np.float32)]
    packed = pack(rows)
    np.testing.assert_array_equal(packed["offsets"], [0, 3, 3, 4])
    np.testing.assert_array_equal(packed["values"], [1.0, np.nan, 3.0, 5.0])
    assert packed["values"].dtype == np.float32 and packed["offsets"].dtype == np.int64
    states = pack([np.arange(6, dtype=np.float32).reshape(3, 2), np.zeros((0, 2), np.float32)], width=2)
    assert states["values"].shape == (3, 2) and states["offsets"].tolist() == [0, 3, 3]
    assert pack([np.zeros(0, np.float32)])["values"].shape == (0,)
    cache = FeatureCache(tmp_path / "cache")
    key = {"feature": "test", "settings": {}}
    for arrays in (packed, states):
        cache.save(loaded.identity, "fp", {**key, "n": len(arrays["offsets"])}, arrays)
        back = cache.load(loaded.identity, "fp", {**key, "n": len(arrays["offsets"])})
        for name in arrays:
            assert back[name].dtype == arrays[name].dtype
            np.testing.assert_array_equal(back[name], arrays[name])
    parts = split(cache.load(loaded.identity, "fp", {**key, "n": 4}))
    assert [p.tolist() for p in parts[1:]] == [[], [5.0]] and np.isnan(parts[0][1])
    parts[2][0] = 7.0  # a copy: the cached arrays are not edited through it
    assert split(packed)[2][0] == 5.0


def test_token_nll_feature_matches_an_unpadded_hand_computation(loaded, tokenizer, tmp_path):
    rendered, _ = render_pool(make_pool(7).examples, tokenizer, RENDER)
    key = PassKey(RENDER, **BATCH)
    cache = FeatureCache(tmp_path / "cache")
    fp = rendered_fingerprint(rendered)
    arrays, report = feature_pass(loaded, rendered, {"nll": TokenNll(key)}, cache=cache, data_fingerprint=fp,
                                  progress=False)
    assert report.passes[0]["batches"] > 1 and arrays["nll"]["vocab"].tolist() == [len(tokenizer)]
    for r, nll in zip(rendered, split(arrays["nll"])):
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(torch.as_tensor(r.input_ids)[None]).logits[0].double(), -1)
        hand = [np.nan] + [-float(logp[j - 1, r.input_ids[j]]) for j in range(1, len(r))]
        np.testing.assert_allclose(nll, hand, rtol=1e-5, atol=1e-6)
    again, report = feature_pass(loaded, rendered, {"nll": TokenNll(key)}, cache=cache, data_fingerprint=fp,
                                 progress=False)
    assert report.passes == [] and report.cached == ["token_nll"]
    for name in arrays["nll"]:
        np.testing.assert_array_equal(again["nll"][name], arrays["nll"][name])
    assert rendered_fingerprint(rendered[1:]) != fp


def test_received_attention_needs_an_attention_pass_key():
    with pytest.raises(ValueError, match="site='attention'"):
        ReceivedAttention(PassKey(RENDER, 64, 2), [0], "raw")


# --- equal to the old per-masker passes --------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_xtf_paper_equals_the_old_pass(make_model, tokenizer, arch):
    model = make_model(arch)
    rendered, _ = render_pool(make_pool(7).examples, tokenizer, RENDER)
    cfg = XtfConfig(preset="paper", tr_classes=3, **BATCH)
    xtf = Xtf(cfg)
    new = xtf.score(model, tokenizer, rendered, progress=False)
    old = old_xtf_pass(model, tokenizer, rendered, cfg)
    assert set(new.scores) == {"ri", "kn", "tr"} and new.info["forward"]["passes"] == 1  # RI and KN: one pass
    assert new.info["forward"]["batches"] > 1
    assert_same(new.scores["ri"], old["ri"], err_msg="ri")
    assert_same(new.scores["kn"], old["kn"], err_msg="kn")  # exp(-nll) is the old probability, bit for bit
    assert np.isfinite(np.concatenate(new.scores["ri"])).sum() > 20


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_xtf_robust_with_a_target_equals_the_old_pass(make_model, tokenizer, arch):
    model = make_model(arch)
    pool = make_pool(9).examples
    rendered, _ = render_pool(pool[:7], tokenizer, RENDER)
    cfg = XtfConfig(preset="robust", attributes=["ri", "kn", "tr"], tr_layer=1, **BATCH)
    xtf = Xtf(cfg, target=pool[6:], render_cfg=RENDER)
    new = xtf.score(model, tokenizer, rendered, progress=False)
    old = old_xtf_pass(model, tokenizer, rendered, cfg, target=pool[6:], tr_layer=1)
    assert new.info["tr"]["embedding"] == "contextual" and new.info["forward"]["passes"] == 1
    assert_same(new.scores["ri"], old["ri"], err_msg="ri")
    assert_same(new.scores["kn"], old["kn"], err_msg="kn")
    # the in-domain states are averaged in target order, not batch order: float rounding only
    assert_same(new.scores["tr"], old["tr"], rtol=1e-6, err_msg="tr")
    assert np.isfinite(np.concatenate(new.scores["tr"])).sum() > 20
    masks_old = xtf.decide(type(new)(old, new.eligible))
    for a, b in zip(xtf.decide(new).masks, masks_old.masks):
        np.testing.assert_array_equal(a, b)


def test_excess_loss_equals_the_old_passes(make_model, tokenizer):
    model = make_model("llama")
    ref = perturbed(model)
    rendered, _ = render_pool(make_pool(7).examples, tokenizer, RENDER)
    cfg = ExcessLossConfig(**BATCH)
    new = ExcessLoss(cfg, reference=ref).score(model, tokenizer, rendered, progress=False)
    base, reference = old_losses(model, tokenizer, rendered, cfg), old_losses(ref, tokenizer, rendered, cfg)
    assert_same(new.scores["loss_base"], base)
    assert_same(new.scores["loss_ref"], reference)
    assert_same(new.scores["el"], [b - r for b, r in zip(base, reference)])
    assert new.info["forward"]["base"]["batches"] > 1 and new.info["forward"]["reference"]["passes"] == 1
    assert np.nanmax(np.abs(np.concatenate(new.scores["el"]))) > 1e-3


# --- one pass for methods and maskers ----------------------------------------------------------

def test_loss_nait_and_xtf_tr_share_one_pool_pass(loaded, tokenizer):
    pool, target = make_pool(10), make_pool(4, start=2, source="target")
    xtf_cfg = XtfConfig(preset="robust", attributes=["tr"], **BATCH)

    def maskers():
        return {"xtf": Xtf(xtf_cfg, target=target.examples, render_cfg=RENDER)}

    scorers = {name: make_scorer(name, COMMON) for name in ("loss", "nait")}
    run = score_and_mask(scorers, maskers(), pool, target=target, loaded=loaded, seed=1, progress=False)
    passes = run.report["shared"]["passes"]
    assert len(passes) == 1 and run.report["other_models"] == []
    assert sorted(passes[0]["features"]) == ["nait_drift_projection", "response_loss", "xtf_contextual_tr"]
    assert passes[0]["logits"] and passes[0]["examples"] == 10 and passes[0]["attention_layers"] == []
    for name in ("loss", "nait"):
        alone = make_scorer(name, COMMON).score(pool, target=target, loaded=loaded, seed=1, progress=False)
        np.testing.assert_array_equal(run.scores[name].scores, alone.scores, err_msg=name)
    rendered, _ = render_pool(pool.examples, tokenizer, RENDER)
    assert [r.input_ids.tolist() for r in run.rendered] == [r.input_ids.tolist() for r in rendered]
    alone = maskers()["xtf"].score(loaded.model, tokenizer, rendered, progress=False)
    assert_same(run.token_scores["xtf"].scores["tr"], alone.scores["tr"], err_msg="tr")
    assert np.isfinite(np.concatenate(alone.scores["tr"])).sum() > 20


def test_what_cannot_share_the_pool_pass_gets_its_own(loaded, tokenizer):
    """XTF's RI needs eager attention (a pass of its own); the excess loss's reference is another
    model (its own pass); KN, TR and the base NLL ride in the methods' pass."""
    pool, target = make_pool(8), make_pool(4, start=2, source="target")
    ref = perturbed(loaded.model)

    def maskers():
        return {"xtf": Xtf(XtfConfig(preset="robust", attributes=["ri", "kn", "tr"], **BATCH), target=target.examples,
                           render_cfg=RENDER),
                "el": ExcessLoss(ExcessLossConfig(**BATCH), reference=ref)}

    run = score_and_mask({"loss": make_scorer("loss", COMMON)}, maskers(), pool, target=target, loaded=loaded,
                         progress=False)
    by_site = {p["site"]: p for p in run.report["shared"]["passes"]}
    assert set(by_site) == {"resid", "attention"} and len(run.report["other_models"]) == 1
    assert by_site["attention"]["features"] == ["xtf_received_attention"] and not by_site["attention"]["logits"]
    assert by_site["attention"]["attention_layers"] == middle_layers(hook_points(loaded.model).n_layers)
    assert sorted(by_site["resid"]["features"]) == ["response_loss", "token_nll", "xtf_contextual_tr"]  # KN = base NLL
    rendered, _ = render_pool(pool.examples, tokenizer, RENDER)
    alone = {label: m.score(loaded.model, tokenizer, rendered, progress=False) for label, m in maskers().items()}
    assert_same(run.token_scores["xtf"].scores["ri"], alone["xtf"].scores["ri"], err_msg="ri")
    # alone, KN and TR are read in RI's eager pass; shared, in the methods' sdpa pass: float rounding only
    for name in ("kn", "tr"):
        assert_same(run.token_scores["xtf"].scores[name], alone["xtf"].scores[name], rtol=1e-5, err_msg=name)
    for name in ("el", "loss_base", "loss_ref"):
        assert_same(run.token_scores["el"].scores[name], alone["el"].scores[name], err_msg=name)


# --- the cache -----------------------------------------------------------------------------------

def test_a_cached_second_run_computes_nothing(loaded, tokenizer, tmp_path):
    pool, target = make_pool(8), make_pool(4, start=2, source="target")
    rendered, _ = render_pool(pool.examples, tokenizer, RENDER)
    cache = FeatureCache(tmp_path / "cache")

    def xtf():
        return Xtf(XtfConfig(preset="robust", attributes=["ri", "kn", "tr"], **BATCH), target=target.examples,
                   render_cfg=RENDER)

    first = xtf().score(loaded, tokenizer, rendered, progress=False, cache=cache)
    assert first.info["forward"]["features_computed"] == 3 and cache.hits == 0
    misses = cache.misses  # RI, KN, TR and the target's states
    assert misses == 4
    second = xtf().score(loaded, tokenizer, rendered, progress=False, cache=cache)
    assert second.info["forward"] == {**second.info["forward"], "passes": 0, "features_computed": 0,
                                      "features_cached": 3, "tokens": 0}
    assert cache.hits == 4 and cache.misses == misses
    for name in first.scores:
        assert_same(second.scores[name], first.scores[name], err_msg=name)
    # the excess loss's reference is another model identity: two entries, not one read twice
    el = ExcessLoss(ExcessLossConfig(**BATCH), reference=perturbed(loaded.model))
    a = el.score(loaded, tokenizer, rendered, progress=False, cache=cache)
    assert [a.info["forward"][m]["features_computed"] for m in ("base", "reference")] == [1, 1]
    b = el.score(loaded, tokenizer, rendered, progress=False, cache=cache)
    assert [b.info["forward"][m]["features_cached"] for m in ("base", "reference")] == [1, 1]
    assert_same(b.scores["el"], a.scores["el"])
    assert np.nanmax(np.abs(np.concatenate(a.scores["el"]))) > 1e-3
    # XTF's KN (no RI: no eager pass) is the excess loss's base NLL: read from the cache
    kn = Xtf(XtfConfig(preset="paper", attributes=["kn"], **BATCH)).score(loaded, tokenizer, rendered,
                                                                           progress=False, cache=cache)
    assert kn.info["forward"]["features_cached"] == 1 and kn.info["forward"]["passes"] == 0
    for p, nll in zip(kn.scores["kn"], a.scores["loss_base"]):
        resp = np.isfinite(nll)
        np.testing.assert_allclose(p[resp], np.exp(-nll[resp]), rtol=1e-6)
    # through score_and_mask: a second run with the same methods computes nothing
    scorers = {"loss": make_scorer("loss", COMMON)}
    maskers = {"xtf": Xtf(XtfConfig(preset="robust", attributes=["tr"], **BATCH), target=target.examples,
                          render_cfg=RENDER)}
    r1 = score_and_mask(scorers, maskers, pool, target=target, loaded=loaded, cache=cache, progress=False)
    r2 = score_and_mask(scorers, maskers, pool, target=target, loaded=loaded, cache=cache, progress=False)
    assert r1.report["shared"]["features_computed"] == ["response_loss", "xtf_contextual_tr"]
    assert r2.report["shared"]["passes"] == [] and r2.report["shared"]["features_computed"] == []
    assert_same(r2.token_scores["xtf"].scores["tr"], r1.token_scores["xtf"].scores["tr"])


def test_a_cache_needs_the_model_identity(make_model, tokenizer, tmp_path):
    from mechsieve.config import ConfigError

    rendered, _ = render_pool(make_pool(2).examples, tokenizer, RENDER)
    with pytest.raises(ConfigError, match="identity"):
        Xtf(XtfConfig(preset="paper", attributes=["kn"])).score(make_model("llama"), tokenizer, rendered,
                                                                  progress=False, cache=FeatureCache(tmp_path))


def test_target_states_and_relevance_features_key_on_their_settings(loaded):
    key = PassKey(RENDER, 64, 2)
    unit = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    a = ContextualRelevance(key, 1, torch.zeros(32), unit, 8).full_key()
    assert a != ContextualRelevance(key, 1, torch.zeros(32), unit.flip(0), 8).full_key()
    assert a != ContextualRelevance(key, 1, torch.zeros(32), unit, 4).full_key()
    assert a != ContextualRelevance(key, 2, torch.zeros(32), unit, 8).full_key()
    assert a == ContextualRelevance(key, 1, torch.zeros(32), unit.clone(), 8).full_key()
    assert TokenStates(key, 0).full_key() != TokenStates(key, 1).full_key()
    assert ReceivedAttention(PassKey(RENDER, 64, 2, site="attention"), [0, 1], "raw").full_key() != \
        ReceivedAttention(PassKey(RENDER, 64, 2, site="attention"), [0, 1], "uniform").full_key()
