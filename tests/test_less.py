"""LESS: batched LoRA gradients vs a loop, the dense projection, the Adam direction, the trainer's
epoch hook, scores against a from-scratch recomputation, the feature cache, settings, the CLI."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import probe_pool, write_jsonl
from mechsieve.capture.gradients import (
    RademacherProjector,
    lora_modules,
    mean_response_loss,
    per_example_grads,
    per_example_grads_loop,
    project_rows,
)
from mechsieve.config import ConfigError
from mechsieve.data.records import Example, Pool
from mechsieve.data.render import RenderConfig, render_pool
from mechsieve.models.loading import LoadedModel, cache_root
from mechsieve.scorers import ScorerError, make_scorer
from mechsieve.scorers.less import (
    BLOCK_ROWS,
    Less,
    LessConfig,
    _load_checkpoint,
    adam_direction,
    warmup_sample,
)
from mechsieve.store.artefacts import SettingsMismatch
from mechsieve.train import (
    EpochEnd,
    TrainConfig,
    items_from_examples,
    steps_per_epoch,
    train,
    wrap_for_training,
)
from mechsieve.train.loop import lr_lambda
from mechsieve.train.lora import PEFT_DEPRECATION

PAD = 3
FAST = {"proj_dim": 32, "train": {"epochs": 2, "lora_r": 2}, "render": {"max_len": 48}, "max_batch": 4}


def _wrap(model, cfg: TrainConfig):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        return wrap_for_training(model, cfg)


def _lora(make_model, arch: str, seed: int = 0):
    """A LoRA-wrapped copy of a tiny model with random (non-zero) B, so every A gradient is live."""
    model = _wrap(copy.deepcopy(make_model(arch)), TrainConfig(lora_r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_lora_gradients_equal_the_loop(make_model, tokenizer, arch):
    model = _lora(make_model, arch)
    rend = render_pool(probe_pool(7).examples, tokenizer, RenderConfig(max_len=40))[0]
    mods = lora_modules(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [f"{n}.weight" for n, _ in mods] == trainable  # gradient columns follow the parameter order
    ref = per_example_grads_loop(model, rend, mods, mean_response_loss, pad_id=PAD).numpy()
    fast = per_example_grads(model, rend, mods, mean_response_loss, pad_id=PAD, max_tokens=90, max_batch=3)
    assert ref.shape == (7, sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert trainable == [n for n, p in model.named_parameters() if p.requires_grad]  # flags restored


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_mean_response_loss_equals_the_full_logits_loss(make_model, tokenizer, arch):
    """Logits only where a response token is predicted give the same per-example mean loss
    (Gemma-2 included: its logit soft-capping must still apply); a row without response is 0."""
    from mechsieve.capture.batching import collate
    from mechsieve.capture.gradients import token_losses

    model = make_model(arch)
    exs = probe_pool(4).examples
    cut = Example("cut", "s", [{"role": "user", "content": "Natalia sold clips " * 40}], "The answer is 42.")
    rend = render_pool([*exs, cut], tokenizer, RenderConfig(max_len=40))[0]
    batch = collate(rend, PAD)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids).logits
    count = batch.response_mask[:, 1:].sum(1)
    expected = token_losses(full, batch.input_ids, batch.response_mask).sum(1) / count.clamp(min=1)
    got = mean_response_loss(model, batch)
    assert count[-1] == 0 and got[-1] == 0 and (got[:-1] > 1).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lora_modules_refuse_a_model_without_adapter(make_model):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_modules(make_model("llama"))


def test_projection_preserves_inner_products_within_jl_tolerance():
    n, p, d = 12, 3000, 2048
    x = torch.randn(n, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = x / x.norm(dim=1, keepdim=True)
    proj = RademacherProjector(p, d, seed=3, block_rows=700)  # 700 does not divide 3000: a short last block
    y = proj.project(x).double()
    eps = math.sqrt(8 * math.log(n) / d)  # Johnson-Lindenstrauss: d >= 8 ln(n) / eps^2
    err = (y @ y.T - x.double() @ x.double().T).abs()
    assert err.max() < eps, (err.max(), eps)
    assert err.max() > 1e-4  # a real random projection, not the identity
    # block-wise generation is the explicit matrix; row chunks and repeats give the same rows
    r = proj.matrix()
    assert r.shape == (p, d) and torch.allclose(r.abs(), torch.full_like(r, d ** -0.5))
    assert abs(float((r > 0).double().mean()) - 0.5) < 0.01  # fair signs
    np.testing.assert_allclose(y.numpy(), (x @ r).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(proj.project(x[:5]).numpy(), proj.project(x)[:5].numpy())
    other = RademacherProjector(p, d, seed=4, block_rows=700).project(x)
    assert not torch.allclose(other, proj.project(x))
    odd = RademacherProjector(50, 13, seed=1, block_rows=7)  # a dimension that is no multiple of 8
    np.testing.assert_allclose(odd.project(x[:, :50]).numpy(), (x[:, :50] @ odd.matrix()).numpy(), rtol=1e-5, atol=1e-6)


def test_device_unpacking_matches_numpy():
    from mechsieve.capture.gradients import unpack_bits

    packed = np.random.default_rng(0).integers(0, 256, 999, dtype=np.uint8)
    np.testing.assert_array_equal(unpack_bits(torch.from_numpy(packed)).numpy(), np.unpackbits(packed))


def test_project_rows_flushes_under_a_memory_cap():
    p, d = 500, 64
    x = torch.randn(9, p, generator=torch.Generator().manual_seed(1))
    proj = RademacherProjector(p, d, seed=0, block_rows=128)
    stream = [([4, 0], x[[4, 0]]), ([2, 8, 1], x[[2, 8, 1]]), ([3, 5, 6, 7], x[[3, 5, 6, 7]])]
    tiny_cap = 2 * 4 * p / 2**20  # two rows per flush
    out = project_rows(iter(stream), proj, 9, lambda g: 2 * g, memory_mb=tiny_cap)
    ref = proj.project(2 * x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_adam_direction_matches_a_hand_computation():
    # element 0: m=0.1, v=0.04, g=0.5 after 1 step -> t=2:
    #   m = 0.9*0.1 + 0.1*0.5 = 0.14, m_hat = 0.14/0.19; v = 0.999*0.04 + 0.001*0.25 = 0.04021,
    #   v_hat = 0.04021/0.001999 = 20.11506; 0.736842 / (4.484981 + 1e-8) = 0.1642910
    # element 1: m=v=0, g=-0.2 (same step): m_hat = -0.02/0.19 = -0.1052632,
    #   v_hat = 0.00004/0.001999 = 0.0200100, sqrt 0.1414567: -0.7441368
    g = torch.tensor([[0.5, -0.2]], dtype=torch.float64)
    out = adam_direction(g, torch.tensor([0.1, 0.0], dtype=torch.float64),
                         torch.tensor([0.04, 0.0], dtype=torch.float64), 1, (0.9, 0.999), 1e-8)
    np.testing.assert_allclose(out.numpy(), [[0.1642910, -0.7441368]], rtol=1e-6)
    assert g.tolist() == [[0.5, -0.2]]  # the input is not modified


def test_adam_direction_is_the_step_adamw_would_take():
    """From a real AdamW state after 3 steps, the direction for a new gradient g equals
    -(parameter change) / lr of a 4th AdamW step on g (no weight decay)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    for _ in range(3):
        w.grad = torch.randn(6, generator=gen, dtype=torch.float64)
        opt.step()
    state = opt.state[w]
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    expected_before = w.detach().clone()
    direction = adam_direction(g[None], state["exp_avg"].clone(), state["exp_avg_sq"].clone(),
                               int(state["step"]), (0.8, 0.95), 1e-6)[0]
    w.grad = g.clone()
    opt.step()
    np.testing.assert_allclose(direction.numpy(), ((expected_before - w.detach()) / 0.01).numpy(), rtol=1e-9)


