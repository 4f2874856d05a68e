"""The engine: shard plans, sharded scoring against whole-pool scoring, resume and failure on the
local executor, and the Ray executor against the local one (same shards -> same numbers).

The Ray tests share one local Ray session (2 CPUs, no dashboard) and load the tiny Llama from a
saved folder in every actor; they are skipped when ray is not installed (`make ray`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import probe_pool, ray_test_session, write_jsonl
from mechsieve.data.records import Pool
from mechsieve.engine import (
    EngineConfig,
    EngineError,
    ShardError,
    ShardStore,
    plan_shards,
    score_pool,
    select_pool,
)
from mechsieve.engine.steps import decode_result, encode_result
from mechsieve.models.loading import ModelConfig, load_model
from mechsieve.scorers import ScoreResult, make_scorer
from mechsieve.scorers.baselines import LossConfig, LossScorer

LOCAL = EngineConfig(executor="local", shard_size=3)


def mixed_pool(n: int = 10) -> Pool:
    """probe_pool's mix of math-like and code-like answers, each example made distinct (no tied
    scores, so selections are comparable across batchings)."""
    pool = probe_pool(n, tag="p")
    for i, ex in enumerate(pool.examples):
        ex.response += f" {i * 7 + 3}"
    return pool


def two_source_target() -> Pool:
    exs = probe_pool(4, tag="t").examples
    for i, ex in enumerate(exs):
        ex.source = "math" if i % 2 else "code"
    return Pool(exs, "", "memory", "memory")


def concept_files(folder: Path) -> dict:
    rows = {"positive": [("How many clips?", "The answer is 12 + 30 = 42.")] * 2
            + [("Add the numbers.", "48 + 24 = 72 clips in May.")],
            "negative": [("Write a function.", "def similar_elements(a, b): return a")] * 2
            + [("Tell a story.", "Once upon a time there was a little dog.")]}
    files = {}
    for side, pairs in rows.items():
        files[side] = str(write_jsonl(folder / f"{side}.jsonl", [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]))
    return {**files, "probe": {"layer": 1, "holdout": 0.0}, "max_len": 64}


def igds_settings(folder: Path) -> dict:
    from mechsieve.features.sae import random_sae, write_sae

    sae = write_sae(folder / "sae", random_sae(32, 48, layer=1))
    # a random SAE fires on every example (no pool reference), and its random latents rarely beat
    # their random-direction controls (keep the best instead of stopping)
    return {"sae": str(sae), "freq_threshold": 0.0, "top_k": 3, "dev_size": 2, "alphas": [3.0],
            "render": {"max_len": 64}, "reference": "none", "none_kept": "best"}


# (method, settings or settings(folder)): sharded scorers checked on both executors
SHARDED = [
    ("loss", {}),
    ("ifd", {"drop_above_one": False}),
    ("nait", {"layers": [0, -1], "drift": "mean", "normalize": "pool", "capabilities": "source"}),
    ("rds", {"pooling": "mean_response"}),
    ("vector-filter", concept_files),
    ("igds", igds_settings),
    ("grad-sim", lambda p: {**concept_files(p), "proj_in": 4, "proj_out": 4}),
]


def settings_for(spec, folder: Path) -> dict:
    return spec(folder) if callable(spec) else spec


# --- shard plans and the store (no model) --------------------------------------------------------

def test_shard_plan_is_contiguous_and_deterministic():
    pool = mixed_pool(10)
    plan = plan_shards(pool.examples, 4)
    assert [(s.index, s.start, s.stop) for s in plan] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert [ex.id for s in plan for ex in s.examples] == [ex.id for ex in pool.examples]
    again = plan_shards(mixed_pool(10).examples, 4)
    assert [[ex.id for ex in s.examples] for s in again] == [[ex.id for ex in s.examples] for s in plan]
    assert plan[2].describe() == "shard 2 (examples 8..9, first id 'p8')"
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(pool.examples, 0)
    with pytest.raises(ValueError, match="engine.executor"):
        EngineConfig(executor="spark")


def test_store_writes_marker_last_and_refuses_other_settings(tmp_path):
    from mechsieve.store.artefacts import SettingsMismatch

    store = ShardStore(tmp_path / "s", {"method": "loss", "pool": "abc"})
    result = ScoreResult(np.array([0.5, 1.5]), {"tokens": 3}, {"forward": 0.1}, np.ones((2, 2)), ["a", "b"],
                         {"proj": np.arange(6.0).reshape(2, 3)})
    store.write(4, encode_result(result))
    assert store.done() == {4}
    back = decode_result(store.read(4))
    np.testing.assert_array_equal(back.scores, result.scores)
    np.testing.assert_array_equal(back.arrays["proj"], result.arrays["proj"])
    assert back.target_names == ["a", "b"] and back.explanations == {"tokens": 3}
    # a data file without its marker is not a finished shard
    (tmp_path / "s" / "shard-00005.safetensors").write_bytes(b"half")
    assert store.done() == {4}
    with pytest.raises(FileNotFoundError, match="not finished"):
        store.read(5)
    state = store.save_state({"names": ("a",), "n": np.int64(3), "dirs": np.eye(2, dtype=np.float32)})
    loaded = ShardStore(tmp_path / "s", {"method": "loss", "pool": "abc"}).load_state()
    assert loaded["names"] == ["a"] == state["names"] and loaded["n"] == 3
    np.testing.assert_array_equal(loaded["dirs"], np.eye(2, dtype=np.float32))
    with pytest.raises(SettingsMismatch, match="pool: 'abc' there, 'xyz' here"):
        ShardStore(tmp_path / "s", {"method": "loss", "pool": "xyz"})
    fresh = ShardStore(tmp_path / "s", {"method": "loss", "pool": "xyz"}, overwrite=True)
    assert fresh.done() == set() and fresh.load_state() is None


# --- the local executor ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_model(model_dir):
    """The tiny Llama loaded from its saved folder, as every Ray actor loads it."""
    return load_model(ModelConfig(name=str(model_dir), device="cpu"))


@pytest.mark.parametrize("method, spec", SHARDED, ids=[m for m, _ in SHARDED])
def test_local_shards_match_one_pass(method, spec, folder_model, tmp_path):
    settings = settings_for(spec, tmp_path)
    pool, target = mixed_pool(10), two_source_target()
    whole = make_scorer(method, settings).score(pool, target=target, loaded=folder_model, progress=False)
    sharded, report = score_pool(make_scorer(method, settings), pool, target=target, model=folder_model,
                                 engine=LOCAL, folder=tmp_path / "shards", progress=False)
    assert report["shards"] == 4 and report["ran"] == 4 and report["resumed"] == 0
    # other batches (3-example shards vs one pass), so equal up to float error
    np.testing.assert_allclose(sharded.scores, whole.scores, rtol=1e-5, atol=1e-6)
    if whole.per_target is not None:
        np.testing.assert_allclose(sharded.per_target, whole.per_target, rtol=1e-5, atol=1e-6)
    assert sharded.target_names == whole.target_names
    assert set(sharded.explanations) == set(whole.explanations)
    assert not (tmp_path / "shards").exists()  # removed after a finished run


def test_nait_pool_normalisation_uses_the_whole_pool(folder_model, tmp_path):
    settings = {"layers": [0, -1], "normalize": "pool", "capabilities": "single"}
    pool = mixed_pool(10)
    result, _ = score_pool(make_scorer("nait", settings), pool, target=two_source_target(), model=folder_model,
                           engine=LOCAL, folder=tmp_path / "s", progress=False)
    # z-normalised per layer over all 10 examples, then summed over 2 layers: the scores sum to 0
    assert abs(result.scores.sum()) < 1e-9
    assert result.explanations["layer_terms"]["target"]["pool_mean"] == [0.0, 0.0]


@dataclass
class PoisonConfig(LossConfig):
    """The loss baseline, plus a file that records the first id of each shard scored and a file
    holding an example id that fails (emptied to lift the failure without changing a setting)."""

    counter: str = ""
    poison: str = ""


class PoisonLoss(LossScorer):
    name = "poison-loss"
    config_cls = PoisonConfig

    def score_shard(self, shard, state, loaded=None, progress=True):
        bad = Path(self.config.poison).read_text().strip()
        with open(self.config.counter, "a") as f:
            f.write(shard.examples[0].id + "\n")
        if any(ex.id == bad for ex in shard.examples):
            raise ValueError(f"poisoned example {bad}")
        return super().score_shard(shard, state, loaded, progress)


def poisoned(tmp_path: Path, bad: str = "p7") -> tuple[PoisonLoss, Path, Path]:
    counter, poison = tmp_path / "counter.txt", tmp_path / "poison.txt"
    poison.write_text(bad)
    return PoisonLoss({"counter": str(counter), "poison": str(poison)}), counter, poison


def scored_shards(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def check_failed_shard_left_nothing(folder: Path, index: int) -> None:
    assert not list(folder.glob(f"shard-{index:05d}*")), "the failing shard left output behind"
    assert not list(folder.glob(".*.tmp")), "a temporary file was left behind"


FAILED_2 = r"shard 2 \(examples 6\.\.8, first id 'p6'\) failed: ValueError: poisoned example p7"


def test_local_resume_skips_finished_shards_and_failure_leaves_no_output(folder_model, tmp_path):
    pool, folder = mixed_pool(10), tmp_path / "shards"
    engine = EngineConfig(executor="local", shard_size=3, keep_shards=True)
    scorer, counter, poison = poisoned(tmp_path)
    with pytest.raises(ShardError, match=FAILED_2) as err:
        score_pool(scorer, pool, model=folder_model, engine=engine, folder=folder, progress=False)
    assert err.value.shard == 2
    assert scored_shards(counter) == ["p0", "p3", "p6"]
    assert {p.name for p in folder.glob("*.done")} == {"shard-00000.done", "shard-00001.done"}
    check_failed_shard_left_nothing(folder, 2)
    marks = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.done")}
    # other settings are refused, naming the difference
    with pytest.raises(Exception, match="direction: 'high' there, 'low' here"):
        score_pool(PoisonLoss({**scorer.settings(), "direction": "low"}), pool, model=folder_model, engine=engine,
                   folder=folder, progress=False)
    # the cause lifted, the rerun computes only the unfinished shards
    poison.write_text("")
    counter.unlink()
    result, report = score_pool(scorer, pool, model=folder_model, engine=engine, folder=folder, progress=False)
    assert scored_shards(counter) == ["p6", "p9"]
    assert report["resumed"] == 2 and report["ran"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-0000[01].done")} == marks
    whole = LossScorer().score(pool, loaded=folder_model, progress=False)
    np.testing.assert_allclose(result.scores, whole.scores, rtol=1e-5)


def test_select_through_the_engine_matches_select_examples(folder_model, tmp_path):
    from mechsieve.select import select_examples

    pool, target = mixed_pool(10), two_source_target()
    plain = select_examples("rds", pool, 4, target=target, loaded=folder_model, progress=False)
    sharded = select_pool("rds", pool, 4, target=target, model=folder_model, engine=LOCAL, folder=tmp_path / "s",
                          progress=False)
    assert sharded.ids == plain.ids
    np.testing.assert_array_equal(sharded.selected, plain.selected)
    assert sharded.settings["engine"]["shards"] == 4


def test_whole_pool_methods_run_locally_and_are_refused_on_ray(folder_model, tmp_path):
    pool = mixed_pool(6)
    result, report = score_pool("kcenter", pool, model=folder_model, engine=LOCAL, folder=tmp_path, progress=False)
    assert report["executor"] == "in-process" and result.scores.shape == (6,)
    with pytest.raises(EngineError, match="kcenter needs the whole pool.*--engine local"):
        score_pool("kcenter", pool, model=folder_model, engine=EngineConfig(executor="ray"), folder=tmp_path)
    # random needs no model: it runs on the driver whatever the engine, without starting Ray
    result, report = score_pool("random", pool, engine=EngineConfig(executor="ray"), folder=tmp_path)
    assert report["executor"] == "in-process"


def test_missing_ray_names_the_install_command(monkeypatch, folder_model, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(EngineError, match=r"pip install 'mechsieve\[ray\]'"):
        score_pool("loss", mixed_pool(4), model=folder_model, engine=EngineConfig(executor="ray"), folder=tmp_path)


def test_ray_refuses_an_actor_pool_the_cluster_cannot_hold():
    from mechsieve.engine.ray_executor import RayExecutor

    with pytest.raises(EngineError, match=r"2 actors x engine.gpus_per_actor=1 need 2 GPUs, but the Ray cluster "
                                          r"has 0.*--actors"):
        RayExecutor(actors=2, gpus_per_actor=1).check_resources({"CPU": 16.0}, 2)
    RayExecutor(actors=2).check_resources({"CPU": 2.0}, 2)


def test_in_memory_models_are_refused_for_ray_actors(loaded):
    import pickle

    from mechsieve.engine.steps import ScoreStep

    step = ScoreStep(make_scorer("loss"), {}, loaded)
    with pytest.raises(EngineError, match="save_pretrained"):
        pickle.dumps(step)


def test_capture_and_token_scores_through_shards_match_one_pass(folder_model, tmp_path):
    from mechsieve.capture.activations import CaptureConfig, capture_pool
    from mechsieve.data.render import RenderConfig, render_pool
    from mechsieve.engine import capture_sharded, token_scores_sharded
    from mechsieve.tokens.xtf import Xtf, XtfConfig

    pool, render_cfg = mixed_pool(7), RenderConfig(max_len=64)
    cfg = CaptureConfig(layers=[0, 2], reductions=["mean_response", "last"])
    whole, _ = capture_pool(folder_model, pool, cfg, render_cfg, progress=False)
    sharded, report = capture_sharded(folder_model, pool, cfg, render_cfg, tmp_path / "cap", LOCAL, progress=False)
    for name in cfg.reductions:
        np.testing.assert_allclose(sharded.arrays[name], whole.arrays[name], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "cap" / "activations.json").read_text())["ids"] == [ex.id for ex in pool.examples]
    assert not (tmp_path / "cap" / "shards").exists()

    words = ["clips", "answer", "function"]
    rendered, _ = render_pool(pool.examples, folder_model.tokenizer, render_cfg)
    # the paper's three attributes; the robust preset with contextual TR against an in-domain set
    # (its centre is the in-domain states' mean, not the shard's, so shards agree with one pass)
    for xcfg, target, names in ((XtfConfig(preset="paper", max_tokens=200), None, {"ri", "kn", "tr"}),
                                (XtfConfig(max_tokens=200, tr_layer=1), mixed_pool(3).examples, {"ri", "tr"})):
        one = Xtf(xcfg, words=words, target=target, render_cfg=render_cfg).score(
            folder_model.model, folder_model.tokenizer, rendered, progress=False)
        shards = token_scores_sharded(folder_model, pool.examples, xcfg, words, render_cfg,
                                      tmp_path / f"tok-{xcfg.preset}", LOCAL, progress=False, target=target)
        assert set(shards.scores) == set(one.scores) == names
        for name in names:
            for a, b in zip(shards.scores[name], one.scores[name]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert all(np.array_equal(a, b) for a, b in zip(shards.eligible, one.eligible))


def test_a_rerun_with_another_shard_size_never_reuses_shards_of_other_examples(folder_model, tmp_path,
                                                                              monkeypatch):
    from mechsieve.capture.activations import CaptureConfig
    from mechsieve.data.render import RenderConfig
    from mechsieve.engine import capture_sharded
    from mechsieve.engine.steps import CaptureStep
    from mechsieve.store.artefacts import SettingsMismatch, artefact_exists, load_artefact

    pool, render_cfg = mixed_pool(9), RenderConfig(max_len=64)
    cfg = CaptureConfig(layers=[0, 2], reductions=["mean_response"])
    # 9 examples in shards of 4 or of 3: three shards either way, over other examples
    assert len(plan_shards(pool.examples, 4)) == len(plan_shards(pool.examples, 3)) == 3
    whole, _ = capture_sharded(folder_model, pool, cfg, render_cfg, tmp_path / "whole", EngineConfig(shard_size=3),
                               progress=False)
    run = CaptureStep.run

    def ctrl_c_at_shard_2(self, shard):
        if shard.index == 2:
            raise KeyboardInterrupt
        return run(self, shard)

    folder = tmp_path / "cap"
    monkeypatch.setattr(CaptureStep, "run", ctrl_c_at_shard_2)
    with pytest.raises(KeyboardInterrupt):  # shards 0 and 1 (p0..p7) finished
        capture_sharded(folder_model, pool, cfg, render_cfg, folder, EngineConfig(shard_size=4), progress=False)
    monkeypatch.undo()
    with pytest.raises(SettingsMismatch, match="shard_size: 4 there, 3 here"):
        capture_sharded(folder_model, pool, cfg, render_cfg, folder, EngineConfig(shard_size=3), progress=False)
    assert not artefact_exists(folder, "activations")
    result, report = capture_sharded(folder_model, pool, cfg, render_cfg, folder,
                                     EngineConfig(shard_size=3, overwrite=True), progress=False)
    assert report["engine"]["ran"] == 3 and report["engine"]["resumed"] == 0
    tensors, meta = load_artefact(folder, "activations")
    np.testing.assert_array_equal(tensors["mean_response"], whole.arrays["mean_response"])
    np.testing.assert_array_equal(tensors["n_response_tokens"], whole.n_response_tokens)
    assert meta["ids"] == [ex.id for ex in pool.examples]


def test_shards_are_checked_against_the_ids_they_cover_before_anything_is_saved(folder_model, tmp_path,
                                                                               monkeypatch):
    from mechsieve.capture.activations import CaptureConfig
    from mechsieve.data.render import RenderConfig
    from mechsieve.engine import capture_sharded
    from mechsieve.engine.steps import CaptureStep
    from mechsieve.store.artefacts import artefact_exists

    pool, render_cfg = mixed_pool(6), RenderConfig(max_len=64)
    cfg = CaptureConfig(layers=[0], reductions=["mean_response"])
    engine = EngineConfig(shard_size=3, keep_shards=True)
    folder = tmp_path / "cap"
    run = CaptureStep.run

    def drop_a_row(self, shard):  # a step that loses an example is an error, never a saved file
        out = run(self, shard)
        if shard.index == 1:
            out.arrays["mean_response"] = out.arrays["mean_response"][:-1]
        return out

    monkeypatch.setattr(CaptureStep, "run", drop_a_row)
    with pytest.raises(ShardError, match=r"shard 1 \(examples 3\.\.5, first id 'p3'\): mean_response has 2 "
                                         r"rows for its 3 examples") as err:
        capture_sharded(folder_model, pool, cfg, render_cfg, folder, engine, progress=False)
    assert err.value.shard == 1
    monkeypatch.undo()
    assert not artefact_exists(folder, "activations")
    shards = folder / "shards"
    assert {p.name for p in shards.glob("*.done")} == {"shard-00000.done"}
    # a finished shard whose marker names other examples than the plan's is computed again
    marker = json.loads((shards / "shard-00000.done").read_text())
    assert marker["ids"] == ["p0", "p1", "p2"] and marker["rows"] == 3
    (shards / "shard-00000.done").write_text(json.dumps({**marker, "ids": ["p1", "p2", "p3"]}))
    store = ShardStore(shards, json.loads((shards / "run.json").read_text())["settings"])
    assert store.done() == {0} and store.done(plan_shards(pool.examples, 3)) == set()
    with pytest.raises(EngineError, match=r"shard-00000.done: shard 0 holds ids 'p1'..'p3' \(3\), but the "
                                          r"plan's shard 0 has 'p0'..'p2' \(3\)"):
        store.read(0, ["p0", "p1", "p2"])
    result, report = capture_sharded(folder_model, pool, cfg, render_cfg, folder, engine, progress=False)
    assert report["engine"]["ran"] == 2 and report["engine"]["resumed"] == 0
    whole, _ = capture_sharded(folder_model, pool, cfg, render_cfg, tmp_path / "whole", engine, progress=False)
    np.testing.assert_array_equal(result.arrays["mean_response"], whole.arrays["mean_response"])


# --- the commands ------------------------------------------------------------------------------

def pool_files(tmp_path: Path) -> tuple[Path, Path]:
    def rows(pool: Pool) -> list[dict]:
        return [{"messages": [*ex.prompt, {"role": "assistant", "content": ex.response}]} for ex in pool.examples]

    return (write_jsonl(tmp_path / "pool.jsonl", rows(mixed_pool(8))),
            write_jsonl(tmp_path / "target.jsonl", rows(two_source_target())))


def test_commands_with_shards_write_what_one_pass_writes(model_dir, tmp_path, capsys):
    import datasets
    import pandas as pd

    from mechsieve.cli import main

    pool, target = pool_files(tmp_path)
    common = ["--pool", str(pool), "--model", str(model_dir), "--quiet"]
    sel = ["select", "--method", "rds", "--target", str(target), "--budget", "3", *common]
    assert main([*sel, "--out", str(tmp_path / "one")]) == 0
    assert main([*sel, "--out", str(tmp_path / "sharded"), "--engine", "local", "--shard-size", "3"]) == 0
    assert "engine local: 3 shards of 3 (0 resumed" in capsys.readouterr().out
    one, sharded = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("one", "sharded"))
    assert list(sharded["selected"]) == list(one["selected"])
    np.testing.assert_allclose(sharded["score"], one["score"], rtol=1e-5)
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert summary["settings"]["engine"]["shards"] == 3 and not (tmp_path / "sharded" / "shards").exists()

    cap = ["capture", *common, "--layers", "0,2", "--max-len", "64"]
    assert main([*cap, "--out", str(tmp_path / "c1")]) == 0
    assert main([*cap, "--out", str(tmp_path / "c2"), "--shard-size", "3"]) == 0
    from mechsieve.store.artefacts import load_artefact

    a, _ = load_artefact(tmp_path / "c1", "activations")
    b, _ = load_artefact(tmp_path / "c2", "activations")
    np.testing.assert_allclose(b["mean_response"], a["mean_response"], rtol=1e-5, atol=1e-6)

    mask = ["mask-tokens", *common, "--domain", "math", "--set", "xtf.tr_classes=3"]
    assert main([*mask, "--out", str(tmp_path / "m1")]) == 0
    assert main([*mask, "--out", str(tmp_path / "m2"), "--shard-size", "3"]) == 0
    m1, m2 = (datasets.load_from_disk(str(tmp_path / d)) for d in ("m1", "m2"))
    assert m1["labels"] == m2["labels"] and m1["mask_reason"] == m2["mask_reason"]


def test_ray_engine_refuses_whole_pool_methods_before_loading_anything(model_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    from mechsieve.cli import main

    pool, _ = pool_files(tmp_path)
    code = main(["select", "--method", "kcenter", "--pool", str(pool), "--model", "/nonexistent/model",
                 "--engine", "ray", "--quiet", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "kcenter needs the whole pool" in err and "nait" in err and "--engine local" in err


# --- the Ray executor ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    yield from ray_test_session(tmp_path_factory, __name__)


# Each Ray run starts its actors afresh (a Python process, torch, the model): seconds each on a
# busy 2-core machine, so the Ray tests are few; every sharded scorer goes through the same
# ScoreStep, whose shard equivalence the local tests above check one by one.
RAY = EngineConfig(executor="ray", shard_size=3, actors=2)
RAY_ONE_ACTOR = EngineConfig(executor="ray", shard_size=3, actors=1)


def cpus_free(ray, wait: float = 20.0) -> float:
    """The CPUs free in the Ray session once it settles (killed actors hand theirs back a moment
    later), waiting at most `wait` seconds for all of them."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + wait
    while (free := ray.available_resources().get("CPU", 0.0)) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_ray_gives_the_local_scores_and_selection(ray_session, model_dir, folder_model, tmp_path):
    config = ModelConfig(name=str(model_dir), device="cpu")
    pool, target = mixed_pool(10), two_source_target()
    ctx = ray_session.data.DataContext.get_current()
    bars = ctx.enable_progress_bars  # the run quiets Ray Data's bars and puts them back after
    # nait: two capabilities (union selection), normalised over the whole pool in `combine`;
    # vector-filter: a concept fitted on the driver and shipped to the actor
    for (method, spec), engine in ((SHARDED[2], RAY), (SHARDED[4], RAY_ONE_ACTOR)):
        (tmp_path / method).mkdir()
        settings = settings_for(spec, tmp_path / method)
        local = select_pool(method, pool, 4, target=target, model=folder_model, settings=settings, engine=LOCAL,
                            folder=tmp_path / method / "local", progress=False)
        remote = select_pool(method, pool, 4, target=target, model=config, settings=settings, engine=engine,
                             folder=tmp_path / method / "ray", progress=False)
        np.testing.assert_array_equal(remote.scores, local.scores, err_msg=method)
        assert remote.ids == local.ids, method
        assert remote.settings["engine"]["executor"] == "ray" and remote.settings["engine"]["ran"] == 4
        assert remote.explanations == local.explanations
        assert cpus_free(ray_session) == 2.0, f"{method}: the finished run's actors still hold CPUs"
        assert ctx.enable_progress_bars == bars, method


