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


def reference_drifts(loaded: LoadedModel, ex: Example, layers: list[int], site: str,
                     anchor: str = "first_content") -> np.ndarray:
    """[L, d] last token minus the anchor token (first content token by default), one example,
    unbatched, own hooks / hidden states."""
    r = render_example(ex, loaded.tokenizer, RenderConfig())
    first = {"first_content": r.content_start, "last_user": r.user_start, "response": r.prompt_len}[anchor]
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
    return np.stack([(a[-1] - a[first]).numpy() for a in acts])


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
    res = make_scorer("nait", {"layers": layers, "site": site, "preset": "paper"}).score(pool, target=target, loaded=loaded,
                                                                      progress=False)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # cosine: each layer's term divided by the drift's norm
    cos = sum((p[:, k] @ dirs[k]) / np.linalg.norm(p[:, k], axis=1) for k in range(len(layers)))
    res = make_scorer("nait", {"layers": layers, "site": site, "similarity": "cosine", "preset": "paper"}).score(
        pool, target=target, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.scores, cos, rtol=1e-4, atol=1e-5)
    # z-normalisation with the target's statistics of each layer's projection
    proj_t = [t[:, k] @ dirs[k] for k in range(len(layers))]
    z = sum((p[:, k] @ dirs[k] - proj_t[k].mean()) / proj_t[k].std() for k in range(len(layers)))
    res = make_scorer("nait", {"layers": layers, "site": site, "normalize": "target", "preset": "paper"}).score(
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
    res = make_scorer("nait", {"layers": [0, 1], "preset": "paper"}).score(target, target=target, loaded=loaded, progress=False)
    assert res.scores.mean() > 0


def test_several_capabilities_union(loaded):
    a, b = make_pool(4, start=0, source="math"), make_pool(4, start=3, source="code")
    target = Pool(a.examples + b.examples, "", "memory", "memory")
    pool = make_pool(7)
    res = make_scorer("nait", {"layers": [0, 1], "preset": "paper"}).score(pool, target=target, loaded=loaded, progress=False)
    assert res.per_target.shape == (7, 2) and res.target_names == ["math", "code"]
    single_a = make_scorer("nait", {"layers": [0, 1], "preset": "paper"}).score(pool, target=a, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.per_target[:, 0], single_a.scores, rtol=1e-6)
    np.testing.assert_allclose(res.scores, res.per_target.max(axis=1))
    from mechsieve.select import select_examples

    # A budget of 2 takes the best example of each capability, not the two best combined scores.
    # In this trio (seeded model) pool-02 is the best at math, pool-03 the best at code, and
    # pool-04's combined score beats pool-03's: the two rules pick different pairs.
    trio = Pool([pool.examples[i] for i in (2, 3, 4)], "", "memory", "memory")
    per_target = make_scorer("nait", {"layers": [0, 1], "preset": "paper"}).score(trio, target=target, loaded=loaded,
                                                               progress=False).per_target
    assert list(per_target.argmax(axis=0)) == [0, 1]
    assert per_target[2].max() > per_target[1].max()
    sel = select_examples("nait", trio, 2, target=target, loaded=loaded, settings={"layers": [0, 1], "preset": "paper"}, progress=False)
    assert set(sel.ids) == {"pool-02", "pool-03"}
    with pytest.raises(Exception, match="fewer than 2"):
        make_scorer("nait", {"preset": "paper"}).score(pool, target=make_pool(1, source="x"), loaded=loaded, progress=False)


def test_directions_artefact_roundtrip_and_refusal(loaded, tmp_path):
    pool, target = make_pool(5), make_pool(6, start=1, source="gsm8k")
    fitted = make_scorer("nait", {"preset": "paper", "layers": [0, 2], "save_directions": str(tmp_path / "dirs")}).score(
        pool, target=target, loaded=loaded, progress=False)
    assert (tmp_path / "dirs" / "nait_directions.safetensors").exists()
    reused = make_scorer("nait", {"preset": "paper", "layers": [0, 2], "directions": str(tmp_path / "dirs")}).score(
        pool, target=None, loaded=loaded, progress=False)
    np.testing.assert_allclose(reused.scores, fitted.scores, rtol=1e-6)
    art = CapabilityDirections.load(tmp_path / "dirs")
    assert art.directions.shape == (1, 2, 32) and art.layers == [0, 2]
    np.testing.assert_allclose(np.linalg.norm(art.directions, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(SettingsMismatch, match="layers"):
        make_scorer("nait", {"preset": "paper", "layers": [0, 1], "directions": str(tmp_path / "dirs")}).score(
            pool, loaded=loaded, progress=False)
    with pytest.raises(SettingsMismatch, match="site"):
        make_scorer("nait", {"preset": "paper", "layers": [0, 2], "site": "mlp", "directions": str(tmp_path / "dirs")}).score(
            pool, loaded=loaded, progress=False)


# --- the drift's anchor -------------------------------------------------------------------------

# SmolLM2's template in small: an automatic system prompt when the chat has none
AUTO_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
    "helpful assistant<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma's layout: no system role, the system text opens the first user turn; contents trimmed
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set head = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set head = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + "
    "(head if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Llama-3's layout: header tokens, a blank line, the trimmed content
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\\n\\n' + m['content'] | trim "
    "+ '</s>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\\n\\n' }}{% endif %}"
)
# a template whose text before a turn depends on that turn's content: the anchor cannot be located
CONTENT_DEPENDENT = "{% for m in messages %}{{ m['role'] }} ({{ m['content'] | length }}): {{ m['content'] }}\\n{% endfor %}"


def with_template(tokenizer_dir, template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template
    return tok


SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": " Sum 2 and 3"}]


def test_user_start_on_chatml_is_hand_checked(tokenizer):
    r = render_example(Example("a", "s", [{"role": "user", "content": "How many clips?"}], "72"), tokenizer)
    # tokens: <|im_start|> u s er \n How ...: the role word `user` is three tokens here
    assert [tokenizer.decode([t]) for t in r.input_ids[:6]] == ["<|im_start|>", "u", "s", "er", "\n", "How"]
    assert r.user_start == 5 and r.content_start == 1


@pytest.mark.parametrize("template", ["chatml", "auto_system", "gemma", "llama3"])
def test_user_start_is_the_last_user_turns_first_token(tokenizer_dir, tokenizer, template):
    tok = tokenizer if template == "chatml" else with_template(
        tokenizer_dir, {"auto_system": AUTO_SYSTEM, "gemma": GEMMA_LIKE, "llama3": LLAMA3_LIKE}[template])
    for prompt in ([{"role": "user", "content": "How many clips?"}], SYSTEM_CHAT, SYSTEM_CHAT[:2]):
        r = render_example(Example("a", "s", prompt, "5"), tok)
        user = prompt[-1]["content"]
        before, after = tok.decode(r.input_ids[:r.user_start]), tok.decode(r.input_ids[r.user_start:])
        # the anchor token begins the user's text (its leading space where the template keeps it)
        assert after.startswith(user if template in ("chatml", "auto_system") else user.strip()), (before, after)
        assert before.endswith("\n") and user.strip() not in before[-len(user) - 2:]
    r = render_example(Example("a", "s", [{"role": "user", "content": "How many clips?"}], "5"),
                       with_template(tokenizer_dir, AUTO_SYSTEM))
    # the paper's anchor is the constant role word of the automatic system prompt
    assert r.content_start == 1 and tokenizer.decode(r.input_ids[1:]).startswith("system\nYou are")


def test_user_start_plain_none_text_and_unlocatable(tokenizer_dir, tokenizer, plain_tokenizer):
    u = [{"role": "user", "content": "How many clips?"}]
    plain = render_example(Example("a", "s", u, "72"), plain_tokenizer)
    assert plain.user_start == 6  # <s> U s er : ' ' How
    assert plain_tokenizer.decode(plain.input_ids[1:6]) == "User: "
    raw = render_example(Example("a", "s", u, "72"), tokenizer, RenderConfig(template="none"))
    assert raw.user_start == 1 == raw.content_start  # <s> How: no template, the text's first token
    text = render_example(Example("a", "s", [], "Once upon a time"), tokenizer)
    assert text.user_start is None and text.user_anchor == text.content_start
    hidden = render_example(Example("a", "s", u, "72"), with_template(tokenizer_dir, CONTENT_DEPENDENT))
    assert hidden.user_start is None and hidden.user_anchor == hidden.content_start
    cut = render_example(Example("a", "s", [{"role": "user", "content": "clips " * 40}], "72"), tokenizer,
                         RenderConfig(max_len=3))
    assert cut.user_start == 2  # past the cut: the last kept token
    from mechsieve.capture.batching import collate

    batch = collate([plain, text, hidden], 0, "left")
    assert batch.user_start.tolist() == [6, text.content_start, hidden.content_start]


@pytest.mark.parametrize("anchor", ["last_user", "response"])
def test_nait_anchors_match_a_hand_computed_drift(loaded, anchor):
    layers = [0, 1]
    pool, target = make_pool(5), make_pool(6, start=1, source="gsm8k")
    t = np.stack([reference_drifts(loaded, ex, layers, "resid", anchor) for ex in target.examples])
    p = np.stack([reference_drifts(loaded, ex, layers, "resid", anchor) for ex in pool.examples])
    dirs = [hand_pca(t[:, k]) for k in range(len(layers))]
    expected = sum(p[:, k] @ dirs[k] for k in range(len(layers)))
    res = make_scorer("nait", {"layers": layers, "preset": "paper", "anchor": anchor}).score(
        pool, target=target, loaded=loaded, progress=False)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # the anchors are other tokens, so other drifts: not the paper's numbers
    paper = make_scorer("nait", {"layers": layers, "preset": "paper"}).score(pool, target=target, loaded=loaded,
                                                                          progress=False)
    assert not np.allclose(paper.scores, res.scores, rtol=1e-3)


# --- layer choice by held-out separation --------------------------------------------------------

def test_roc_auc_and_layer_choice_by_hand():
    from mechsieve.features.neurons import choose_layers, layer_aucs, roc_auc

    # pairs (pos, neg): 3 beats 2, 0, 1; 1 beats 0, ties 1, loses to 2: (3 + 1.5) / 6
    assert roc_auc(np.array([3.0, 1.0]), np.array([2.0, 0.0, 1.0])) == 0.75
    assert roc_auc(np.array([5.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
    assert np.isnan(roc_auc(np.array([]), np.array([1.0])))
    held = np.array([[3.0, 0.0], [1.0, 0.0]])
    pool = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(layer_aucs(held, pool), [0.75, 0.0])
    aucs = np.array([[0.5, 0.9, 0.7, 0.9], [np.nan, 0.2, 0.6, 0.1]])
    np.testing.assert_array_equal(choose_layers(aucs, 2), [[0, 1, 0, 1], [0, 1, 1, 0]])
    np.testing.assert_array_equal(choose_layers(np.array([[0.8, 0.8, 0.8]]), 2), [[1, 1, 0]])  # ties: earlier
    np.testing.assert_array_equal(choose_layers(aucs, 9), np.ones((2, 4)))


def brute_auc(pos, neg) -> float:
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg]))


def robust_setup(loaded: LoadedModel):
    """The robust-preset tests' case: layers [0, 1] (below the last block, see
    test_nait_matches_hand_computed_pca_and_projection), a 7-example pool, a 6-example target,
    their unbatched last_user drifts and the target's seed-2 fit / held-out split by id."""
    from mechsieve.scorers.baselines import hashed_uniform

    layers = [0, 1]
    pool, target = make_pool(7), make_pool(6, start=1, source="gsm8k")
    t = np.stack([reference_drifts(loaded, ex, layers, "resid", "last_user") for ex in target.examples])
    p = np.stack([reference_drifts(loaded, ex, layers, "resid", "last_user") for ex in pool.examples])
    rank = hashed_uniform([ex.id for ex in target.examples], 2)
    order = sorted(range(6), key=lambda i: (rank[i], i))
    return layers, pool, target, t, p, order[:3], order[3:]


def test_robust_preset_with_pca_matches_a_hand_computed_layer_choice(loaded):
    """robust with direction=pca: anchor last_user, cosine, target z-normalisation, the better of
    2 layers by held-out AUC; every step recomputed here from unbatched drifts."""
    layers, pool, target, t, p, fit, held = robust_setup(loaded)

    def cos(x, v):
        return (x @ v) / np.linalg.norm(x, axis=1)

    aucs = []
    for k in range(2):
        v = hand_pca(t[fit, k])
        aucs.append(brute_auc(cos(t[held, k], v), cos(p[:, k], v)))
    kept = [int(np.argmax(aucs))]
    assert kept == [1] and aucs[0] < aucs[1]  # with this seed the choice drops layer 0, by its AUC
    v = hand_pca(t[:, 1])
    ct = cos(t[:, 1], v)
    expected = (cos(p[:, 1], v) - ct.mean()) / ct.std()
    res = make_scorer("nait", {"layers": layers, "layer_top": 1, "direction": "pca"}).score(
        pool, target=target, loaded=loaded, seed=2, progress=False)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-4)
    ex = res.explanations
    assert ex["kept_layers"] == {"gsm8k": kept} and ex["layers"] == kept and ex["anchor"] == "last_user"
    np.testing.assert_allclose(list(ex["layer_auc"]["gsm8k"].values()), aucs, atol=1e-4)
    assert list(ex["layer_auc"]["gsm8k"]) == ["0", "1"]
    assert ex["layer_auc_sizes"]["gsm8k"] == {"fit": 3, "held_out": 3, "pool": 7}
    # a pool sample of 3 (seeded by id): other AUCs, the same sizes recorded
    few = make_scorer("nait", {"layers": layers, "layer_top": 1, "layer_pool": 3, "direction": "pca"}).score(
        pool, target=target, loaded=loaded, seed=2, progress=False)
    assert few.explanations["layer_auc_sizes"]["gsm8k"]["pool"] == 3
    # a target too small to split keeps every layer
    small = make_scorer("nait", {"layers": layers, "layer_top": 1, "direction": "pca"}).score(
        pool, target=make_pool(2, start=1, source="gsm8k"), loaded=loaded, progress=False)
    assert small.explanations["kept_layers"] == {"gsm8k": [0, 1]}


def test_contrast_direction_by_hand():
    from mechsieve.features.neurons import contrast_component, fit_directions

    x = np.array([[3.0, 1.0], [1.0, 3.0]])  # mean (2, 2); reference (1, 2): contrast (1, 0)
    v, share = contrast_component(x, np.array([1.0, 2.0]))
    np.testing.assert_allclose(v, [1.0, 0.0])
    assert share == pytest.approx((4 + 0) / (4 + 1 + 0 + 1))  # centred rows (2, -1), (0, 1)
    with pytest.raises(Exception, match="equals the reference"):
        contrast_component(x, np.array([2.0, 2.0]))
    dirs = fit_directions({"t": x[:, None, :]}, [0], direction="contrast", centre=np.array([[1.0, 2.0]]))
    np.testing.assert_allclose(dirs.directions[0, 0], [1.0, 0.0])
    np.testing.assert_allclose(dirs.centre, [[1.0, 2.0]])
    np.testing.assert_allclose([dirs.proj_mean[0, 0], dirs.proj_std[0, 0]], [1.0, 1.0])  # projections 2, 0
    with pytest.raises(ValueError, match="centre"):
        fit_directions({"t": x[:, None, :]}, [0], direction="contrast")


def test_robust_preset_matches_a_hand_computed_contrast(loaded):
    """robust with direction=contrast: the reference is the mean drift of a seeded pool sample; for
    the layer choice its first half is the fit's reference and its second half the comparison;
    every drift is centred on the reference before its cosine; all recomputed here."""
    from mechsieve.scorers.baselines import hashed_uniform

    layers, pool, target, t, p, fit, held = robust_setup(loaded)
    draw = hashed_uniform([ex.id for ex in pool.examples], 3)
    sample = sorted(range(7), key=lambda i: (draw[i], i))
    ref_fit, compare = p[sample[:4]].mean(0), p[sample[4:]]

    def cos(x, v, c):
        return ((x - c) @ v) / np.linalg.norm(x - c, axis=1)

    def unit(m):
        return m / np.linalg.norm(m)

    aucs = []
    for k in range(2):
        v = unit(t[fit, k].mean(0) - ref_fit[k])
        aucs.append(brute_auc(cos(t[held, k], v, ref_fit[k]), cos(compare[:, k], v, ref_fit[k])))
    k = int(np.argmax(aucs))
    centre = p.mean(0)
    v = unit(t[:, k].mean(0) - centre[k])
    ct = cos(t[:, k], v, centre[k])
    expected = (cos(p[:, k], v, centre[k]) - ct.mean()) / ct.std()
    res = make_scorer("nait", {"layers": layers, "layer_top": 1, "direction": "contrast"}).score(
        pool, target=target, loaded=loaded, seed=2, progress=False)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-4)
    ex = res.explanations
    assert ex["direction"] == "contrast" and ex["reference_examples"] == 7 and ex["kept_layers"] == {"gsm8k": [k]}
    np.testing.assert_allclose(list(ex["layer_auc"]["gsm8k"].values()), aucs, atol=1e-4)
    assert ex["layer_auc_sizes"]["gsm8k"] == {"fit": 3, "held_out": 3, "pool": 3}
    # the same without the layer choice: both layers summed, the full reference
    both = make_scorer("nait", {"layers": layers, "layer_select": "none", "direction": "contrast"}).score(pool, target=target, loaded=loaded,
                                                                                seed=2, progress=False)
    total = 0.0
    for k in range(2):
        v = unit(t[:, k].mean(0) - centre[k])
        ct = cos(t[:, k], v, centre[k])
        total = total + (cos(p[:, k], v, centre[k]) - ct.mean()) / ct.std()
    np.testing.assert_allclose(both.scores, total, rtol=1e-4, atol=1e-4)


def test_presets_fill_unset_fields_and_refuse_bad_values():
    from mechsieve.config import ConfigError
    from mechsieve.scorers.nait import NaitConfig

    robust, paper = NaitConfig(), NaitConfig(preset="paper")
    assert (robust.anchor, robust.drift, robust.similarity, robust.normalize, robust.layer_select) == (
        "last_user", "last", "cosine", "target", "auc")
    assert (paper.anchor, paper.drift, paper.similarity, paper.normalize, paper.layer_select) == (
        "first_content", "last", "dot", "none", "none")
    assert (robust.direction, paper.direction) == ("pca", "pca")
    assert NaitConfig(preset="paper", similarity="cosine").similarity == "cosine"  # explicit wins
    with pytest.raises(ConfigError, match="nait.anchor.*last_user"):
        NaitConfig(anchor="first")
    with pytest.raises(ConfigError, match="nait.layer_select"):
        NaitConfig(layer_select="best")
    with pytest.raises(ConfigError, match="backwards"):
        NaitConfig(anchor="response", drift="last_prompt")
    with pytest.raises(ConfigError, match="layer_top"):
        NaitConfig(layer_top=0)


def test_anchor_is_in_the_feature_key(loaded):
    from mechsieve.scorers.common import pass_key
    from mechsieve.scorers.nait import DriftProjection, NaitConfig

    dirs = CapabilityDirections(["t"], [0], np.ones((1, 1, 32), np.float32), *[np.zeros((1, 1))] * 5)
    keys = {DriftProjection(pass_key(NaitConfig()), "last", dirs, "cpu", anchor=a).full_key()["settings"]["anchor"]
            for a in ("last_user", "response", "first_content")}
    assert keys == {"last_user", "response", "first_content"}


def test_robust_artefact_keeps_its_layers_and_legacy_artefacts_load_as_paper(loaded, tmp_path):
    import json

    pool, target = make_pool(5), make_pool(6, start=1, source="gsm8k")
    settings = {"layers": [0, 1, 2], "layer_top": 1}
    fitted = make_scorer("nait", {**settings, "save_directions": str(tmp_path / "r")}).score(
        pool, target=target, loaded=loaded, progress=False)
    art = CapabilityDirections.load(tmp_path / "r")
    assert art.layers == fitted.explanations["layers"] and len(art.layers) == 1
    np.testing.assert_array_equal(art.layer_mask, [[1.0]])
    reused = make_scorer("nait", {**settings, "directions": str(tmp_path / "r")}).score(
        pool, target=None, loaded=loaded, progress=False)
    np.testing.assert_allclose(reused.scores, fitted.scores, rtol=1e-6)
    with pytest.raises(SettingsMismatch, match="anchor"):
        make_scorer("nait", {**settings, "anchor": "response", "directions": str(tmp_path / "r")}).score(
            pool, loaded=loaded, progress=False)
    # an artefact saved before anchors and layer choice existed was made as the paper preset is
    paper = {"preset": "paper", "layers": [0, 2]}
    make_scorer("nait", {**paper, "save_directions": str(tmp_path / "p")}).score(
        pool, target=target, loaded=loaded, progress=False)
    meta_path = tmp_path / "p" / "nait_directions.json"
    meta = json.loads(meta_path.read_text())
    del meta["settings"]["anchor"], meta["settings"]["layer_select"]
    meta_path.write_text(json.dumps(meta))
    make_scorer("nait", {**paper, "directions": str(tmp_path / "p")}).score(pool, loaded=loaded, progress=False)
    with pytest.raises(SettingsMismatch, match="anchor"):
        make_scorer("nait", {"layers": [0, 2], "directions": str(tmp_path / "p")}).score(
            pool, loaded=loaded, progress=False)