def _items(tokenizer, n=6):
    return items_from_examples(probe_pool(n).examples, tokenizer, RenderConfig(max_len=48))


@pytest.mark.parametrize("epochs, accum, steps_at, epochs_at", [
    (2.0, 1, "per,2per", "0,1"),
    (1.5, 1, "per,total", "0,1"),  # a run ending inside an epoch reports it too
    (2.0, 2, "2,3,4", "0,1,2"),  # 3 micro-batches per epoch, 2 per step: steps straddle epochs
])
def test_trainer_reports_each_epoch_end(make_model, tokenizer, epochs, accum, steps_at, epochs_at):
    items = _items(tokenizer)
    cfg = TrainConfig(epochs=epochs, grad_accum=accum, max_batch=2, max_tokens=96, lora_r=2, schedule="linear")
    per = steps_per_epoch(items, cfg)
    total = math.ceil(epochs * per)
    if accum == 2:
        assert per == 2 and total == 4  # (the plan has 3 micro-batches)
    seen: list[tuple[int, int, int, list[float]]] = []

    def hook(ev: EpochEnd) -> None:
        steps = {int(s["step"]) for s in ev.optimizer.state.values()}
        seen.append((ev.epoch, ev.steps, steps.pop(), list(ev.learning_rates)))

    loaded = LoadedModel(copy.deepcopy(make_model("llama")), tokenizer, {"kind": "test"})
    train(loaded, items, cfg, progress=False, on_epoch_end=hook)
    names = {"per": per, "2per": 2 * per, "total": total}
    assert [s[1] for s in seen] == [names.get(k) or int(k) for k in steps_at.split(",")]
    assert [s[0] for s in seen] == [int(k) for k in epochs_at.split(",")]
    assert all(s[1] == s[2] for s in seen)  # the optimizer state is that of the reported step
    f = lr_lambda(cfg, total)
    lrs = [lr for s in seen for lr in s[3]]
    np.testing.assert_allclose(lrs, [cfg.learning_rate * f(s) for s in range(total)])