def test_ray_resumes_a_stopped_local_run_and_surfaces_a_failing_shard(ray_session, model_dir, folder_model,
                                                                      tmp_path):
    config = ModelConfig(name=str(model_dir), device="cpu")
    pool, folder = mixed_pool(10), tmp_path / "shards"
    scorer, counter, poison = poisoned(tmp_path)
    with pytest.raises(ShardError, match="shard 2"):  # a local run, stopped at shard 2
        score_pool(scorer, pool, model=folder_model, engine=EngineConfig(shard_size=3, keep_shards=True),
                   folder=folder, progress=False)
    # Ray resumes it: the failing shard fails there too, named, and leaves nothing behind
    ray_keep = EngineConfig(executor="ray", shard_size=3, actors=2, keep_shards=True)
    with pytest.raises(ShardError, match=FAILED_2) as err:
        score_pool(scorer, pool, model=config, engine=ray_keep, folder=folder, progress=False)
    assert err.value.shard == 2
    check_failed_shard_left_nothing(folder, 2)
    # shard 3 ran beside shard 2 and may have finished before the failure stopped the run
    done = {int(p.stem.split("-")[1]) for p in folder.glob("*.done")}
    assert {0, 1} <= done and 2 not in done
    # with the cause gone, Ray computes only the shards not finished before
    poison.write_text("")
    counter.unlink()
    result, report = score_pool(scorer, pool, model=config, engine=ray_keep, folder=folder, progress=False)
    assert sorted(scored_shards(counter)) == [f"p{3 * k}" for k in sorted({0, 1, 2, 3} - done)]
    assert report["resumed"] == len(done)
    local, _ = score_pool(LossScorer(), pool, model=folder_model, engine=LOCAL, folder=tmp_path / "l",
                          progress=False)
    np.testing.assert_array_equal(result.scores, local.scores)


