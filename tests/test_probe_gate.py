"""The probe gate of the concept scorers (held-out separation per layer, `probe.layer=auto`, the
warning below `probe.gate`), their `render` settings, and ProjectionDiff's stop tokens.

Pure parts on synthetic activations; the rest on the tiny Llama of conftest."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import build_model
from conftest import probe_pool as _pool
from mechsieve.config import ConfigError, from_dict, parse_override, set_path
from mechsieve.features.probes import (
    Concept,
    ConceptConfig,
    ProbeGateWarning,
    choose_layer,
    fit_concept,
    gate_report,
    load_concept,
    save_concept,
    separation_by_layer,
)

NOT_READABLE = "this concept is not linearly readable here; attribution through it is unreliable"


MATH = ["The answer is 12 + 30 = 42.", "48 + 24 = 72 clips in May.", "How many clips? #### 72"]
CODE = ["def similar_elements(a, b):", "return tuple(set(a) & set(b))", "Once upon a time there was a little dog."]


def _contrast(tag: str, texts: list[str], n: int = 12):
    """n examples answering with two of `texts`; every third one draws from both sides (a
    contrast that separates well on held-out examples, but not perfectly). The prompts end in
    `tag`, so the two sides share none (no contrast pairs: the side-by-side split)."""
    from mechsieve.data.records import Example, Pool

    exs = []
    for i in range(n):
        src = texts if i % 3 else MATH + CODE
        exs.append(Example(f"{tag}{i}", "s", [{"role": "user", "content": "Natalia sold clips " * (i % 3 + 1) + tag}],
                           f"{src[i % len(src)]} {src[(7 * i + 1) % len(src)]}"))
    return Pool(exs, "mem", "memory", "messages")


def _layers_where_only(separating: int, n_layers: int = 3, n: int = 200, d: int = 4, seed: int = 0):
    """[L, n, d] positives and negatives: Gaussian noise, positives shifted by 10 along dim 0 at
    layer `separating` only (-1: nowhere)."""
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(size=(n_layers, n, d)), rng.normal(size=(n_layers, n, d))
    if separating >= 0:
        pos[separating, :, 0] += 10.0
    return pos, neg


# --- pure: separation per layer, the choice, the gate ---------------------------------------

@pytest.mark.timeout(60)
def test_contrast_pairs_are_held_out_together():
    """Each prompt answered with and without the behaviour: a large prompt-specific part shared by
    the twins, the behaviour a small shift. Held out side by side, every held-out positive's twin
    trains the direction as a negative, and the separation reads below chance; held out by prompt
    (groups), the shift separates them all."""
    from mechsieve.features.probes import held_out_separation

    rng = np.random.default_rng(0)
    content = 10.0 * rng.normal(size=(12, 8))
    content[:, 0] *= 0.01  # the prompts barely vary along the behaviour's axis
    pos, neg = content.copy(), content.copy()
    pos[:, 0] += 1.0
    cfg = ConceptConfig(holdout=0.25, seed=0)
    prompts = [f"p{i}" for i in range(12)]
    assert held_out_separation(pos, neg, cfg) < 0.5
    assert held_out_separation(pos, neg, cfg, groups=(prompts, prompts)) == 1.0
    # by hand: 3 of the 12 prompts held out (both sides), the direction the mean difference of the
    # other 9 pairs, which is exactly the shift: positives score 1 + 0.1 x noise, negatives the noise
    assert fit_concept(pos, neg, 0, cfg, groups=(prompts, prompts)).separation == 1.0
    # sides that share no prompt keep the side-by-side split, number for number
    other = [f"q{i}" for i in range(12)]
    assert held_out_separation(pos, neg, cfg, groups=(prompts, other)) == held_out_separation(pos, neg, cfg)
    # per block, the same grouped split: a block where the prompts vary along the axis too
    loud_pos, loud_neg = pos.copy(), neg.copy()
    loud_pos[:, 0] += 10.0 * rng.normal(size=12)
    loud_neg[:, 0] = loud_pos[:, 0] - 1.0
    seps = separation_by_layer(np.stack([pos, loud_pos]), np.stack([neg, loud_neg]), cfg, groups=(prompts, prompts))
    assert seps[0] == 1.0
    assert seps[1] == held_out_separation(loud_pos, loud_neg, cfg, groups=(prompts, prompts)) < 1.0
    with pytest.raises(ValueError, match="labels for"):
        held_out_separation(pos, neg, cfg, groups=(prompts[:5], prompts))


@pytest.mark.timeout(60)
def test_auto_picks_the_only_separating_layer():
    pos, neg = _layers_where_only(2)
    cfg = ConceptConfig(layer="auto", holdout=0.5)
    seps = separation_by_layer(pos, neg, cfg)
    assert sorted(seps) == [0, 1, 2]
    # a 10-sigma shift: every held-out positive scores above every held-out negative
    assert seps[2] == 1.0
    # noise: 100 x 100 held-out pairs, AUC ~ 0.5 (sd ~0.04)
    assert abs(seps[0] - 0.5) < 0.15 and abs(seps[1] - 0.5) < 0.15
    assert choose_layer(seps) == 2
    # the numbers are the fixed-layer separations: same seeded split at every layer
    for layer in range(3):
        assert seps[layer] == fit_concept(pos[layer], neg[layer], layer, cfg).separation
    # layer names are the blocks the rows were read at
    named = separation_by_layer(pos, neg, cfg, layers=[4, 7, 9])
    assert list(named.values()) == list(seps.values()) and choose_layer(named) == 9
    with pytest.raises(ValueError, match=r"\[L, n, d\]"):
        separation_by_layer(pos[0], neg[0], cfg)


@pytest.mark.timeout(30)
def test_choose_layer_ties_go_to_the_earlier_block_and_unmeasured_ones_are_skipped():
    assert choose_layer({0: 0.8, 1: 0.9, 2: 0.9}) == 1
    assert choose_layer({5: 0.9, 3: 0.9}) == 3
    assert choose_layer({0: None, 1: 0.6, 2: 0.55}) == 1
    from mechsieve.data.readers import DataError

    with pytest.raises(DataError, match="at least 2 positive and 2 negative"):
        choose_layer({0: None, 1: None})


@pytest.mark.timeout(60)
def test_gate_warns_when_no_layer_reaches_it():
    from mechsieve.scorers.concept import check_gate

    pos, neg = _layers_where_only(-1)
    cfg = ConceptConfig(layer="auto", holdout=0.5)
    seps = separation_by_layer(pos, neg, cfg)
    best = choose_layer(seps)
    assert max(seps.values()) < 0.7
    concept = fit_concept(pos[best], neg[best], best, cfg)
    concept.separation_by_layer = seps
    with pytest.warns(ProbeGateWarning) as caught:
        report = check_gate(concept, 0.7)
    assert report["readable"] is False and report["layer"] == best and report["gate"] == 0.7
    assert report["separation_by_layer"] == seps
    text = report["warning"]
    assert str(caught[0].message) == text
    assert text.startswith(f"concept at block {best}: held-out separation {seps[best]:.2f} < 0.7: {NOT_READABLE}")
    shown = ", ".join(f"{b}: {s:.2f}" for b, s in sorted(seps.items()))
    assert f"blocks tried: {shown}" in text


@pytest.mark.timeout(30)
def test_gate_boundary_and_unmeasured_separation():
    def concept(sep):
        return Concept(np.ones(3, np.float32), 1, separation=sep, separation_by_layer={1: sep})

    # reaching the gate exactly is readable, no warning
    at = gate_report(concept(0.7), 0.7)
    assert at["readable"] is True and at["warning"] is None
    below = gate_report(concept(0.69), 0.7)
    assert below["readable"] is False
    assert below["warning"].startswith(f"concept at block 1: held-out separation 0.69 < 0.7: {NOT_READABLE}")
    assert "blocks tried" not in below["warning"]  # one block: named at the start
    unknown = gate_report(concept(None), 0.7)
    assert unknown["readable"] is False and "could not be measured" in unknown["warning"]
    # a concept made by hand, without separation_by_layer: its own block's separation
    bare = gate_report(Concept(np.ones(3, np.float32), 2, separation=0.9), 0.7)
    assert bare["separation_by_layer"] == {2: 0.9} and bare["readable"] is True


@pytest.mark.timeout(30)
def test_layer_auto_and_ints_from_set_and_config_checks():
    from mechsieve.scorers.concept import ProjectionDiffConfig, VectorFilterConfig

    def parsed(*texts):
        data: dict = {}
        for text in texts:
            set_path(data, *parse_override(text))
        return from_dict(VectorFilterConfig, data)

    auto = parsed("probe.layer=auto", "probe.layers=[0, -1]", "probe.gate=0.8")
    assert auto.probe.layer == "auto" and auto.probe.layers == [0, -1] and auto.probe.gate == 0.8
    assert parsed("probe.layer=2").probe.layer == 2 and parsed().probe.layer == -4
    assert parsed().probe.layers == "all"
    assert from_dict(ProjectionDiffConfig, {"probe": {"layer": "auto"}}).probe.layer == "auto"
    with pytest.raises(ConfigError, match="concept.layer='top'"):
        ConceptConfig(layer="top")
    with pytest.raises(ConfigError, match="concept.holdout=0"):
        ConceptConfig(layer="auto", holdout=0.0)
    with pytest.raises(ConfigError, match="concept.method=sae"):
        ConceptConfig(layer="auto", method="sae", sae_decoder="d.npy", sae_feature=0)
    with pytest.raises(ConfigError, match="concept.gate=1.5"):
        ConceptConfig(gate=1.5)
    with pytest.raises(ConfigError, match="concept.layers is empty"):
        ConceptConfig(layer="auto", layers=[])


# --- saved concepts ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_saved_concept_round_trips_separation_by_layer_and_old_json_loads(tmp_path):
    rng = np.random.default_rng(0)
    concept = fit_concept(rng.normal(size=(6, 4)) + 2.0, rng.normal(size=(6, 4)), 2, ConceptConfig())
    concept.separation_by_layer = {0: 0.5, 1: None, 2: concept.separation}
    save_concept(tmp_path / "c", concept)
    back = load_concept(tmp_path / "c")
    assert back.separation_by_layer == {0: 0.5, 1: None, 2: concept.separation}
    assert all(isinstance(b, int) for b in back.separation_by_layer)
    # a concept saved before the probe gate: no separation_by_layer in its JSON
    meta_path = tmp_path / "c" / "concept.json"
    meta = json.loads(meta_path.read_text())
    del meta["separation_by_layer"]
    meta_path.write_text(json.dumps(meta))
    old = load_concept(tmp_path / "c")
    assert old.layer == 2 and old.separation == concept.separation
    assert old.separation_by_layer == {2: concept.separation}
    np.testing.assert_array_equal(old.direction, concept.direction)
    meta["separation"] = None
    meta_path.write_text(json.dumps(meta))
    unmeasured = load_concept(tmp_path / "c")
    assert unmeasured.separation_by_layer == {2: None}
    assert gate_report(unmeasured, 0.7)["readable"] is False


# --- on the tiny model ----------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_fixed_layer_reports_exactly_one_entry(loaded, tmp_path):
    from mechsieve.scorers.concept import ConceptSource, build_concept
    from mechsieve.scorers.registry import make_scorer

    pos, neg = _contrast("p", MATH), _contrast("n", CODE)
    src = ConceptSource(max_len=64, probe=ConceptConfig(layer=-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeGateWarning)  # separable: no warning
        concept = build_concept(loaded, pos, neg, src, progress=False)
    assert concept.layer == 1 and concept.separation is not None and concept.separation >= 0.7
    assert concept.separation_by_layer == {1: concept.separation}
    assert gate_report(concept, 0.7)["readable"] is True
    # no hold-out: unmeasured, so a warning and not readable, in the scorer's explanations too
    with pytest.warns(ProbeGateWarning, match="could not be measured"):
        flat = build_concept(loaded, pos, neg, ConceptSource(max_len=64, probe=ConceptConfig(layer=1, holdout=0.0)),
                             progress=False)
    assert flat.separation_by_layer == {1: None}
    save_concept(tmp_path / "c", flat)
    with pytest.warns(ProbeGateWarning, match="could not be measured"):
        res = make_scorer("vector-filter", {"concept_dir": str(tmp_path / "c"), "max_len": 64}).score(
            _pool(4, "x"), loaded=loaded, progress=False)
    gate = res.explanations["probe_gate"]
    assert gate["separation_by_layer"] == {1: None} and gate["layer"] == 1 and gate["gate"] == 0.7
    assert gate["readable"] is False and gate["warning"].startswith("concept at block 1: held-out separation")


@pytest.mark.timeout(180)
def test_auto_layer_reads_every_block_in_one_pass_per_side_and_matches_the_fixed_path(loaded, monkeypatch):
    import mechsieve.capture.activations as activations
    from mechsieve.scorers.concept import ConceptSource, build_concept

    calls = []
    real = activations.capture

    def counting(model, rendered, cfg=None, **kw):
        calls.append(list(cfg.layers))
        return real(model, rendered, cfg, **kw)

    monkeypatch.setattr(activations, "capture", counting)
    pos, neg = _contrast("p", MATH), _contrast("n", CODE)
    auto_src = ConceptSource(max_len=64, probe=ConceptConfig(layer="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeGateWarning)  # readable: no warning
        auto = build_concept(loaded, pos, neg, auto_src, progress=False)
    assert calls == [[0, 1, 2], [0, 1, 2]]  # one capture per side, all three blocks
    seps = auto.separation_by_layer
    assert sorted(seps) == [0, 1, 2] and all(0.7 <= s <= 1.0 for s in seps.values())
    assert auto.layer == choose_layer(seps) and auto.separation == seps[auto.layer]
    # each block's number is what a fixed-layer concept there reports; the fit at the pick is the same
    for layer in range(3):
        fixed = build_concept(loaded, pos, neg, ConceptSource(max_len=64, probe=ConceptConfig(layer=layer)),
                              progress=False, use_cache=False)
        assert fixed.separation_by_layer == {layer: seps[layer]}
        if layer == auto.layer:
            np.testing.assert_allclose(fixed.direction, auto.direction, rtol=1e-6)
    # cached: the same settings give the saved concept back without a pass (the gate is no part of the key)
    n_calls = len(calls)
    with pytest.warns(ProbeGateWarning, match="blocks tried: 0: "):  # the stricter gate is applied, though
        again = build_concept(loaded, pos, neg, ConceptSource(max_len=64, probe=ConceptConfig(layer="auto", gate=1.0)),
                              progress=False)
    assert len(calls) == n_calls and again.separation_by_layer == seps and again.layer == auto.layer
    # other candidates: another cache entry, read in its own pass
    two = build_concept(loaded, pos, neg, ConceptSource(max_len=64, probe=ConceptConfig(layer="auto", layers=[0, 2])),
                        progress=False)
    assert calls[n_calls:] == [[0, 2], [0, 2]]
    assert two.separation_by_layer == {0: seps[0], 2: seps[2]}


@pytest.mark.timeout(120)
def test_render_settings_reach_the_concept_pass(loaded):
    from mechsieve.data.render import RenderConfig, render_example
    from mechsieve.scorers.concept import (
        ConceptSource,
        VectorFilterConfig,
        build_concept,
        concept_pass_key,
        mean_response_acts,
    )

    cfg = from_dict(VectorFilterConfig, {"render": {"max_len": 24, "template": "plain"}})
    want = RenderConfig(max_len=24, template="plain")
    assert cfg.max_len == 24 and concept_pass_key(cfg).render == want
    assert type(concept_pass_key(cfg).render) is RenderConfig  # shares its pass with other scorers

    def manual(ex, rcfg):
        r = render_example(ex, loaded.tokenizer, rcfg)
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.from_numpy(r.input_ids)[None], output_hidden_states=True).hidden_states
        mask = torch.from_numpy(r.response_mask)
        return np.zeros(32) if not mask.any() else hs[2][0][mask].double().mean(0).numpy()

    examples = _pool(6, "x").examples
    acts, _ = mean_response_acts(loaded, examples, 1, cfg, progress=False)
    np.testing.assert_allclose(acts, np.stack([manual(e, want) for e in examples]), rtol=1e-4, atol=1e-5)
    default, _ = mean_response_acts(loaded, examples, 1, ConceptSource(), progress=False)
    assert not np.allclose(acts, default)  # the settings changed what was read
    # chat template cut at 24 tokens: prompts of 17, 21, 25 tokens; those of 25 keep no response
    cut = ConceptSource(render=from_dict(VectorFilterConfig, {"render": {"max_len": 24}}).render,
                        probe=ConceptConfig(layer=1, holdout=0.0))
    pos, neg = _pool(6, "p"), _pool(6, "n", shift=1)
    with pytest.warns(ProbeGateWarning):
        concept = build_concept(loaded, pos, neg, cut, progress=False)
    expected = sum(int(render_example(e, loaded.tokenizer, RenderConfig(max_len=24)).response_mask.sum() == 0)
                   for e in pos.examples + neg.examples)
    assert expected == 4 and concept.counts["dropped_without_response"] == 4
    assert concept.counts["positive"] == 4 and concept.counts["negative"] == 4


@pytest.mark.timeout(30)
def test_max_len_is_the_old_spelling_of_render_max_len():
    from mechsieve.data.render import RenderConfig
    from mechsieve.scorers.concept import ProjectionDiffConfig, VectorFilterConfig, render_config

    old = from_dict(VectorFilterConfig, {"max_len": 64})
    assert old.render.max_len == 64 and render_config(old) == RenderConfig(max_len=64)
    new = from_dict(VectorFilterConfig, {"render": {"max_len": 100}})
    assert new.max_len == 100
    same = from_dict(VectorFilterConfig, {"max_len": 64, "render": {"max_len": 64}})
    assert same.max_len == same.render.max_len == 64
    # a render section without max_len keeps these scorers' 256, not RenderConfig's 512
    plain = from_dict(ProjectionDiffConfig, {"render": {"template": "plain"}})
    assert plain.render.max_len == plain.max_len == 256 and plain.render.template == "plain"
    with pytest.raises(ConfigError, match=r"max_len=64 and render\.max_len=128"):
        from_dict(VectorFilterConfig, {"max_len": 64, "render": {"max_len": 128}})
    # the older call of the gradient scorers: a bare length
    assert render_config(80) == RenderConfig(max_len=80)


@pytest.mark.timeout(120)
def test_sample_responses_stop_at_a_stop_token(tokenizer):
    """A rigged Llama whose next token depends only on the current one (attention and MLP outputs
    zeroed, one-hot embeddings): after the prompt it says a, b, <|im_end|>, c, c, ... The sample
    must end at <|im_end|> (a stop token, though not the model's eos), without the c's."""
    from mechsieve.data.render import RenderConfig, render_example
    from mechsieve.evaluate.generate import stop_ids
    from mechsieve.models.loading import LoadedModel
    from mechsieve.scorers.concept import sample_responses

    examples = _pool(3, "x").examples
    last = int(render_example(examples[0], tokenizer, RenderConfig(), add_generation_prompt=True).input_ids[-1])
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop in stop_ids(tokenizer) and stop != 2
    words = [t for t in tokenizer.encode("Natalia sold clips", add_special_tokens=False) if t not in (last, stop)]
    a, b, c = words[:3]
    chain = [last, a, b, stop, c]
    model = build_model("llama", len(tokenizer))
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, token in enumerate(chain):
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(k), 32).float()
            model.lm_head.weight[chain[min(k + 1, len(chain) - 1)], k] = 10.0
        ids = torch.tensor([[last]])
        free = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=0, pad_token_id=3)
    assert free[0, 1:].tolist() == [a, b, stop, c, c, c]  # the rig: it would go on past the stop token
    loaded = LoadedModel(model, tokenizer, {"name": "rigged", "kind": "test"})
    expected = tokenizer.decode([a, b], skip_special_tokens=True)
    assert expected.strip()
    for temperature in (0.0, 1.0):
        own = sample_responses(loaded, examples, 6, temperature, 0, progress=False)
        assert own == [expected] * 3


@pytest.mark.timeout(120)
def test_attribute_concept_layer_flag_takes_auto_and_ints():
    import argparse

    from mechsieve.commands.attribute import _layer, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--concept-layer", "auto"]).layer == "auto"
    assert p.parse_args(["--layer", "-3"]).layer == -3
    with pytest.raises(argparse.ArgumentTypeError, match="block index or auto"):
        _layer("middle")
