"""Slow: the real embedded model, loaded from the installed package (converted once)."""

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def real_cache(monkeypatch):
    # Share the one-time GGUF conversion across runs instead of the per-test temporary cache.
    root = os.environ.get("MECHSIEVE_TEST_CACHE") or str(Path.home() / ".cache" / "mechsieve")
    monkeypatch.setenv("MECHSIEVE_CACHE", root)


def test_smollm2_loads_and_captures_one_batch(real_cache):
    pytest.importorskip("gguf")
    from mechsieve.capture import CaptureConfig, capture_pool
    from mechsieve.commands.demo import sample_path
    from mechsieve.data import RenderConfig, read_pool
    from mechsieve.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    assert loaded.identity["kind"] == "alias" and loaded.model.config.num_hidden_layers == 30
    pool = read_pool(sample_path("gsm8k_train.jsonl"), limit=8)
    result, report = capture_pool(loaded, pool, CaptureConfig(layers=[0, -1], reductions=["mean_response", "drift"]),
                                  RenderConfig(max_len=256), progress=False)
    assert len(result.plan.batches) == 1
    arr = result.arrays["mean_response"]
    assert arr.shape == (8, 2, 576) and np.isfinite(arr).all()
    # The real model's residual stream grows with depth; a random or broken load would not do this.
    assert np.linalg.norm(arr[:, 1], axis=-1).mean() > 2 * np.linalg.norm(arr[:, 0], axis=-1).mean()
    text = loaded.tokenizer.decode(loaded.model.generate(
        **loaded.tokenizer("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt"),
        max_new_tokens=8, do_sample=False)[0])
    assert "4" in text.split("assistant")[-1]