def test_ray_capture_matches_local(ray_session, model_dir, folder_model, tmp_path):
    from mechsieve.capture.activations import CaptureConfig
    from mechsieve.data.render import RenderConfig
    from mechsieve.engine import capture_sharded

    config = ModelConfig(name=str(model_dir), device="cpu")
    pool, render_cfg = mixed_pool(7), RenderConfig(max_len=64)
    cfg = CaptureConfig(layers=[0, 2], reductions=["mean_response", "drift"])
    local, _ = capture_sharded(folder_model, pool, cfg, render_cfg, tmp_path / "a", LOCAL, progress=False)
    remote, report = capture_sharded(config, pool, cfg, render_cfg, tmp_path / "b", RAY_ONE_ACTOR, progress=False)
    assert report["engine"]["executor"] == "ray" and report["engine"]["shards"] == 3
    for name in cfg.reductions:
        np.testing.assert_array_equal(remote.arrays[name], local.arrays[name])
    np.testing.assert_array_equal(remote.n_response_tokens, local.n_response_tokens)


def test_ray_runs_hand_every_cpu_back_after_a_failing_shard(ray_session, model_dir, folder_model, tmp_path):
    # a failed run's actors once kept both CPUs, so the next run in the session waited forever
    config = ModelConfig(name=str(model_dir), device="cpu")
    pool = mixed_pool(4)
    # the failing runs take both CPUs, as when the leak hung the suite; one actor resumes (cheaper)
    failing, resuming = (EngineConfig(executor="ray", shard_size=2, actors=n) for n in (2, 1))
    scorer, counter, poison = poisoned(tmp_path, bad="p3")
    whole = LossScorer().score(pool, loaded=folder_model, progress=False)
    for round in range(3):
        folder = tmp_path / f"round{round}"
        poison.write_text("p3")
        with pytest.raises(ShardError, match=r"shard 1 \(examples 2\.\.3, first id 'p2'\) failed"):
            score_pool(scorer, pool, model=config, engine=failing, folder=folder, progress=False)
        assert cpus_free(ray_session) == 2.0, f"round {round}: the failed run's actors still hold CPUs"
        poison.write_text("")
        result, report = score_pool(scorer, pool, model=config, engine=resuming, folder=folder, progress=False)
        assert report["ran"] + report["resumed"] == 2 and report["ran"] >= 1
        np.testing.assert_allclose(result.scores, whole.scores, rtol=1e-5)
        assert cpus_free(ray_session) == 2.0, f"round {round}: the finished run's actors still hold CPUs"