def test_warmup_sample_is_seeded_and_independent_of_pool_order():
    pool = probe_pool(40).examples
    a = [pool[i].id for i in warmup_sample(pool, 0.05, seed=0)]
    b = [pool[::-1][i].id for i in warmup_sample(pool[::-1], 0.05, seed=0)]
    c = [pool[i].id for i in warmup_sample(pool, 0.05, seed=1)]
    assert a == b and len(a) == 2 and a != c
    assert len(warmup_sample(pool[:3], 0.05, seed=0)) == 1  # at least one example


def _pool_and_target():
    cut = Example("cut", "s", [{"role": "user", "content": "Natalia sold clips " * 40}], "The answer is 42.")
    pool = Pool([*probe_pool(6).examples, cut], "mem", "memory", "messages")
    tgt = probe_pool(4, tag="t", shift=7).examples
    for i, ex in enumerate(tgt):
        ex.source = "a" if i < 3 else "b"  # unequal subtasks: 3 and 1
    return pool, Pool(tgt, "mem", "memory", "messages")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_scores_equal_a_recomputation_from_scratch(loaded):
    """Recompute LESS by hand from the saved warm-up checkpoints: looped gradients, the Adam
    formula in float64, the explicit projection matrix, cosines, lr weights, mean per subtask, max."""
    pool, target = _pool_and_target()
    res = Less(FAST).score(pool, target=target, loaded=loaded, seed=5, progress=False)
    cks = res.explanations["checkpoints"]
    # cosine schedule over 2 steps (1 warm-up example, 1 step per epoch): lr x 1 and lr x 0.5
    assert [c["mean_lr"] for c in cks] == [2e-4, 1e-4]
    np.testing.assert_allclose([c["weight"] for c in cks], [2 / 3, 1 / 3])
    assert res.explanations["subtasks"] == {"a": 3, "b": 1} and res.explanations["no_response_pool"] == 1
    assert np.isnan(res.scores[-1]) and not np.isnan(res.scores[:-1]).any()

    cfg = LessConfig(**{**FAST, "train": TrainConfig(**FAST["train"]), "render": RenderConfig(**FAST["render"])})
    (folder,) = list((cache_root() / "less-warmup").iterdir())
    model = _wrap(copy.deepcopy(loaded.model), cfg.train).eval()
    mods = lora_modules(model)
    names = [f"{n}.weight" for n, _ in mods]
    params = dict(model.named_parameters())
    rend = render_pool(pool.examples[:-1], loaded.tokenizer, cfg.render)[0]
    t_rend = render_pool(target.examples, loaded.tokenizer, cfg.render)[0]
    n_params = sum(params[n].numel() for n in names)
    r = RademacherProjector(n_params, cfg.proj_dim, seed=5, block_rows=BLOCK_ROWS).matrix().double().numpy()
    total = np.zeros((len(rend), len(t_rend)))
    for k, weight in enumerate([2 / 3, 1 / 3]):
        ck = _load_checkpoint(folder, f"ckpt-{k}", None)
        assert ck.step == k + 1 and ck.betas == (0.9, 0.999) and ck.eps == 1e-8
        with torch.no_grad():
            for n in names:
                params[n].copy_(ck.weights[n])
        g = per_example_grads_loop(model, rend, mods, mean_response_loss, pad_id=PAD).double().numpy()
        gt = per_example_grads_loop(model, t_rend, mods, mean_response_loss, pad_id=PAD).double().numpy()
        m = np.concatenate([ck.exp_avg[n].double().numpy().ravel() for n in names])
        v = np.concatenate([ck.exp_avg_sq[n].double().numpy().ravel() for n in names])
        t = ck.step + 1
        m_hat = (0.9 * m + 0.1 * g) / (1 - 0.9 ** t)
        v_hat = (0.999 * v + 0.001 * g ** 2) / (1 - 0.999 ** t)
        adam = m_hat / (np.sqrt(v_hat) + 1e-8)
        total += weight * _unit(adam @ r) @ _unit(gt @ r).T
    expected = np.maximum(total[:, :3].mean(1), total[:, 3])
    assert np.abs(total[:, :3].mean(1) - total[:, 3]).max() > 1e-3  # the max over subtasks matters
    np.testing.assert_allclose(res.scores[:-1], expected, rtol=1e-4, atol=1e-6)
    # the plain-gradient ablation differs
    sgd = Less({**FAST, "pool_gradient": "sgd"}).score(pool, target=target, loaded=loaded, seed=5, progress=False)
    assert np.abs(sgd.scores[:-1] - res.scores[:-1]).max() > 1e-3
    assert not hasattr(loaded.model, "peft_config")  # the caller's model is left as it was


