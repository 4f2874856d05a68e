"""Capture: hook points agree with the model's own outputs, reductions with hand computations,
and batching, padding side, early stop and resume change nothing."""

import numpy as np
import pytest
import torch

from conftest import ARCH_CONFIGS, FOUR_ARCHS
from mechsieve.capture import CaptureConfig, capture, collate, plan_batches
from mechsieve.capture.reductions import REDUCTIONS
from mechsieve.data import Example, RenderConfig, render_pool
from mechsieve.models.hooks import hook_points
from mechsieve.store import ChunkedWriter

PROMPTS = ["How many clips?", "Write a function to find the similar elements.",
           "The patient presents with fever.", "Once upon a time"]
RESPONSES = ["48 / 2 = 24 clips. The answer is 72", "def f(a, b): return a",
             "Most likely diagnosis: flu", "there was a little dog who liked to play in the park"]


@pytest.fixture(scope="module")
def rendered(tokenizer):
    exs = [Example(str(i), "s", [{"role": "user", "content": p}], r)
           for i, (p, r) in enumerate(zip(PROMPTS * 2, RESPONSES[::-1] + RESPONSES))]
    out, _ = render_pool(exs, tokenizer, RenderConfig(max_len=128))
    assert len({len(r) for r in out}) > 3  # varied lengths, so padding really happens
    return out