@dataclass
class SlowConfig(LossConfig):
    """The loss baseline, plus a file each shard writes its first id to as it starts, and seconds
    each shard then waits."""

    started: str = ""
    seconds: float = 0.0


class SlowLoss(LossScorer):
    name = "slow-loss"
    config_cls = SlowConfig

    def score_shard(self, shard, state, loaded=None, progress=True):
        with open(self.config.started, "a") as f:
            f.write(shard.examples[0].id + "\n")
        time.sleep(self.config.seconds)
        return super().score_shard(shard, state, loaded, progress)


def test_ray_run_stopped_by_ctrl_c_hands_every_cpu_back(ray_session, model_dir, tmp_path):
    """Ctrl-C while actors are inside their shards stops the run and frees every CPU. A Ctrl-C that
    lands while the main thread runs a finalizer (`__del__`, e.g. of an earlier run's Ray Data
    iterator collected just then) is swallowed by Python ("Exception ignored in ..."), whatever the
    engine does; a user presses again, and so does this test: once more each 45 s the run has not
    stopped, at most 3 presses, with a warning when it took more than one."""
    import _thread
    import threading

    config = ModelConfig(name=str(model_dir), device="cpu")
    started = tmp_path / "started.txt"
    scorer = SlowLoss({"started": str(started), "seconds": 120.0})
    done = threading.Event()
    presses = []

    def press_ctrl_c() -> None:  # once an actor is inside a shard, the driver waits for its output
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        while len(presses) < 3 and not done.is_set():
            presses.append(time.monotonic())
            _thread.interrupt_main()
            done.wait(45)

    def run() -> None:
        try:
            score_pool(scorer, mixed_pool(4), model=config, engine=EngineConfig(executor="ray", shard_size=2, actors=2),
                       folder=tmp_path / "shards", progress=False)
        finally:
            done.set()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run()
    assert presses, "the run ended before Ctrl-C was pressed"
    assert time.monotonic() - presses[-1] < 40, "Ctrl-C did not stop the run"
    assert time.monotonic() - start < 100 + 45 * (len(presses) - 1)
    if len(presses) > 1:
        import warnings

        warnings.warn(f"the Ray run stopped at Ctrl-C number {len(presses)}: the first was swallowed", stacklevel=1)
    assert cpus_free(ray_session) == 2.0, "the interrupted run's actors still hold CPUs"


def test_ray_scores_several_methods_from_one_shared_pass_per_shard(ray_session, model_dir, folder_model, tmp_path):
    from mechsieve.engine import select_pool_many

    config = ModelConfig(name=str(model_dir), device="cpu")
    pool, target = mixed_pool(10), two_source_target()
    settings = {"loss": {}, "rds": {}, "nait": {"normalize": "pool"}, "random": {}}
    local, _ = select_pool_many(settings, pool, 4, target=target, model=folder_model, engine=LOCAL,
                                folder=tmp_path / "local", progress=False)
    remote, report = select_pool_many(settings, pool, 4, target=target, model=config, engine=RAY_ONE_ACTOR,
                                      folder=tmp_path / "ray", progress=False)
    for method in settings:
        np.testing.assert_array_equal(remote[method].scores, local[method].scores, err_msg=method)
        assert remote[method].ids == local[method].ids, method
    assert report["shared"] == ["loss", "nait", "rds"]
    assert report["engine"]["executor"] == "ray" and report["engine"]["ran"] == 4
    assert remote["loss"].settings["engine"]["shards"] == 4
