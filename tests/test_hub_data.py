"""Hub datasets as users name them: config names, split slices, data_files, streaming, revisions.

Never the network: a hub dataset is a local folder in the hub's layout (a README whose `configs:`
name the subsets, as openai/gsm8k's does), read by `datasets.load_dataset` exactly as a hub id is;
saved DatasetDicts stand for `save_to_disk` folders; a hub id offline is refused.
"""

import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from mechsieve.config import ConfigError
from mechsieve.data import DataConfig, DataError, read_pool, write_subset
from mechsieve.data.hub import parse_split

CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
A toy openai/gsm8k: two configs, no default.
"""


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture
def gsm8k(tmp_path):
    """A folder in the hub's layout: configs main and socratic, splits train (10) and test (4)."""
    root = tmp_path / "gsm8k"
    for config in ("main", "socratic"):
        (root / config).mkdir(parents=True)
        for split, n in (("train", 10), ("test", 4)):
            rows = [{"question": f"{config} {split} q{i}", "answer": f"#### {i}"} for i in range(n)]
            pq.write_table(pa.Table.from_pylist(rows), root / config / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(CARD)
    return root


def _questions(pool):
    return [(ex.meta["row"], ex.prompt[0]["content"]) for ex in pool.examples]


SPECS = ["train", "train[:3]", "train[2:5]", "train[-3:]", "train[:-2]", "train[-5:-1]", "train[7:]",
         "train[:10%]", "train[10%:20%]", "train[-25%:]", "train[33%:67%]", "train[:0]", "train[5:2]",
         "train[:1_000]", "train[10%:20%](pct1_dropremainder)", "train[:50%](closest)", "train[:]"]


@pytest.mark.parametrize("n", [0, 7, 10, 123, 250])
def test_split_slices_resolve_to_the_rows_datasets_reads(n):
    from datasets import ReadInstruction

    for spec in SPECS:
        if "pct1" in spec and n < 100:
            with pytest.raises(ConfigError, match="pct1_dropremainder rounding on a split of"):
                parse_split(spec).rows(n)
            continue
        (reference,) = ReadInstruction.from_spec(spec).to_absolute({"train": n})
        rows = parse_split(spec).rows(n)
        assert (rows.start, rows.stop) == (reference.from_, reference.to), (spec, n)


@pytest.mark.parametrize("spec, message", [
    ("train+test", r"data\.split='train\+test': one split at a time"),
    ("train[:x]", r"data\.split='train\[:x\]' is not a split as datasets spells it \(e\.g\. train, test, train\[:1000\]"),
    ("train[:5](closest)", r"a rounding, \(closest\), goes with a percent slice only"),
    ("train[:5%](nearest)", r"rounding \(nearest\) is not allowed; choose closest or pct1_dropremainder"),
    ("train[:150%]", r"a percent bound lies between -100% and 100%"),
])
def test_a_split_datasets_would_not_read_is_refused_naming_the_setting(spec, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(path="x.jsonl", split=spec)


def test_a_dataset_without_a_default_config_needs_a_subset(gsm8k):
    with pytest.raises(DataError, match=r"gsm8k: could not load it with datasets\.load_dataset \(ValueError: Config "
                                        r"name is missing.*\['main', 'socratic'\].*; choose the dataset's config "
                                        r"with --subset NAME \(data\.subset\)"):
        read_pool(gsm8k)
    with pytest.raises(DataError, match=r"BuilderConfig 'nope' not found.*--subset NAME"):
        read_pool(gsm8k, subset="nope")
    with pytest.raises(DataError, match=r"Unknown split \"valid\".*--split NAME \(data\.split\)"):
        read_pool(gsm8k, subset="main", split="valid")
    pool = read_pool(gsm8k, subset="socratic", split="train[2:4]")
    assert pool.container == "datasets" and pool.split == "train"
    assert _questions(pool) == [(2, "socratic train q2"), (3, "socratic train q3")]
    assert _questions(read_pool(gsm8k, subset="main", split="test[50%:]")) == [(2, "main test q2"),
                                                                              (3, "main test q3")]
    assert pool.examples[0].response == "#### 2"


def test_streaming_takes_records_lazily_up_to_the_limit(gsm8k):
    pool = read_pool(DataConfig(path=str(gsm8k), subset="main", streaming=True, limit=3))
    assert _questions(pool) == [(0, "main train q0"), (1, "main train q1"), (2, "main train q2")]
    pool = read_pool(DataConfig(path=str(gsm8k), subset="main", streaming=True, split="train[5:]", limit=2))
    assert _questions(pool) == [(5, "main train q5"), (6, "main train q6")]
    assert len(read_pool(DataConfig(path=str(gsm8k), subset="main", streaming=True, split="test[1:3]"))) == 2
    with pytest.raises(ConfigError, match=r"data\.split='train\[-10%:\]': a percent slice or one counted from the "
                                          r"end needs the split's length, which streaming does not know"):
        read_pool(DataConfig(path=str(gsm8k), subset="main", streaming=True, split="train[-10%:]"))


def test_data_files_pick_the_files_of_a_folder_or_feed_a_builder(gsm8k):
    pool = read_pool(DataConfig(path=str(gsm8k), data_files={"train": "socratic/test-*"}))
    assert [q for _, q in _questions(pool)] == [f"socratic test q{i}" for i in range(4)]
    files = str(gsm8k / "main" / "test-*.parquet")
    pool = read_pool(DataConfig(path="parquet", data_files=files, split="train[-1:]"))
    assert pool.container == "datasets" and _questions(pool) == [(3, "main test q3")]
    # a folder of data files and no card is a dataset folder too
    (gsm8k / "README.md").unlink()
    assert len(read_pool(DataConfig(path=str(gsm8k / "main"), split="test"))) == 4


def test_settings_that_mean_nothing_for_the_input_are_refused(tmp_path, gsm8k):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"data\.subset='main': .*p\.jsonl is a jsonl file, and subset applies to "
                                          r"hub ids and dataset folders only"):
        read_pool(path, subset="main")
    with pytest.raises(ConfigError, match=r"data\.revision='v1': .*gsm8k is a local dataset, and revision applies "
                                          r"to hub ids only"):
        read_pool(DataConfig(path=str(gsm8k), subset="main", revision="v1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder, but neither one written by datasets\.save_to_disk .* nor "
                                        r"one holding data files \(\.parquet, \.jsonl, \.json, \.csv, \.arrow\)"):
        read_pool(tmp_path / "empty")


def test_a_hub_id_offline_is_still_refused_whatever_the_settings(monkeypatch, capsys):
    from mechsieve.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(path="openai/gsm8k", subset="main", split="train[:1000]", revision="main", streaming=True)
    with pytest.raises(DataError, match=r"^openai/gsm8k: looks like a hub dataset id, but the hub is offline here "
                                        r"\(HF_HUB_OFFLINE=1\); pass a local file or a save_to_disk folder$"):
        read_pool(cfg)
    assert main(["info", "--pool", "openai/gsm8k", "--subset", "main", "--split", "train[:1000]"]) == 2
    assert "openai/gsm8k: looks like a hub dataset id, but the hub is offline" in capsys.readouterr().err


def _saved_dict(path, empty_test=True):
    import datasets

    full = datasets.Dataset.from_list([{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    test = datasets.Dataset(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}))
    if not empty_test:
        test = datasets.Dataset.from_list([{"question": "t0", "answer": "b0"}])
    datasets.DatasetDict({"train": full, "test": test}).save_to_disk(str(path))
    return path


def test_a_saved_datasetdict_with_an_empty_other_split_reads(tmp_path):
    # load_from_disk on the whole dict fails with an IndexError on the empty split
    dd = _saved_dict(tmp_path / "dd")
    assert [q for _, q in _questions(read_pool(dd))] == [f"q{i}" for i in range(10)]
    pool = read_pool(dd)  # and a subset of it writes back (the writer opens the one split too)
    out = write_subset(pool, [pool.examples[2].id, pool.examples[5].id], tmp_path / "sub")
    assert _questions(read_pool(out)) == [(0, "q2"), (1, "q5")]
    assert _questions(read_pool(dd, split="train[-2:]")) == [(8, "q8"), (9, "q9")]
    with pytest.raises(DataError, match=r"dd: no records$"):
        read_pool(dd, split="test")
    with pytest.raises(DataError, match=r"dd: a DatasetDict without split 'validation'; it has \['train', 'test'\] "
                                        r"\(set --split or data\.split\)"):
        read_pool(dd, split="validation")


def test_slices_count_rows_in_the_whole_split_and_write_back(tmp_path):
    dd = _saved_dict(tmp_path / "dd", empty_test=False)
    pool = read_pool(dd, split="train[3:6]")
    assert _questions(pool) == [(3, "q3"), (4, "q4"), (5, "q5")] and pool.split == "train"
    out = write_subset(pool, [pool.examples[1].id], tmp_path / "sub")
    assert _questions(read_pool(out)) == [(0, "q4")]  # the DatasetDict subset holds split train, row 4
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    rows[7] = {"question": "q7", "answer": ""}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pool = read_pool(path, split="train[-30%:]", skip_invalid=True)  # rows 7, 8, 9: row 7 is line 8
    assert _questions(pool) == [(8, "q8"), (9, "q9")] and pool.skipped[0].startswith(f"{path}:8: field 'answer'")
    assert _questions(read_pool(path, split="train[:2]")) == [(0, "q0"), (1, "q1")]
    out = write_subset(pool, [pool.examples[1].id], tmp_path / "s.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == [rows[9]]
    with pytest.raises(DataError, match=r"p\.jsonl:8: field 'answer'"):
        read_pool(path, split="train[5:9]")


def test_split_and_subset_flags_on_commands(tmp_path, gsm8k, capsys):
    from mechsieve.cli import main
    from mechsieve.commands._common import data_flags

    out = tmp_path / "out"
    argv = ["select", "--method", "random", "--pool", str(gsm8k), "--subset", "socratic", "--split", "test[:3]",
            "--budget", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert f"read 3 examples (question_answer) from {gsm8k}" in capsys.readouterr().out
    chosen = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(chosen) == 2 and all(r["messages"][0]["content"].startswith("socratic test q") for r in chosen)
    assert main(["info", "--pool", str(gsm8k), "--split", "train[:2]"]) == 2
    assert "--subset NAME" in capsys.readouterr().err
    assert main(["capture", "--pool", str(gsm8k), "--subset", "main", "--split", "train[:5]", "--streaming",
                 "--data-files", "main/train-*,main/test-*", "--revision", "r1", "--print-config"]) == 0
    printed = capsys.readouterr().out
    for line in ("split: train[:5]", "subset: main", "revision: r1", "- main/train-*", "- main/test-*",
                 "streaming: true"):
        assert f"  {line}\n" in printed
    args = argparse.Namespace(target="t.jsonl", target_split="test[:3]", target_subset="main")
    assert data_flags(args, "target", "target") == {"target.path": "t.jsonl", "target.split": "test[:3]",
                                                     "target.subset": "main"}


def test_select_takes_the_target_split_and_subset(capsys):
    import yaml

    from mechsieve.cli import main

    assert main(["select", "--pool", "p.jsonl", "--target", "openai/gsm8k", "--target-subset", "main",
                 "--target-split", "test[:32]", "--target-encoding", "latin-1", "--print-config"]) == 0
    target = yaml.safe_load(capsys.readouterr().out)["target"]
    assert (target["path"], target["subset"], target["split"], target["encoding"]) == \
        ("openai/gsm8k", "main", "test[:32]", "latin-1")
