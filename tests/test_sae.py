"""SAEs: hand-computed encodings, the error identity, the SAELens / sparsify / mechsieve loaders,
refusal of a mismatched width, streaming FVU, and TopK training on a planted dictionary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import write_jsonl
from mechsieve.features.sae import SaeError, SparseAutoencoder, load_sae, random_sae, write_sae
from mechsieve.features.sae_train import SaeEval, SaeTrainConfig, TopKTrainer, split_holdout


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads on a shared CPU only add overhead
    yield
    torch.set_num_threads(before)


def hand_sae(activation: str, k: int = 0) -> SparseAutoencoder:
    """d_in 2, d_sae 3: W_enc columns (1,0), (0,1), (1,1); b_enc (0, -1, 0.5); b_dec (1, 0)."""
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    thr = torch.tensor([0.0, 0.0, 2.0]) if activation == "jumprelu" else None
    return SparseAutoencoder(W_enc, torch.tensor([0.0, -1.0, 0.5]), W_dec, torch.tensor([1.0, 0.0]),
                             activation, k, thr, 3)


def test_encode_golden_values():
    h = torch.tensor([[3.0, 2.0], [0.0, 0.5]])
    # x - b_dec = (2, 2) and (-1, 0.5); pre = (2, 1, 4.5) and (-1, -0.5, 0)
    np.testing.assert_allclose(hand_sae("relu").encode(h), [[2.0, 1.0, 4.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(hand_sae("jumprelu").encode(h), [[2.0, 1.0, 4.5], [0.0, 0.0, 0.0]])
    h2 = torch.tensor([[2.5, 1.5]])  # pre = (1.5, 0.5, 3.5): latent 2 over its threshold 2, the others over 0
    np.testing.assert_allclose(hand_sae("jumprelu").encode(h2), [[1.5, 0.5, 3.5]])
    h3 = torch.tensor([[2.0, 0.5]])  # pre = (1, -0.5, 2): the jump at 2 is strict, so latent 2 is off
    np.testing.assert_allclose(hand_sae("jumprelu").encode(h3), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(hand_sae("topk", k=1).encode(h), [[0.0, 0.0, 4.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(hand_sae("topk", k=2).encode(h), [[2.0, 0.0, 4.5], [0.0, 0.0, 0.0]])
    # decode: a @ W_dec + b_dec; (2, 1, 4.5) -> (2 + 2.25 + 1, 2 + 2.25) = (5.25, 4.25)
    np.testing.assert_allclose(hand_sae("relu").decode(torch.tensor([[2.0, 1.0, 4.5]])), [[5.25, 4.25]])


def test_topk_matches_reference_loop():
    sae = random_sae(8, 20, activation="topk", k=5, seed=3)
    sae.b_enc = torch.linspace(-0.5, 0.5, 20)
    h = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0))
    fast = sae.encode(h)
    pre = sae.pre_activation(h).reshape(-1, 20)
    ref = torch.zeros_like(pre)
    for r in range(pre.shape[0]):
        for j in sorted(range(20), key=lambda j: -float(pre[r, j]))[:5]:
            ref[r, j] = max(float(pre[r, j]), 0.0)
    torch.testing.assert_close(fast.reshape(-1, 20), ref)
    assert int((fast > 0).sum(-1).max()) <= 5


@pytest.mark.parametrize("activation, k", [("relu", 0), ("jumprelu", 0), ("topk", 4)])
def test_decode_encode_plus_error_is_identity(activation, k):
    sae = random_sae(16, 40, activation=activation, k=k, seed=1)
    h = 3 * torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    rebuilt = sae.decode(sae.encode(h)) + sae.error(h)
    torch.testing.assert_close(rebuilt, h, rtol=0, atol=1e-5)
    assert sae.error(h).abs().max() > 1e-3  # a real reconstruction error, not a trivial one


def _saelens_folder(tmp_path, cfg: dict, tensors: dict):
    folder = tmp_path / "saelens"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def test_load_saelens_jumprelu_and_topk(tmp_path):
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(32, 10, generator=g), torch.randn(10, 32, generator=g)
    b_enc, b_dec, thr = torch.randn(10, generator=g), torch.randn(32, generator=g), torch.rand(10, generator=g)
    folder = _saelens_folder(tmp_path, {"architecture": "jumprelu", "d_in": 32, "d_sae": 10,
                                        "apply_b_dec_to_input": False, "normalize_activations": "none",
                                        "metadata": {"hook_name": "blocks.2.hook_resid_pre"}},
                             {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr})
    sae = load_sae(folder)
    assert (sae.d_in, sae.d_sae, sae.activation, sae.layer) == (32, 10, "jumprelu", 1)  # resid_pre of 2 = out of 1
    h = torch.randn(4, 32, generator=g)
    pre = h @ W_enc + b_enc  # apply_b_dec_to_input false: no subtraction
    torch.testing.assert_close(sae.encode(h), torch.where(pre > thr, pre.clamp(min=0), torch.zeros(())))
    # an older config: activation_fn topk with kwargs k, hook_name at the top, resid_post
    old = tmp_path / "old"
    old.mkdir()
    (old / "cfg.json").write_text(json.dumps({"architecture": "standard", "activation_fn_str": "topk",
                                              "activation_fn_kwargs": {"k": 3}, "d_in": 32, "d_sae": 10,
                                              "hook_name": "blocks.0.hook_resid_post"}))
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(old / "sae_weights.safetensors"))
    sae = load_sae(old)
    assert (sae.activation, sae.k, sae.layer) == ("topk", 3, 0)
    pre = (h - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(3, dim=-1)
    torch.testing.assert_close(sae.encode(h), torch.zeros_like(pre).scatter(-1, idx, vals.clamp(min=0)))


def test_load_sparsify_folder_and_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(1)
    enc_w, enc_b = torch.randn(12, 32, generator=g), torch.randn(12, generator=g)
    W_dec, b_dec = torch.randn(12, 32, generator=g), torch.randn(32, generator=g)
    folder = tmp_path / "ckpt" / "layers.2"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 1, "normalize_decoder": True, "num_latents": 12,
                                                 "k": 4, "multi_topk": False, "d_in": 32}))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae.safetensors"))
    sae = load_sae(folder)
    assert (sae.d_in, sae.d_sae, sae.k, sae.layer) == (32, 12, 4, 2)
    h = torch.randn(3, 32, generator=g)
    pre = torch.relu((h - b_dec) @ enc_w.T + enc_b)  # sparsify: ReLU, then TopK
    vals, idx = pre.topk(4, dim=-1)
    torch.testing.assert_close(sae.encode(h), torch.zeros_like(pre).scatter(-1, idx, vals))
    assert load_sae(tmp_path / "ckpt", layer=2).layer == 2  # a checkpoint folder: layers.N picked by layer
    with pytest.raises(SaeError, match="not an SAE folder"):
        load_sae(tmp_path / "ckpt")


def test_mechsieve_format_round_trip(tmp_path):
    sae = random_sae(32, 24, layer=1, activation="topk", k=5, seed=4)
    again = load_sae(write_sae(tmp_path / "s", sae))
    assert (again.activation, again.k, again.layer) == ("topk", 5, 1)
    torch.testing.assert_close(again.W_dec, sae.W_dec)
    with pytest.raises(SaeError, match="layer 1, not layer 2"):
        load_sae(tmp_path / "s", layer=2)


def test_mismatched_width_is_refused(make_model):
    model = make_model("llama")  # hidden size 32
    sae = random_sae(16, 24, layer=1)
    with pytest.raises(SaeError, match=r"d_in=16.*hidden size is 32"):
        sae.check_model(model)
    random_sae(32, 24, layer=1).check_model(model)
    with pytest.raises(SaeError, match="3 blocks"):
        random_sae(32, 24, layer=5).check_model(model)


def test_streaming_fvu_and_dead_share_against_numpy():
    sae = random_sae(6, 10, activation="topk", k=2, seed=5)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(6)) + 2.0
    ev = SaeEval(sae)
    for chunk in x.split(7):
        ev.feed(chunk)
    r = ev.report()
    xn = x.double().numpy()
    rec = sae.decode(sae.encode(x)).double().numpy()
    fvu = ((xn - rec) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert r["fvu"] == pytest.approx(fvu, rel=1e-9)
    fired = (sae.encode(x) > 0).any(0).numpy()
    assert r["dead_share"] == pytest.approx(1 - fired.mean())
    assert r["l0"] == pytest.approx(float((sae.encode(x) > 0).sum(-1).double().mean()))


def test_training_recovers_a_planted_dictionary(one_thread):
    g = torch.Generator().manual_seed(0)
    d, m, k, n = 32, 48, 3, 24000
    atoms = torch.randn(m, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    x = torch.zeros(n, m).scatter(1, idx, torch.rand(n, k, generator=g) + 0.5) @ atoms
    cfg = SaeTrainConfig(d_sae=96, k=k, lr=3e-3, batch_size=128, buffer_tokens=4096, buffer_passes=2,
                         dead_tokens=2000)
    trainer = TopKTrainer(d, cfg)
    for chunk in x.split(1000):  # streamed in chunks, as from a forward pass
        trainer.feed(chunk)
    sae = trainer.finish()
    best_cos = (atoms @ sae.W_dec.T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.95, best_cos
    ev = SaeEval(sae)
    ev.feed(x[:2000])
    assert ev.report()["fvu"] < 0.1
    assert trainer.fed == n


def test_holdout_split():
    train, held = split_holdout(10, 0.2, 0)
    assert len(held) == 2 and sorted([*train, *held]) == list(range(10))
    assert len(split_holdout(1, 0.5, 0)[1]) == 0


def test_sae_train_command_trains_reuses_and_refuses(model_dir, tmp_path, capsys):
    from mechsieve.cli import main

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}? Think about it."},
                          {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}."}]}
            for i in range(12)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    out = tmp_path / "sae"
    argv = ["sae", "train", "--model", str(model_dir), "--pool", str(pool), "--layer", "1", "--d-sae", "64",
            "--k", "4", "--out", str(out), "--quiet", "--set", "sae.buffer_tokens=256", "--set", "sae.batch_size=32",
            "--set", "sae.holdout=0.25"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "FVU" in text and str(out) in text
    meta = json.loads((out / "mechsieve_sae.json").read_text())
    report = meta["report"]
    assert report["heldout_examples"] == 3 and report["train_examples"] == 9 and report["heldout_tokens"] > 0
    assert 0 < report["heldout_fvu"] < 1.5 and 0 <= report["heldout_dead_share"] <= 1
    sae = load_sae(out)
    assert (sae.d_in, sae.d_sae, sae.k, sae.layer) == (32, 64, 4, 1)
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out
    other = [("8" if a == "4" and argv[i - 1] == "--k" else a) for i, a in enumerate(argv)]
    assert main(other) == 2  # an SAE made under other settings is there: refused, naming the setting
    captured = capsys.readouterr()
    assert "train.k: 4 there, 8 here" in captured.err + captured.out
    assert main(["sae", "info", str(out)]) == 0
    assert "topk" in capsys.readouterr().out


def test_pretrained_release_path_with_a_stand_in_sae_lens(monkeypatch):
    """The conversion from a SAELens object; the real download needs the network (not tested here)."""
    import sys
    import types

    g = torch.Generator().manual_seed(2)
    weights = {"W_enc": torch.randn(32, 8, generator=g), "b_enc": torch.randn(8, generator=g),
               "W_dec": torch.randn(8, 32, generator=g), "b_dec": torch.randn(32, generator=g)}

    class Cfg:
        def to_dict(self):
            return {"k": 2, "apply_b_dec_to_input": True, "metadata": {"hook_name": "blocks.2.hook_resid_post"}}

        @classmethod
        def architecture(cls):
            return "topk"

    class FakeSAE:
        @staticmethod
        def from_pretrained(release, sae_id, device="cpu"):
            assert (release, sae_id) == ("some-release", "blocks.2.hook_resid_post")
            return types.SimpleNamespace(cfg=Cfg(), **weights)

    monkeypatch.setitem(sys.modules, "sae_lens", types.SimpleNamespace(SAE=FakeSAE))
    sae = load_sae("saelens:some-release/blocks.2.hook_resid_post")
    assert (sae.activation, sae.k, sae.layer, sae.d_in, sae.d_sae) == ("topk", 2, 2, 32, 8)
    torch.testing.assert_close(sae.W_enc, weights["W_enc"])
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # not installed: the message names `make sae`
    with pytest.raises(SaeError, match="make sae"):
        load_sae("saelens:some-release/x")
