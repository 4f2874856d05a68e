"""The fault suite (bench/faults.py) at test size: kill -9 of the CLI at seeded points of each long
command, then a rerun that must give byte-identical outputs without recomputing finished chunks
or shards; and the bad-input table, every row of which must end clearly (exit 2 naming the file
and line, nothing written, or accepted as documented, or skipped and counted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import faults  # noqa: E402


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MECHSIEVE_CACHE": str(tmp_path / "cache"),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["capture", "select-sharded", "mask-tokens", "sae-train", "train"])
def test_a_killed_command_reruns_to_identical_outputs(name, model_dir, tmp_path, env):
    pool = faults.short_pool(tmp_path / "pool.jsonl", 480, seed=1)
    cmd = faults.commands(chunk=64, shard=96)[name]
    res = faults.kill_trials(cmd, str(model_dir), str(pool), tmp_path, kills=1, rng=np.random.default_rng(3),
                             env=env, timeout=600)
    assert "reference_failed" not in res, res.get("reference_failed")
    (trial,) = res["trials"]
    assert trial["torn_files"] == []
    assert trial["rerun_ok"], trial.get("rerun_error")  # exit 0, or its finished output was refused a rerun
    assert trial["identical"], trial.get("differing")
    if cmd.finished is not None and trial["landed"]:
        assert trial["resumed_ok"], (trial["finished_before_rerun"], trial["resumed_reported"])
    assert res["reference_files"], "the reference run wrote none of the data outputs compared"


def test_every_bad_input_ends_clearly(tmp_path):
    rows = faults.bad_inputs(tmp_path)
    assert len(rows) >= 50
    unclear = [r for r in rows if not r["clear"]]
    assert unclear == []
