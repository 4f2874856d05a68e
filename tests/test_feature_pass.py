"""The shared feature pass: every forward-only scorer gets exactly its own scores from one pass
with the others, features are cached and reused, and the pass stops at the deepest layer needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechsieve.capture.shared import Pooled, ResponseLoss, feature_pass
from mechsieve.data.records import Pool
from mechsieve.data.render import RenderConfig
from mechsieve.models.hooks import hook_points
from mechsieve.scorers import available, make_scorer
from mechsieve.scorers.base import ForwardScorer
from mechsieve.scorers.common import ModelScorerConfig, pass_key
from mechsieve.scorers.many import score_many
from mechsieve.scorers.registry import get_scorer_class
from mechsieve.store.features import FeatureCache
from test_scorers import CASES, make_pool

# the same render and batching for every method, so that they can share one pass; small batches,
# so the pool spans several of them
COMMON = {"render": {"max_len": 64}, "max_tokens": 128, "max_batch": 3}
CONCEPT_COMMON = {"max_len": 64, "max_tokens": 128, "max_batch": 3}


def forward_rows(tmp_path) -> dict[str, tuple[str, dict]]:
    """Every forward-only row of the shared scorer table (test_scorers.CASES), with COMMON batching."""
    rows = {}
    for i, (name, settings) in enumerate(CASES):
        if not issubclass(get_scorer_class(name), ForwardScorer):
            continue
        settings = settings(tmp_path) if callable(settings) else dict(settings)
        if "probe" in settings:  # the concept scorers: max_len at the top level
            settings = {**settings, **CONCEPT_COMMON}
        else:
            settings = {**settings, **COMMON, "render": {**settings.get("render", {}), **COMMON["render"]}}
        rows[f"{name}-{i}"] = (name, settings)
    return rows


def test_every_forward_only_scorer_is_in_the_table(tmp_path):
    forward = {n for n in available() if issubclass(get_scorer_class(n), ForwardScorer)}
    assert forward == {"nait", "rds", "loss", "ifd", "vector-filter", "igds"}
    assert forward <= {name for name, _ in forward_rows(tmp_path).values()}


def test_shared_pass_gives_each_scorer_exactly_its_own_scores(loaded, tmp_path):
    rows = forward_rows(tmp_path)
    pool, target = make_pool(16), make_pool(4, start=2, source="target")
    alone = {label: make_scorer(name, s).score(pool, target=target, loaded=loaded, seed=1, progress=False)
             for label, (name, s) in rows.items()}
    shared, report = score_many({label: make_scorer(name, s) for label, (name, s) in rows.items()}, pool,
                                target=target, loaded=loaded, seed=1, progress=False)
    for label in rows:
        np.testing.assert_array_equal(shared[label].scores, alone[label].scores, err_msg=label)
        if alone[label].per_target is not None:
            np.testing.assert_array_equal(shared[label].per_target, alone[label].per_target, err_msg=label)
    igds = next(label for label in rows if label.startswith("igds"))
    assert shared[igds].explanations["features"] == alone[igds].explanations["features"]  # snippets too
    # one pass over the examples (NAIT's mlp row reads another site: its own pass) and IFD's
    # response-alone pass
    passes = {(p["inputs"], p["site"]) for p in report["pass"]["passes"]}
    assert passes == {("example", "resid"), ("example", "mlp"), ("response_only", "resid")}
    assert len(report["pass"]["passes"]) == 3
    main = next(p for p in report["pass"]["passes"] if (p["inputs"], p["site"]) == ("example", "resid"))
    assert main["logits"] and main["examples"] == 16
    # loss and IFD's conditional term are one feature, computed once
    assert report["pass"]["features_computed"].count("response_loss") == 2  # y|x once, y once


def test_features_are_cached_and_a_second_run_computes_only_the_missing(loaded, tmp_path):
    pool, target = make_pool(10), make_pool(4, start=2, source="target")
    cache = FeatureCache(tmp_path / "cache")

    def scorers(names):
        return {n: make_scorer(n, COMMON) for n in names}

    first, r1 = score_many(scorers(["loss", "rds"]), pool, target=target, loaded=loaded, cache=cache, progress=False)
    assert sorted(r1["pass"]["features_computed"]) == ["pooled", "response_loss"]
    assert r1["pass"]["features_cached"] == []
    second, r2 = score_many(scorers(["loss", "rds", "nait"]), pool, target=target, loaded=loaded, cache=cache,
                            progress=False)
    assert r2["pass"]["features_computed"] == ["nait_drift_projection"]
    assert sorted(r2["pass"]["features_cached"]) == ["pooled", "response_loss"]
    for name in ("loss", "rds"):
        np.testing.assert_array_equal(first[name].scores, second[name].scores)
    third, r3 = score_many(scorers(["nait", "loss", "rds"]), pool, target=target, loaded=loaded, cache=cache,
                           progress=False)
    assert r3["pass"]["passes"] == [] and len(r3["pass"]["features_cached"]) == 3
    np.testing.assert_array_equal(third["nait"].scores, second["nait"].scores)
    # another pool is another key: nothing is reused
    other = make_pool(10, start=1)
    _, r4 = score_many(scorers(["loss"]), other, loaded=loaded, cache=cache, progress=False)
    assert r4["pass"]["features_computed"] == ["response_loss"]


def test_the_pass_stops_after_the_deepest_layer_needed(loaded):
    model = loaded.model
    n_layers = hook_points(model).n_layers
    calls = {"last": 0, "head": 0}
    handles = [hook_points(model).block(n_layers - 1).register_forward_hook(
                   lambda *a: calls.__setitem__("last", calls["last"] + 1)),
               model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    key = pass_key(ModelScorerConfig(render=RenderConfig(max_len=64)))
    pool = make_pool(5)
    try:
        arrays, report = feature_pass(loaded, pool.examples, {"a": Pooled(key, 0, "mean_all"),
                                                              "b": Pooled(key, 0, "mean_response")}, progress=False)
        assert calls == {"last": 0, "head": 0}
        assert report.passes[0]["layers"] == [0] and not report.passes[0]["logits"]
        arrays, report = feature_pass(loaded, pool.examples, {"loss": ResponseLoss(key)}, progress=False)
        assert calls["head"] == calls["last"] == 1 and report.passes[0]["logits"]
    finally:
        for h in handles:
            h.remove()


def test_equal_features_are_computed_once_and_match_a_direct_computation(loaded):
    key = pass_key(ModelScorerConfig(render=RenderConfig(max_len=64), max_tokens=64, max_batch=2))
    pool = make_pool(6)
    arrays, report = feature_pass(loaded, pool.examples, {"x": Pooled(key, 1, "mean_all"),
                                                          "y": Pooled(key, 1, "mean_all")}, progress=False)
    assert report.computed == ["pooled"] and arrays["x"] is arrays["y"]
    from mechsieve.data.render import render_example

    for i, ex in enumerate(pool.examples):
        r = render_example(ex, loaded.tokenizer, RenderConfig(max_len=64))
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.from_numpy(r.input_ids)[None], output_hidden_states=True).hidden_states
        np.testing.assert_allclose(arrays["x"]["pooled"][i], hs[2][0].mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_a_torn_cache_entry_is_recomputed(loaded, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    key = pass_key(ModelScorerConfig(render=RenderConfig(max_len=64)))
    pool = make_pool(4)
    first, _ = feature_pass(loaded, pool.examples, {"a": Pooled(key, 0, "mean_all")}, cache=cache, progress=False)
    (entry,) = list((tmp_path / "cache" / "features").iterdir())
    (entry / "feature.safetensors").write_bytes(b"not safetensors")
    again, report = feature_pass(loaded, pool.examples, {"a": Pooled(key, 0, "mean_all")}, cache=cache,
                                 progress=False)
    assert report.computed == ["pooled"]
    np.testing.assert_array_equal(first["a"]["pooled"], again["a"]["pooled"])


@pytest.mark.parametrize("n", [1, 7])
def test_score_many_keeps_the_order_of_labels_and_scores_the_others_alone(loaded, n):
    pool = make_pool(n)
    results, report = score_many({"random": make_scorer("random"), "loss": make_scorer("loss", COMMON)}, pool,
                                 loaded=loaded, seed=3, progress=False)
    assert list(results) == ["random", "loss"]
    assert report["shared"] == ["loss"] and "own_seconds" in report["methods"]["random"]
    np.testing.assert_array_equal(results["random"].scores,
                                  make_scorer("random").score(pool, seed=3, progress=False).scores)
    assert isinstance(pool, Pool)


# --- the CLI: several methods, one pass --------------------------------------------------------

def test_select_with_several_methods_writes_one_folder_each_and_their_own_scores(model_dir, tmp_path, capsys):
    import json

    import pandas as pd

    from mechsieve.cli import main
    from test_engine import pool_files

    pool, target = pool_files(tmp_path)
    one = ["--pool", str(pool), "--target", str(target), "--model", str(model_dir), "--budget", "3", "--quiet",
           "--set", "scorer.render.max_len=64", "--set", "scorer.max_tokens=256", "--set", "scorer.max_batch=4"]
    common = [*one, "--set", "scorer.max_len=64"]  # vector-filter's max_len; the others have none
    assert main(["select", "--method", "loss,rds,random,vector-filter", *common, "--out", str(tmp_path / "many"),
                 "--set", f"scorer.vector-filter.positive={pool}", "--set", f"scorer.vector-filter.negative={target}",
                 "--set", "scorer.vector-filter.probe.layer=1", "--set", "scorer.vector-filter.probe.holdout=0"]) == 0
    out = capsys.readouterr().out
    assert "shared pass of loss, rds, vector-filter: 1 forward pass(es)" in out
    many = tmp_path / "many"
    combined = pd.read_parquet(many / "scores.parquet")
    assert list(combined.columns) == ["id", "source", "loss", "rds", "random", "vector-filter", "loss.selected",
                                      "rds.selected", "random.selected", "vector-filter.selected"]
    summary = json.loads((many / "summary.json").read_text())
    assert summary["methods"] == ["loss", "rds", "random", "vector-filter"]
    assert summary["shared"]["pass"]["passes"][0]["logits"] is True
    for method in ("loss", "rds", "random"):
        settings = one if method != "random" else one[:-6]  # random has no settings
        assert main(["select", "--method", method, *settings, "--out", str(tmp_path / method), "--no-feature-cache"]) == 0
        alone = pd.read_parquet(tmp_path / method / "scores.parquet")
        inside = pd.read_parquet(many / method / "scores.parquet")
        np.testing.assert_array_equal(inside["score"].to_numpy(), alone["score"].to_numpy())
        assert list(inside["selected"]) == list(alone["selected"]) == list(combined[f"{method}.selected"])
        assert json.loads((many / method / "summary.json").read_text())["selected"]["examples"] == 3
    # a later run with one more method: the features of loss and rds come from the cache
    capsys.readouterr()
    assert main(["select", "--method", "loss,rds,nait", *one, "--out", str(tmp_path / "more")]) == 0
    shared = json.loads((tmp_path / "more" / "summary.json").read_text())["shared"]["pass"]
    assert shared["features_computed"] == ["nait_drift_projection"]
    assert sorted(shared["features_cached"]) == ["pooled", "response_loss"]
    # sharded through the local engine: the same scores, one shared pass per shard
    assert main(["select", "--method", "loss,rds,nait", *one, "--out", str(tmp_path / "sharded"),
                 "--engine", "local", "--shard-size", "3"]) == 0
    for method in ("loss", "rds", "nait"):
        a = pd.read_parquet(tmp_path / "more" / method / "scores.parquet")["score"].to_numpy()
        b = pd.read_parquet(tmp_path / "sharded" / method / "scores.parquet")["score"].to_numpy()
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "sharded" / "shards" / "shared").exists()  # removed once combined


@pytest.mark.parametrize("extra, message", [
    (["--method", "nait,rds,nait"], "method: nait given twice"),
    (["--method", "nait,rds", "--set", "scorer.layrs=[0]"], "scorer.layrs: none of nait, rds has a setting layrs; "
                                                            "did you mean layers?"),
    (["--method", "nait,rds", "--set", "scorer.rds.layers=[0]"], "scorer.rds.layers: rds has no setting layers"),
    (["--method", "nait,rdss"], "unknown method 'rdss'"),
])
def test_several_methods_check_their_settings_first(extra, message, tmp_path, capsys):
    from mechsieve.cli import main

    missing = tmp_path / "not-here.jsonl"
    code = main(["select", "--pool", str(missing), "--target", str(missing), "--out", str(tmp_path / "o"),
                 "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "not-here" not in err, err


def test_print_config_with_several_methods_reads_back_the_same(tmp_path, capsys):
    import yaml

    from mechsieve.cli import main

    args = ["select", "--method", "nait,loss", "--pool", "p.jsonl", "--set", "scorer.render.max_len=32",
            "--set", "scorer.nait.layers=[0]"]
    assert main([*args, "--print-config"]) == 0
    first = capsys.readouterr().out
    data = yaml.safe_load(first)
    assert data["scorer"]["nait"]["layers"] == [0] and data["scorer"]["nait"]["render"]["max_len"] == 32
    assert data["scorer"]["loss"]["render"]["max_len"] == 32 and "layers" not in data["scorer"]["loss"]
    (tmp_path / "c.yaml").write_text(first)
    assert main(["select", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == first
