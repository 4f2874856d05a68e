"""RDS+'s position-weighted mean pooling (SGPT weights w_i = i / sum_j j), by hand, on both paddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechsieve.capture.batching import collate
from mechsieve.capture.reductions import REDUCTIONS
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, Rendered, render_example
from mechsieve.scorers import make_scorer
from test_scorers import make_pool


def items() -> list[Rendered]:
    a = Rendered(np.array([7, 8, 9]), np.array([0, 1, 1], bool), prompt_len=1, content_start=0)
    b = Rendered(np.array([5, 6]), np.array([0, 1], bool), prompt_len=1, content_start=0)
    return [a, b]


@pytest.mark.parametrize("side", ["right", "left"])
def test_weighted_mean_by_hand_with_padding(side):
    batch = collate(items(), 0, side)
    # row 0: values 1, 2, 3 at positions 1..3; row 1: values 4, 8 at positions 1..2; padding holds 100
    real = {0: [1.0, 2.0, 3.0], 1: [4.0, 8.0]}
    acts = torch.full((2, 3, 2), 100.0)
    for r, vals in real.items():
        start = int(batch.offsets[r])
        acts[r, start:start + len(vals), 0] = torch.tensor(vals)
        acts[r, start:start + len(vals), 1] = -torch.tensor(vals)
    out = REDUCTIONS["weighted_mean_all"](acts, batch)
    # (1*1 + 2*2 + 3*3) / (1 + 2 + 3) = 14/6; (1*4 + 2*8) / (1 + 2) = 20/3
    expected = torch.tensor([[14 / 6, -14 / 6], [20 / 3, -20 / 3]])
    torch.testing.assert_close(out, expected)
    # the plain mean for comparison: 2 and 6
    torch.testing.assert_close(REDUCTIONS["mean_all"](acts, batch), torch.tensor([[2.0, -2.0], [6.0, -6.0]]))


def test_rds_default_is_the_weighted_mean_cosine(loaded):
    """RDS+ against a hand computation from output_hidden_states (last entry: after the final norm)."""
    pool, target = make_pool(3), make_pool(4, start=2, source="target")

    def embed(ex: Example) -> np.ndarray:
        r = render_example(ex, loaded.tokenizer, RenderConfig())
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.from_numpy(r.input_ids)[None], output_hidden_states=True).hidden_states
        h = hs[-1][0].double().numpy()  # [T, d]
        w = np.arange(1, len(h) + 1, dtype=np.float64)
        v = (w[:, None] * h).sum(0) / w.sum()
        return v / np.linalg.norm(v)

    tgt = np.stack([embed(ex) for ex in target.examples])
    expected = [float((tgt @ embed(ex)).mean()) for ex in pool.examples]
    weighted = make_scorer("rds").score(pool, target=target, loaded=loaded, progress=False).scores
    np.testing.assert_allclose(weighted, expected, rtol=1e-5)
    plain = make_scorer("rds", {"pooling": "mean"}).score(pool, target=target, loaded=loaded, progress=False).scores
    assert not np.allclose(plain, weighted, rtol=1e-4)


def test_pooling_is_in_the_feature_key_and_checked(loaded):
    from mechsieve.config import ConfigError
    from mechsieve.scorers.baselines import RdsConfig, pooled_feature

    keys = {p: pooled_feature(loaded, RdsConfig(pooling=p)).full_key()["settings"]["reduction"]
            for p in ("weighted_mean", "mean", "mean_response")}
    assert keys == {"weighted_mean": "weighted_mean_all", "mean": "mean_all", "mean_response": "mean_response"}
    with pytest.raises(ConfigError, match="rds.pooling.*weighted_mean"):
        RdsConfig(pooling="mean_all")
