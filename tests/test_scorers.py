"""Every registered scorer through the same invariants, the registry, and golden loss / IFD values.

Adding a scorer: one row in CASES, (name, settings) where settings is a dict of the scorer's
config fields or a function `(tmp_path) -> dict` that first writes the files the scorer reads
(e.g. contrastive data for a concept). The rows run against the tiny Llama of conftest, a 7-example
pool and a 4-example target pool (source "target").
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mechsieve.data.records import Example, Pool
from mechsieve.data.render import RenderConfig, render_example
from mechsieve.models.loading import LoadedModel
from mechsieve.scorers import (
    RegistryError,
    Scorer,
    ScorerError,
    ScoreResult,
    available,
    make_scorer,
    register,
)
from mechsieve.scorers.registry import unregister

TEXTS = [
    ("Natalia sold clips to 48 of her friends in April.", "How many clips did Natalia sell? #### 72"),
    ("Write a function to find the similar elements.", "def similar_elements(a, b):\n    return tuple(set(a) & set(b))"),
    ("The patient presents with fever and cough.", "The most likely diagnosis is a little dog in the park."),
    ("Once upon a time there was a little dog", "who liked to play in the park with a red ball."),
    ("Answer the question step by step.", "The answer is 12 + 30 = 42."),
    ("Then she sold half as many clips in May.", "48 / 2 = 24 clips in May, 48 + 24 = 72."),
    ("You are a helpful assistant.", "Once upon a time."),
]

def _concept(tmp_path, needs: str = "", **extra):
    """Contrastive files for the concept scorers: positives/negatives from different texts
    (`needs`: an optional package the row skips without)."""
    import json

    if needs:
        pytest.importorskip(needs)

    files = {}
    for side, start in (("positive", 0), ("negative", 3)):
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in TEXTS[start:start + 3]]
        path = tmp_path / f"{side}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[side] = str(path)
    return {**files, "probe": {"layer": 1, "holdout": 0.0}, "max_len": 64, **extra}


# (name, settings or settings(tmp_path)). Every registered scorer needs at least one row.
CASES = [
    ("random", {}),
    ("full", {}),
    ("loss", {}),
    ("loss", {"direction": "low"}),
    ("ifd", {"drop_above_one": False}),
    ("rds", {}),
    ("rds", {"pooling": "mean_response", "aggregate": "max"}),
    ("kcenter", {}),
    ("nait", {}),
    ("nait", {"site": "mlp", "drift": "last_prompt", "similarity": "cosine", "normalize": "target"}),
    ("nait", {"layers": [0, -1], "drift": "mean", "normalize": "pool"}),
    # attribution scorers; influence rows use identity curvature (no factor fit) to stay fast
    ("vector-filter", _concept),
    ("projection-diff", lambda p: _concept(p, temperature=0.0, max_new_tokens=4)),
    ("grad-sim", lambda p: _concept(p, proj_in=4, proj_out=4)),
    ("influence", lambda p: _concept(p, needs="kronfluence", strategy="identity", track_kinds="mlp")),
    ("concept-influence", lambda p: _concept(p, needs="kronfluence", strategy="identity", track_kinds="mlp")),
    # IGDS with a random SAE written by the row (width 32 = the tiny model), 2 dev examples
    ("igds", lambda p: {"sae": str(__import__("mechsieve.features.sae", fromlist=["x"]).write_sae(
        p / "sae", __import__("mechsieve.features.sae", fromlist=["x"]).random_sae(32, 48, layer=1))),
        "freq_threshold": 0.0, "top_k": 3, "dev_size": 2, "alphas": [3.0], "render": {"max_len": 64},
        "none_kept": "best",  # random latents rarely beat their random-direction controls
        "reference": "none"}),  # a random SAE fires on every example: a pool reference leaves no latent
    # LESS: 2 warm-up epochs of a rank-2 LoRA on one example, 32-dim projection
    ("less", {"proj_dim": 32, "train": {"epochs": 2, "lora_r": 2}, "render": {"max_len": 64}}),
]


def make_pool(n: int = 7, start: int = 0, source: str = "pool") -> Pool:
    examples = []
    for i in range(n):
        q, a = TEXTS[(start + i) % len(TEXTS)]
        examples.append(Example(f"{source}-{start + i:02d}", source, [{"role": "user", "content": q * (1 + i % 2)}],
                                a, {"row": i}))
    return Pool(examples, "", "memory", "memory")




@pytest.fixture(scope="module")
def target() -> Pool:
    return make_pool(4, start=2, source="target")


def run(name: str, settings: dict, pool: Pool, loaded, target, seed: int = 0) -> ScoreResult:
    return make_scorer(name, settings).score(pool, target=target, loaded=loaded, seed=seed, progress=False)


def test_every_registered_scorer_has_a_row():
    missing = set(available()) - {name for name, _ in CASES}
    assert not missing, f"add rows for {sorted(missing)} to CASES"


@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_scorer_invariants(name, settings, loaded, target, tmp_path):
    if callable(settings):
        settings = settings(tmp_path)
    pool = make_pool()
    first = run(name, settings, pool, loaded, target, seed=1)
    # one float64 score per example
    assert first.scores.shape == (len(pool),) and first.scores.dtype == np.float64
    assert not np.isinf(first.scores).any()
    # deterministic under a seed
    again = run(name, settings, pool, loaded, target, seed=1)
    np.testing.assert_array_equal(first.scores, again.scores)
    # independent of the pool's order (batches differ, so equal up to float error)
    rev = Pool(pool.examples[::-1], "", "memory", "memory")
    reversed_scores = run(name, settings, rev, loaded, target, seed=1).scores[::-1]
    np.testing.assert_allclose(reversed_scores, first.scores, rtol=1e-5, atol=1e-5)
    # a pool of one
    one = run(name, settings, make_pool(1), loaded, target, seed=1)
    assert one.scores.shape == (1,)
    # an empty pool is refused
    with pytest.raises(ScorerError, match="empty"):
        run(name, settings, Pool([], "", "memory", "memory"), loaded, target)


def test_random_depends_on_seed_only():
    pool = make_pool()
    a = run("random", {}, pool, None, None, seed=0).scores
    b = run("random", {}, pool, None, None, seed=1).scores
    assert not np.allclose(a, b) and ((a >= 0) & (a < 1)).all()


def test_model_scorers_refuse_missing_inputs(target):
    with pytest.raises(ScorerError, match="loaded="):
        run("loss", {}, make_pool(), None, None)
    with pytest.raises(ScorerError, match="target"):
        make_scorer("rds").score(make_pool(), target=None, loaded=object())


def test_registry_refuses_duplicates_and_unknown():
    class Constant(Scorer):
        name = "constant-test"

        def score(self, pool, *, target=None, loaded=None, seed=0, progress=True):
            return ScoreResult(np.ones(len(pool.examples)))

    register("constant-test", Constant)
    try:
        assert "constant-test" in available()
        with pytest.raises(RegistryError, match="already registered"):
            register("constant-test", Constant)
        with pytest.raises(RegistryError, match="already registered"):
            register("random", Constant)
    finally:
        unregister("constant-test")
    with pytest.raises(RegistryError, match="available"):
        make_scorer("no-such-method")


def reference_loss(model, ids: np.ndarray, mask: np.ndarray) -> float:
    """Mean NLL of the masked tokens, one example, no batching, explicit loop."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nll = [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]
    return sum(nll) / len(nll)


