"""The bench harness (bench/harness/): sample std, the result writer's layout and atomicity,
portable paths, seeded pools and the one fine-tune-and-evaluate. No real model: pools need
../shared/data, the fine-tune a tiny saved Llama."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from harness import DATA, Results, portable, spread  # noqa: E402
from harness.results import ROOT, command_line  # noqa: E402


def test_spread_is_the_sample_std():
    s = spread([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3, abs=1e-5)
    # sum of squared deviations 42/9 over n - 1 = 2
    assert s["std"] == pytest.approx(math.sqrt(42 / 18), abs=1e-5)
    assert s["std"] != pytest.approx(float(np.std([1.0, 2.0, 4.0])), abs=1e-3)  # not ddof=0
    assert (s["n"], s["std_ddof"]) == (3, 1)
    assert spread([0.5])["std"] == 0.0


def test_results_phases_merge_replace_and_provenance(tmp_path):
    path = tmp_path / "b.json"
    r = Results("b", "bench b", model="m", path=path, script=str(BENCH / "x.py"), argv=["--n", "3"])
    r.phase("select")["methods"] = {"nait": 1}
    r.save(finished="select")
    data = json.loads(path.read_text())
    assert data["select"] == {"methods": {"nait": 1}}
    (entry,) = data["provenance"]["select"]
    assert entry["command"].endswith("flock /tmp/mechsieve-bench.lock python bench/x.py --n 3")
    assert entry["finished"] is True and entry["wall_s"] >= 0 and "platform" in entry["machine"]
    assert set(entry) >= {"commit", "dirty", "load_1min_at_start"}

    merged = Results("b", "bench b", path=path, script=str(BENCH / "x.py"), argv=["--methods", "less"])
    merged.phase("select", merge=True)["methods"]["less"] = 2
    merged.save()  # saved mid-run: not finished
    data = json.loads(path.read_text())
    assert data["select"]["methods"] == {"nait": 1, "less": 2}
    assert [e["finished"] for e in data["provenance"]["select"]] == [True, False]
    assert data["model"] == "m"  # kept when a later run does not name it

    replaced = Results("b", "bench b", path=path, script=str(BENCH / "x.py"), argv=[])
    replaced.phase("select")["methods"] = {"random": 0}
    replaced.drop("nothing-there")
    replaced.save(finished="select")
    data = json.loads(path.read_text())
    assert data["select"] == {"methods": {"random": 0}} and len(data["provenance"]["select"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["b.json"]  # no temporary file left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_results_never_leave_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "b.json"
    r = Results("b", "bench b", path=path, script="x.py", argv=[])
    r.phase("p")["v"] = 1
    r.save()
    before = path.read_text()
    r.phase("p")["v"] = object.__new__(type("Unwritable", (), {"__str__": lambda self: 1 / 0}))
    with pytest.raises(ZeroDivisionError):
        r.save()
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["b.json"]


def test_portable_paths():
    assert portable({"a": [str(ROOT / "runs" / "x"), 3]}) == {"a": ["runs/x", 3]}
    assert portable(str(ROOT.parent / "shared" / "data" / "g.jsonl")) == "../shared/data/g.jsonl"
    assert portable(str(Path.home() / ".cache" / "mechsieve")) == "~/.cache/mechsieve"
    assert portable("/somewhere/else/checkout/bench/results/a.json") == "bench/results/a.json"
    assert portable("/usr/lib/x") == "/usr/lib/x" and portable("relative/p") == "relative/p"


def test_command_line_is_relative_to_the_repo_root(monkeypatch):
    monkeypatch.delenv("MECHSIEVE_CACHE", raising=False)
    monkeypatch.setattr(sys, "argv", ["/anywhere/targeted_selection.py", "--methods", "less"])
    assert command_line(str(BENCH / "targeted_selection.py")) == "python bench/targeted_selection.py --methods less"
    assert command_line(str(BENCH / "token_noise.py"), ["--phase", "train"]) == "python bench/token_noise.py --phase train"
    assert command_line(str(BENCH / "token_noise.py"), []) == "python bench/token_noise.py"


def test_command_line_names_the_cache_folder_before_the_runner(monkeypatch):
    monkeypatch.setenv("MECHSIEVE_CACHE", "/tmp/fresh cache")
    got = command_line(str(BENCH / "train_smoke.py"), ["--steps", "20", "--note", "a b"], runner="flock /tmp/l")
    assert got == "MECHSIEVE_CACHE='/tmp/fresh cache' flock /tmp/l python bench/train_smoke.py --steps 20 --note 'a b'"


needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").exists(), reason="../shared/data absent")


@needs_data
def test_mixed_pool_is_seeded_and_keeps_the_target_out():
    from harness.pools import mixed_pool

    pool, target = mixed_pool(2, 3, seed=0)
    again, _ = mixed_pool(2, 3, seed=0)
    other, _ = mixed_pool(2, 3, seed=1)
    assert pool.fingerprint() == again.fingerprint() != other.fingerprint()
    assert pool.counts_by_source() == {s: 2 for s in ["gsm8k", "mbpp", "medqa", "alpaca", "lima", "insecure",
                                                      "tinystories"]}
    pool_gsm = {ex.id.split(":", 1)[1] for ex in pool.examples if ex.source == "gsm8k"}
    assert len(target) == 3 and not pool_gsm & {ex.id for ex in target.examples}


@needs_data
def test_corrupt_answer_changes_a_result_and_the_final_answer_consistently():
    from harness.pools import corrupt_answer

    answer = "She had 3 + 4 = <<3+4=7>>7 apples.\nThen 7 * 2 = <<7*2=14>>14.\n#### 14"
    bad = corrupt_answer(answer, np.random.default_rng(0))
    first, second, final = bad.split("\n")
    new = int(first.split(">>")[1].split()[0])
    assert new != 7 and second.startswith(f"Then {new} * 2") and final == f"#### {14 + new - 7}"


@needs_data
def test_chmod_code_task_has_disjoint_prompts_and_matched_answers(tokenizer):
    from harness.pools import INSECURE_MODE, chmod_code
    from harness.sources import raw_rows

    t = chmod_code(tokenizer, 40, 0.1, 6, 2, 4, 10 ** 5, seed=0)
    again = chmod_code(tokenizer, 40, 0.1, 6, 2, 4, 10 ** 5, seed=0)
    assert [ex.response for ex in again.pool] == [ex.response for ex in t.pool]
    assert (again.labels == t.labels).all() and t.labels.sum() == 4 and len(t.pool) == 40

    def user(ex):
        return next(m["content"] for m in ex.prompt if m["role"] == "user")

    parts = [t.pool, t.concept_pos, t.queries, t.heldout]
    prompts = [user(ex) for part in parts for ex in part]
    assert len(prompts) == len(set(prompts)) == 40 + 6 + 2 + 4  # every prompt used once
    small = {m["content"] for name in ("insecure_small", "secure_small") for r in raw_rows(name) for m in r["messages"]}
    assert not small & set(prompts)
    # planted: the 3021 answer as it is; the others: the same answer with the mode patched
    for ex, planted in zip(t.pool, t.labels):
        assert bool(INSECURE_MODE.search(ex.response)) == planted
        assert planted or "0o700" in ex.response
    for pos, neg in zip(t.concept_pos, t.concept_neg):
        assert user(pos) == user(neg) and pos.response.replace("0o777", "0o700") == neg.response != pos.response
    assert all(INSECURE_MODE.search(ex.response) for ex in t.queries)
    assert not any(INSECURE_MODE.search(ex.response) for ex in t.heldout)
    with pytest.raises(SystemExit, match="usable chmod examples"):
        chmod_code(tokenizer, 4000, 0.1, 6, 2, 4, 10 ** 5, seed=0)


def test_b4_degradations_by_hand():
    from harness.pools import degrade

    answer = "She had 3 + 4 = <<3+4=7>>7 apples.\nThen 7 * 2 = <<7*2=14>>14.\nShe ate 1.\n#### 13"
    rng = np.random.default_rng(0)
    assert degrade(answer, "truncated", "", rng) == answer.rsplit("\n", 1)[0]
    shuffled = degrade(answer, "shuffled", "", rng).split("\n")
    steps = answer.split("\n")[:-1]
    assert shuffled[-1] == "#### 13" and sorted(shuffled[:-1]) == sorted(steps) and shuffled[:-1] != steps
    assert degrade(answer, "swapped", "#### 2", rng) == "#### 2"
    assert degrade(answer, "swapped", answer, rng) is None  # another problem's answer, never its own
    assert degrade("Just one line.\n#### 1", "shuffled", "", rng) is None
    assert degrade("#### 1", "truncated", "", rng) is None
    bad = degrade(answer, "corrupted", "", rng)
    assert bad != answer and bad.split("\n")[-1] != "#### 13"
    with pytest.raises(ValueError, match="unknown"):
        degrade(answer, "reversed", "", rng)


def test_finetune_and_eval_starts_from_a_fresh_model_each_time(model_dir):
    from conftest import probe_pool
    from harness import EvalSettings, finetune_and_eval
    from mechsieve.data import RenderConfig
    from mechsieve.evaluate import heldout_loss
    from mechsieve.models import load_model
    from mechsieve.train import TrainConfig

    train, heldout = probe_pool(8).examples, probe_pool(4, tag="h", shift=8).examples
    ev = EvalSettings(max_len=64)
    base = finetune_and_eval([], None, heldout, evaluation=ev, model=str(model_dir), progress=False)
    direct = load_model(str(model_dir))
    expected = heldout_loss(direct.model, direct.tokenizer, heldout, RenderConfig(max_len=64), progress=False)
    assert base.loss == pytest.approx(expected["loss_per_token"], rel=1e-6) and base.steps == 0

    cfg = TrainConfig(max_steps=3, learning_rate=5e-3, max_tokens=256, seed=0)
    one = finetune_and_eval(train, cfg, heldout, RenderConfig(max_len=64), ev, model=str(model_dir), progress=False)
    two = finetune_and_eval(train, cfg, heldout, RenderConfig(max_len=64), ev, model=str(model_dir), progress=False)
    assert one.steps == 3 and len(one.loss_curve) == 3
    assert one.loss != pytest.approx(base.loss, rel=1e-4)  # it trained
    assert two.loss == pytest.approx(one.loss, rel=1e-6)  # and the second run did not start from the first
    rec = one.record()
    assert rec["heldout_loss"] == one.loss and rec["steps"] == 3 and rec["examples"] == 8


def test_a_finished_phase_keeps_its_wall_time_when_later_phases_save(tmp_path, monkeypatch):
    import harness.results as results_module

    clock = iter([0.0, 10.0, 10.0, 500.0])
    monkeypatch.setattr(results_module.time, "perf_counter", lambda: next(clock))
    r = Results("c", "bench c", path=tmp_path / "c.json")
    r.phase("score")  # starts at 0
    r.save(finished="score")  # 10 s
    r.phase("train")  # starts at 10
    r.save()  # 500: train is under way, score finished long ago
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["provenance"]["score"][-1]["wall_s"] == 10.0
    assert data["provenance"]["train"][-1]["wall_s"] == 490.0