def one(model, r, tok_pad=3, **kw):
    return capture(model, [r], CaptureConfig(**kw), pad_id=tok_pad, progress=False)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_residual_equals_hidden_states(make_model, rendered, arch):
    model = make_model(arch)
    r = rendered[0]
    res = one(model, r, layers="all", reductions=["mean_all"])
    with torch.no_grad():
        hs = model(input_ids=torch.tensor(r.input_ids)[None], output_hidden_states=True).hidden_states
    n = hook_points(model).n_layers
    for layer in range(n - 1):  # the last entry of hidden_states is after the final norm
        np.testing.assert_allclose(res.arrays["mean_all"][0, layer], hs[layer + 1][0].mean(0).numpy(), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_mlp_neurons_equal_manual_computation(make_model, rendered, arch):
    model = make_model(arch)
    r = rendered[1]
    hp = hook_points(model)
    layer = 1
    # Manual: the block's input, its pre-MLP norm path, then the MLP up to (not including) the down projection.
    seen = {}
    block = hp.block(layer)
    mlp = hp.mlp_down(layer)
    parent = block.mlp
    h = parent.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp_in", i[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor(r.input_ids)[None])
    h.remove()
    x = seen["mlp_in"][0]
    with torch.no_grad():
        if arch in ("llama", "gemma2"):
            manual = parent.act_fn(parent.gate_proj(x)) * parent.up_proj(x)
        elif arch == "gpt2":
            manual = parent.act(parent.c_fc(x))
        else:
            manual = parent.act(parent.dense_h_to_4h(x))
    res = one(model, r, layers=[layer], site="mlp", reductions=["mean_all", "last"])
    d_mlp = mlp.in_features if hasattr(mlp, "in_features") else mlp.weight.shape[0]
    assert res.arrays["last"].shape == (1, 1, d_mlp) == (1, 1, manual.shape[-1])
    np.testing.assert_allclose(res.arrays["mean_all"][0, 0], manual.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(res.arrays["last"][0, 0], manual[-1].numpy(), atol=1e-5)


def test_reductions_by_hand(tokenizer):
    # Two rows, right and left padded; d = 1 so every value is checkable by eye.
    from mechsieve.data.render import Rendered

    a = Rendered(np.array([1, 5, 6, 7, 8]), np.array([0, 0, 0, 1, 1], bool), prompt_len=3, content_start=1)
    b = Rendered(np.array([1, 9, 9]), np.array([0, 0, 1], bool), prompt_len=2, content_start=1)
    for side in ("right", "left"):
        batch = collate([a, b], pad_id=0, padding_side=side)
        values = torch.zeros(2, 5, 1)
        for row, n in enumerate([5, 3]):
            off = int(batch.offsets[row])
            values[row, off:off + n, 0] = torch.arange(1, n + 1, dtype=torch.float) * (10 if row else 1)
            # padding gets garbage that must never leak into a reduction
            values[row, :off, 0] = 999.0
            values[row, off + n:, 0] = 999.0
        got = {name: fn(values, batch)[:, 0].tolist() for name, fn in REDUCTIONS.items()}
        assert got["last_prompt"] == [3.0, 20.0]
        assert got["mean_response"] == [4.5, 30.0]
        assert got["mean_prompt"] == [2.0, 15.0]
        assert got["mean_all"] == [3.0, 20.0]
        assert got["last"] == [5.0, 30.0]
        assert got["drift"] == [5.0 - 2.0, 30.0 - 20.0]


@pytest.mark.parametrize("arch", FOUR_ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_at_a_time(make_model, rendered, tokenizer, arch, side):
    model = make_model(arch)
    kw = dict(layers=[0, -1], reductions=list(REDUCTIONS))
    batched = capture(model, rendered, CaptureConfig(max_tokens=512, padding_side=side, **kw),
                      pad_id=tokenizer.pad_token_id, progress=False)
    assert max(len(b) for b in batched.plan.batches) > 1
    singles = [one(model, r, tok_pad=tokenizer.pad_token_id, **kw) for r in rendered]
    for name in REDUCTIONS:
        stacked = np.concatenate([s.arrays[name] for s in singles])
        np.testing.assert_allclose(batched.arrays[name], stacked, atol=1e-5, err_msg=name)


def test_early_stop_gives_identical_activations(make_model, rendered, tokenizer):
    model = make_model("llama")
    shallow = capture(model, rendered, CaptureConfig(layers=[0], reductions=["mean_all"]),
                      pad_id=tokenizer.pad_token_id, progress=False)
    calls = []
    h = hook_points(model).block(2).register_forward_hook(lambda *a: calls.append(1))
    deep = capture(model, rendered, CaptureConfig(layers="all", reductions=["mean_all"]),
                   pad_id=tokenizer.pad_token_id, progress=False)
    n_deep = len(calls)
    shallow2 = capture(model, rendered, CaptureConfig(layers=[0], reductions=["mean_all"]),
                       pad_id=tokenizer.pad_token_id, progress=False)
    h.remove()
    assert n_deep > 0 and len(calls) == n_deep  # the layer-0 run never reached block 2
    np.testing.assert_array_equal(shallow.arrays["mean_all"][:, 0], deep.arrays["mean_all"][:, 0])
    np.testing.assert_array_equal(shallow.arrays["mean_all"], shallow2.arrays["mean_all"])


def test_plan_batches_budget_and_efficiency():
    lengths = [10, 50, 12, 48, 11, 49]
    plan = plan_batches(lengths, max_tokens=100, max_batch=8)
    # Longest first: (50, 49) fills 100; (48, 12) costs 2 x 48 = 96; (11, 10) the rest.
    assert plan.batches == [[1, 5], [3, 2], [4, 0]]
    assert plan.real_tokens == 180 and plan.padded_tokens == 100 + 96 + 22
    assert plan.padding_efficiency == pytest.approx(180 / 218)
    assert plan_batches(lengths, max_tokens=100, max_batch=1).batches == [[1], [5], [3], [2], [4], [0]]
    assert plan_batches([500], max_tokens=100).batches == [[0]]  # too long: a batch of its own


def test_resume_recomputes_no_finished_chunk(make_model, rendered, tokenizer, tmp_path):
    model = make_model("llama")
    cfg = CaptureConfig(layers=[1], reductions=["mean_response"], max_tokens=64, max_batch=2, chunk_examples=2)
    full = capture(model, rendered, cfg, pad_id=tokenizer.pad_token_id, progress=False)
    writer = ChunkedWriter(tmp_path, "activations", {"k": 1})
    # First run dies after two chunks.
    calls = {"n": 0}
    original = hook_points(model).block(1)

    def die(*a):
        calls["n"] += 1
        if calls["n"] > 2 * 2:  # chunk = 2 examples = 1..2 batches; let a few batches through
            raise KeyboardInterrupt

    h = original.register_forward_hook(die)
    with pytest.raises(KeyboardInterrupt):
        capture(model, rendered, cfg, pad_id=tokenizer.pad_token_id, writer=writer, progress=False)
    h.remove()
    done = writer.done()
    assert 0 < len(done) < len(rendered) // 2
    seen = []
    h = original.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    resumed = capture(model, rendered, cfg, pad_id=tokenizer.pad_token_id,
                      writer=ChunkedWriter(tmp_path, "activations", {"k": 1}), progress=False)
    h.remove()
    assert resumed.resumed_examples == sum(len(writer.read(k)["indices"]) for k in done)
    assert sum(seen) == len(rendered) - resumed.resumed_examples
    np.testing.assert_allclose(resumed.arrays["mean_response"], full.arrays["mean_response"], atol=1e-6)


def test_too_long_for_the_model_is_refused(make_model, tokenizer):
    from mechsieve.data.render import Rendered

    r = Rendered(np.ones(1100, dtype=np.int64), np.ones(1100, bool), 1, 0)
    with pytest.raises(ValueError, match="lower render.max_len to at most 1024"):
        capture(make_model("gpt2"), [r], CaptureConfig(), pad_id=0, progress=False)


def test_capture_config_validation():
    from mechsieve.config import ConfigError

    with pytest.raises(ConfigError, match="capture.reductions"):
        CaptureConfig(reductions=["median"])
    with pytest.raises(ConfigError, match="capture.site"):
        CaptureConfig(site="attn")


def test_hook_points_for_every_architecture(make_model):
    for arch in ARCH_CONFIGS:
        hp = hook_points(make_model(arch))
        assert hp.n_layers == 3 and hp.normalize_layers([-1, 0]) == [0, 2]
        with pytest.raises(ValueError, match="out of range"):
            hp.normalize_layers([3])


def test_no_output_head_unless_logits_are_wanted(make_model, rendered, tokenizer):
    from mechsieve.capture import ForwardSpec, run_forward

    model = make_model("llama")
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    capture(model, rendered, CaptureConfig(layers="all"), pad_id=tokenizer.pad_token_id, progress=False)
    assert calls == []  # stopped after the last block: no final norm, no [b, t, vocab] logits
    seen = []
    plan = plan_batches([len(r) for r in rendered], 512)
    run_forward(model, rendered, plan, ForwardSpec(layers=[2], need_logits=True), tokenizer.pad_token_id,
                on_logits=lambda ctx, logits: seen.append(logits.shape[-1]), progress=False)
    h.remove()
    assert len(calls) == len(plan.batches) and set(seen) == {len(tokenizer)}