def test_loss_and_ifd_match_an_unbatched_reference(loaded):
    pool = make_pool()
    loss = run("loss", {}, pool, loaded, None).scores
    ifd = run("ifd", {"drop_above_one": False}, pool, loaded, None).scores
    cfg = RenderConfig()
    for k, ex in enumerate(pool.examples):
        r = render_example(ex, loaded.tokenizer, cfg)
        cond = reference_loss(loaded.model, r.input_ids, r.response_mask)
        alone = render_example(Example(ex.id, ex.source, [], ex.response), loaded.tokenizer, cfg)
        assert alone.response_mask.sum() > 0 and len(alone) < len(r)
        uncond = reference_loss(loaded.model, alone.input_ids, alone.response_mask)
        assert loss[k] == pytest.approx(cond, rel=1e-5)
        assert ifd[k] == pytest.approx(math.exp(cond - uncond), rel=1e-5)


def test_loss_and_ifd_golden_on_uniform_logits(make_model, tokenizer):
    """With a zero output head every next token has probability 1/V: loss = ln V, IFD = 1."""
    model = copy.deepcopy(make_model("llama"))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    uniform = LoadedModel(model, tokenizer, {"name": "uniform"})
    pool = make_pool()
    vocab = model.config.vocab_size
    np.testing.assert_allclose(run("loss", {}, pool, uniform, None).scores, math.log(vocab), rtol=1e-6)
    np.testing.assert_allclose(run("ifd", {"drop_above_one": False}, pool, uniform, None).scores, 1.0, rtol=1e-6)