def test_cache_reuses_checkpoints_and_finished_features(loaded, monkeypatch):
    import mechsieve.scorers.less as less_mod
    import mechsieve.train as train_mod

    pool, target = _pool_and_target()
    first = Less(FAST).score(pool, target=target, loaded=loaded, progress=False)
    assert first.explanations["reused"] == {"checkpoints": 0, "features": 0}
    feats = cache_root() / "less-features"
    # an interrupted run: checkpoint 1's features never got written
    removed = [p for p in feats.rglob("*ckpt1.*")]
    assert len(removed) == 4  # pool + target, .safetensors + .json
    for p in removed:
        p.unlink()
    computed = []
    original = less_mod._Run._compute

    def counting(self, rendered, ck, kind):
        computed.append((ck.epoch, kind, len(rendered)))
        return original(self, rendered, ck, kind)

    def no_training(*a, **k):
        raise AssertionError("the warm-up should come from the cache")

    monkeypatch.setattr(less_mod._Run, "_compute", counting)
    monkeypatch.setattr(train_mod, "train", no_training)
    again = Less(FAST).score(pool, target=target, loaded=loaded, progress=False)
    assert sorted(computed) == [(1, "adam", 7), (1, "sgd", 4)]
    assert again.explanations["reused"] == {"checkpoints": 2, "features": 2}
    np.testing.assert_allclose(again.scores, first.scores, rtol=1e-6, equal_nan=True)
    # a hand-edited artefact is refused, naming the setting
    meta = next(feats.rglob("pool-adam-ckpt0.json"))
    data = json.loads(meta.read_text())
    data["settings"]["settings"]["proj_dim"] = 99
    meta.write_text(json.dumps(data))
    with pytest.raises(SettingsMismatch, match="proj_dim"):
        Less(FAST).score(pool, target=target, loaded=loaded, progress=False)


def test_cache_off_writes_nothing(loaded):
    pool, target = _pool_and_target()
    Less({**FAST, "cache": False}).score(pool, target=target, loaded=loaded, progress=False)
    assert not list(cache_root().glob("less-*"))


@pytest.mark.parametrize("settings, match", [
    ({"warmup_fraction": 0.0}, "warmup_fraction"),
    ({"warmup_fraction": 1.5}, "warmup_fraction"),
    ({"train": {"max_steps": 5}}, "train.max_steps"),
    ({"train": {"epochs": 1.5}}, "whole number"),
    ({"train": {"full_finetune": True}}, "full_finetune"),
    ({"proj_dim": 0}, "proj_dim"),
    ({"project_mb": 0}, "project_mb"),
    ({"pool_gradient": "sign"}, "pool_gradient"),
    ({"subtasks": "task"}, "subtasks"),
])
def test_bad_settings_are_refused_by_name(settings, match):
    with pytest.raises(ConfigError, match=match):
        make_scorer("less", settings)


def test_missing_inputs_and_an_adapted_model_are_refused(loaded, make_model, tokenizer):
    pool, target = _pool_and_target()
    with pytest.raises(ScorerError, match="target"):
        Less(FAST).score(pool, target=None, loaded=loaded, progress=False)
    adapted = LoadedModel(_wrap(copy.deepcopy(make_model("llama")), TrainConfig(lora_r=2)),
                          tokenizer, {"kind": "test", "adapted": True})
    with pytest.raises(ScorerError, match="already carries"):
        Less(FAST).score(pool, target=target, loaded=adapted, progress=False)


def test_select_command_with_less(model_dir, tmp_path, capsys):
    from mechsieve.cli import main

    rows = [{"messages": [{"role": "user", "content": ex.prompt[0]["content"]},
                          {"role": "assistant", "content": ex.response}]} for ex in probe_pool(8).examples]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = write_jsonl(tmp_path / "target.jsonl", rows[:3])
    out = tmp_path / "sel"
    assert main(["select", "--method", "less", "--model", str(model_dir), "--pool", str(pool), "--target", str(target),
                 "--budget", "3", "--out", str(out), "--quiet", "--set", "scorer.proj_dim=16",
                 "--set", "scorer.train.epochs=2", "--set", "scorer.train.lora_r=2",
                 "--set", "scorer.render.max_len=48"]) == 0
    printed = capsys.readouterr().out
    assert "less: selected 3 of 8" in printed and str(out / "summary.json") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["explanations"]["checkpoints"]) == 2 and summary["settings"]["scorer"]["proj_dim"] == 16
    assert len((out / "selected.jsonl").read_text().splitlines()) == 3