def test_loss_direction_sets_the_order(loaded):
    from mechsieve.select import select_examples

    pool = make_pool()
    high = select_examples("loss", pool, 2, loaded=loaded, progress=False)
    low = select_examples("loss", pool, 2, loaded=loaded, settings={"direction": "low"}, progress=False)
    order = np.argsort(high.scores)
    assert set(low.ids) == {pool.examples[i].id for i in order[:2]}
    assert set(high.ids) == {pool.examples[i].id for i in order[-2:]}
    assert low.settings["order"] == "bottom"


def test_ifd_reuses_the_loss_pass(loaded):
    from mechsieve.scorers.baselines import IfdScorer

    pool = make_pool()
    loss = run("loss", {}, pool, loaded, None).scores
    full = run("ifd", {"drop_above_one": False}, pool, loaded, None).scores
    reused = IfdScorer({"drop_above_one": False}, conditional_loss=loss).score(pool, loaded=loaded, progress=False)
    np.testing.assert_allclose(reused.scores, full, rtol=1e-9)


def test_ifd_leaves_prompt_less_examples_unscored(loaded):
    pool = make_pool(3)
    pool.examples[1] = Example("plain", "text", [], "Once upon a time there was a little dog.")
    res = run("ifd", {"drop_above_one": False}, pool, loaded, None)
    assert np.isnan(res.scores[1]) and not np.isnan(res.scores[[0, 2]]).any()
    assert res.explanations["no_prompt"] == 1


def test_ifd_drops_ratios_above_one(loaded):
    pool = make_pool()
    raw = run("ifd", {"drop_above_one": False}, pool, loaded, None)
    kept = run("ifd", {}, pool, loaded, None)
    above = raw.scores > 1
    assert np.isnan(kept.scores[above]).all()
    np.testing.assert_array_equal(kept.scores[~above], raw.scores[~above])
    assert kept.explanations["dropped"] == int(above.sum())


def test_rds_is_the_mean_cosine_to_the_target(loaded, target):
    """RDS+ against a hand computation from output_hidden_states (last entry: after the final norm)."""
    pool = make_pool(3)

    def embed(ex: Example) -> np.ndarray:
        r = render_example(ex, loaded.tokenizer, RenderConfig())
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.from_numpy(r.input_ids)[None], output_hidden_states=True).hidden_states
        v = hs[-1][0].double().mean(0).numpy()
        return v / np.linalg.norm(v)

    tgt = np.stack([embed(ex) for ex in target.examples])
    expected = [float((tgt @ embed(ex)).mean()) for ex in pool.examples]
    np.testing.assert_allclose(run("rds", {"pooling": "mean"}, pool, loaded, target).scores, expected, rtol=1e-5)


def test_kcenter_greedy_by_hand():
    from mechsieve.scorers.kcenter import kcenter_greedy

    x = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.0, 0.0]])
    scores, order = kcenter_greedy(x, ["a", "b", "c", "d", "e"])
    # mean (3.2, 1.2): nearest is e (1,0) at 2.53 -> first; farthest from e: b (9); then from {e, b}: d
    # (min(sqrt(41), sqrt(50)) = 6.40); then c (min 1.41, 10.05, 6.40) vs a (1) -> c; then a.
    assert order.tolist() == [4, 1, 3, 2, 0]
    np.testing.assert_allclose(scores[[1, 3, 2, 0]], [9.0, math.sqrt(41), math.sqrt(2), 1.0])
    assert scores[4] > scores[1]
    partial, order2 = kcenter_greedy(x, ["a", "b", "c", "d", "e"], max_centers=2)
    assert order2.tolist() == [4, 1]
    assert partial[3] == pytest.approx(math.sqrt(41))  # distance to the nearest centre
    assert partial[3] < partial[1]


def test_kcenter_on_given_features():
    from mechsieve.scorers.kcenter import KCenterScorer

    pool = make_pool(4)
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    res = KCenterScorer({"metric": "euclidean"}, features=feats).score(pool)
    assert res.scores.shape == (4,) and res.explanations["centres"] == 4
