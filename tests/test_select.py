"""Selection: budgets (fraction, count, threshold, full), order, ties, unions, errors, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_jsonl
from mechsieve.data.records import Example, Pool
from mechsieve.select import (
    Budget,
    SelectionError,
    choose,
    parse_budget,
    ranking,
    select_examples,
    union_ranking,
)
from mechsieve.select.pipeline import write_selection


def make_pool(n: int, sources=("a", "b")) -> Pool:
    examples = [Example(f"id{i:02d}", sources[i % len(sources)], [{"role": "user", "content": f"q{i}"}], f"r{i}",
                        {"row": i}) for i in range(n)]
    return Pool(examples, "", "memory", "memory")


@pytest.mark.parametrize("budget, kind, value", [
    (0.1, "fraction", 0.1), (1.0, "fraction", 1.0), (7, "count", 7.0), ("7", "count", 7.0), ("0.25", "fraction", 0.25),
    ("score>=0.5", "threshold", 0.5), ("score < -2", "threshold", -2.0), ("full", "full", 1.0), ("all", "full", 1.0),
])
def test_parse_budget(budget, kind, value):
    b = parse_budget(budget)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, "lots", "score=1", True])
def test_parse_budget_refuses(bad):
    with pytest.raises(SelectionError):
        parse_budget(bad)


def test_budget_sizes():
    assert Budget("fraction", 0.1).size(700) == 70
    assert Budget("fraction", 0.1).size(15) == 2  # 1.5 rounds half up
    assert Budget("fraction", 0.1).size(3) == 1  # never zero
    assert Budget("count", 5.0).size(5) == 5
    assert Budget("full").size(9) == 9
    with pytest.raises(SelectionError, match="only 4"):
        Budget("count", 5.0).size(4)
    with pytest.raises(SelectionError, match="empty"):
        Budget("fraction", 0.5).size(0)


def test_ranking_ties_by_id_and_order():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    ids = ["e", "d", "b", "a", "c"]
    assert ranking(scores, ids, "top").tolist() == [2, 4, 1, 3, 0]  # the 3.0s by id: b, c, d
    assert ranking(scores, ids, "bottom").tolist() == [0, 3, 2, 4, 1]


def test_ranking_independent_of_pool_order():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 40).astype(float)  # many ties
    ids = [f"x{i}" for i in range(40)]
    base = [ids[i] for i in ranking(scores, ids)]
    perm = rng.permutation(40)
    shuffled = [[ids[j] for j in perm][i] for i in ranking(scores[perm], [ids[j] for j in perm])]
    assert shuffled == base


def test_nan_ranked_last_and_never_selected():
    scores = np.array([np.nan, 0.5, 0.1, np.nan])
    ids = ["a", "b", "c", "d"]
    for order in ("top", "bottom"):
        assert ranking(scores, ids, order).tolist()[2:] == [0, 3]
    picked = choose(scores, ids, 4, "top")
    assert picked.selected.tolist() == [False, True, True, False]


def test_threshold_and_count_selection():
    scores = np.array([0.2, 0.9, 0.5, 0.7])
    ids = ["a", "b", "c", "d"]
    assert choose(scores, ids, "score>=0.5").selected.tolist() == [False, True, True, True]
    assert choose(scores, ids, "score<0.5").selected.tolist() == [True, False, False, False]
    c = choose(scores, ids, 2, "bottom")
    assert c.selected.tolist() == [True, False, True, False]
    assert c.ranks.tolist() == [1, 4, 2, 3]


def test_union_round_robin_over_targets():
    ids = ["a", "b", "c", "d", "e"]
    per = np.array([[5, 0], [4, 1], [3, 9], [2, 8], [1, 7]], dtype=float)
    # target 0 ranks a, b, c, d, e; target 1 ranks c, d, e, b, a
    assert union_ranking(per, ids).tolist() == [0, 2, 1, 3, 4]
    c = choose(per.max(axis=1), ids, 3, "top", per_target=per)
    assert c.selected.tolist() == [True, True, True, False, False]
    assert c.ranks.tolist() == [1, 3, 2, 4, 5]


def tricky_ids(n: int, seed: int = 0) -> list[str]:
    """Ids whose order needs care: prefixes, NUL, accents, astral and surrogate code points, long
    shared prefixes, the empty id, repeats."""
    rng = np.random.default_rng(seed)
    letters = ["a", "b", "\x00", "é", "\U0001f600", "\ud800", "\ue000", "~", "0"]
    ids = ["", "a", "a\x00", "a\x00b", "ab", "x" * 20, "x" * 20 + "a", "x" * 19, "pool-000000000012"]
    ids += ["".join(rng.choice(letters, rng.integers(0, 20))) for _ in range(n)]
    ids += ids[: n // 10]
    return [ids[i] for i in rng.permutation(len(ids))]


def test_ranking_from_compact_ids_is_the_reference_ranking(monkeypatch):
    from mechsieve.data.packed import CompactIds
    from mechsieve.select import budget

    monkeypatch.setattr(budget, "FEW_TIES", 8)  # more tied ids than that are sorted from their bytes
    ids = tricky_ids(300)
    packed = CompactIds.of(ids)
    by_id = np.empty(len(ids), dtype=np.int64)
    by_id[sorted(range(len(ids)), key=lambda i: (ids[i], i))] = np.arange(len(ids))
    rng = np.random.default_rng(1)
    for levels in (1, 3, 40, 2000, 10**6):  # all tied (method full), many ties, some, few, none
        scores = rng.integers(0, levels, len(ids)).astype(float)
        scores[rng.random(len(ids)) < 0.1] = np.nan
        for order in ("top", "bottom"):
            key = np.where(np.isnan(scores), 0.0, -scores if order == "top" else scores)
            rule = np.lexsort((by_id, key, np.isnan(scores)))  # score, then id (repeats: pool order)
            np.testing.assert_array_equal(ranking(scores, ids, order), rule)
            np.testing.assert_array_equal(ranking(scores, packed, order), rule)
    which = rng.choice(len(ids), 40, replace=False)
    assert np.argsort(packed.ranks(which)).tolist() == sorted(range(40), key=lambda j: (ids[which[j]], which[j]))
    per = rng.integers(0, 5, (len(ids), 3)).astype(float)
    seen, loop = set(), []
    for row in np.stack([ranking(per[:, c], ids) for c in range(3)], axis=1):
        loop += [int(i) for i in row if not (int(i) in seen or seen.add(int(i)))]
    assert union_ranking(per, packed).tolist() == union_ranking(per, ids).tolist() == loop


def test_select_examples_random_and_full():
    pool = make_pool(20)
    sel = select_examples("random", pool, 0.25, seed=3, progress=False)
    assert len(sel.ids) == 5 and sel.selected.sum() == 5
    assert [pool.examples[i].id for i in np.argsort(sel.ranks)[:5]] == sel.ids
    again = select_examples("random", pool, 0.25, seed=3, progress=False)
    assert again.ids == sel.ids
    other = select_examples("random", pool, 0.25, seed=4, progress=False)
    assert other.ids != sel.ids
    full = select_examples("full", pool, 0.1, progress=False)
    assert full.selected.all() and len(full.ids) == 20
    assert sel.settings["method"] == "random" and sel.settings["seed"] == 3


def test_select_examples_errors():
    with pytest.raises(SelectionError, match="empty"):
        select_examples("random", Pool([], "", "memory", "memory"), 0.1)
    with pytest.raises(SelectionError, match="only 3"):
        select_examples("random", make_pool(3), 10)


def test_write_selection(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}", "extra": i} for i in range(10)]
    src = write_jsonl(tmp_path / "pool.jsonl", rows)
    from mechsieve.data import read_pool

    pool = read_pool(src)
    sel = select_examples("random", pool, 4, seed=0, progress=False)
    paths = write_selection(pool, sel, tmp_path / "out")
    written = [json.loads(line) for line in paths["subset"].read_text().splitlines()]
    assert paths["subset"].name == "selected.jsonl"
    assert sorted(r["extra"] for r in written) == sorted(ex.meta["row"] for ex in pool.examples if ex.id in sel.ids)
    assert set(written[0]) == {"question", "answer", "extra"}  # the pool's own records, untouched
    import pyarrow.parquet as pq

    table = pq.read_table(paths["scores"]).to_pydict()
    assert table["id"] == [ex.id for ex in pool.examples]
    assert sum(table["selected"]) == 4 and sorted(table["rank"]) == list(range(1, 11))
    summary = json.loads(paths["summary"].read_text())
    assert summary["selected"]["examples"] == 4
    assert summary["selected"]["by_source"] == {"pool": 4}
    assert summary["settings"]["budget"] == 4


def test_the_scores_table_is_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mechsieve.select import pipeline

    # row groups of a fixed size keep the writer's memory flat in the pool's size (bench/stream_memory.py)
    monkeypatch.setattr(pipeline, "SCORE_GROUP_ROWS", 4)
    pool = make_pool(10)
    sel = select_examples("random", pool, 3, seed=0, progress=False)
    path = write_selection(pool, sel, tmp_path / "out")["scores"]
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(k).num_rows for k in range(meta.num_row_groups)] == [4, 4, 2]
    table = pq.read_table(path)
    assert table.schema == pa.schema([("id", pa.string()), ("source", pa.string()), ("score", pa.float64()),
                                      ("rank", pa.int64()), ("selected", pa.bool_())])
    assert table["id"].to_pylist() == [ex.id for ex in pool.examples]
    assert table["source"].to_pylist() == [ex.source for ex in pool.examples]
    np.testing.assert_array_equal(table["score"].to_numpy(), sel.scores)
    np.testing.assert_array_equal(table["rank"].to_numpy(), sel.ranks)
    assert table["selected"].to_pylist() == sel.selected.tolist()


def test_cli_select_nait_on_a_tiny_model(tmp_path, model_dir, capsys):
    from mechsieve.cli import main

    rows = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many?", "answer": f"{i} + {i + 3} = "
             f"{2 * i + 3}\n#### {2 * i + 3}"} for i in range(6)]
    rows += [{"instruction": f"Write a poem about the number {i}.", "output": f"Number {i} is round."} for i in range(6)]
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"messages": [
        {"role": "user", "content": r.get("question", r.get("instruction"))},
        {"role": "assistant", "content": r.get("answer", r.get("output"))}]} for r in rows])
    target = write_jsonl(tmp_path / "target.jsonl", [{"question": f"Ann has {i} pens and gets {i} more. How many?",
                                                       "answer": f"#### {2 * i}"} for i in range(1, 5)])
    out = tmp_path / "sel"
    code = main(["select", "--method", "nait", "--pool", str(pool), "--target", str(target), "--model", str(model_dir),
                 "--budget", "3", "--out", str(out), "--quiet", "--set", "scorer.layers=[0,1]"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "selected 3 of 12" in printed and str(out / "summary.json") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["scorer"]["layers"] == [0, 1] and summary["selected"]["examples"] == 3
    assert len((out / "selected.jsonl").read_text().splitlines()) == 3
    assert main(["select", "--method", "random", "--pool", str(pool), "--budget", "99", "--out", str(out)]) == 2


def test_cli_select_on_a_dataset_dict_writes_the_split_subset_and_scores(tmp_path, capsys):
    import datasets
    import pyarrow.parquet as pq

    from mechsieve.cli import main

    train = datasets.Dataset.from_list([{"question": f"t{i}", "answer": f"x{i}"} for i in range(3)])
    test = datasets.Dataset.from_list([{"question": f"e{i}", "answer": f"y{i}"} for i in range(6)])
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    out = tmp_path / "out"
    assert main(["select", "--method", "random", "--pool", str(folder), "--budget", "2", "--out", str(out),
                 "--set", "data.split=test", "--quiet"]) == 0
    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert len(scores["id"]) == 6 and sum(scores["selected"]) == 2
    written = datasets.load_from_disk(str(out / "selected"))
    assert list(written) == ["test"] and written["test"].num_rows == 2
    chosen = {q for q, s in zip([f"e{i}" for i in range(6)], scores["selected"]) if s}
    assert set(written["test"]["question"]) == chosen
    assert json.loads((out / "summary.json").read_text())["selected"]["examples"] == 2


def test_a_failing_subset_writer_leaves_the_scores_written(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import mechsieve.data.writers as writers
    from mechsieve.data import read_pool

    pool = read_pool(write_jsonl(tmp_path / "pool.jsonl", [{"text": f"t{i}"} for i in range(5)]))
    sel = select_examples("random", pool, 2, seed=0, progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers, "write_subset", broken)
    with pytest.raises(OSError, match="disk full") as info:
        write_selection(pool, sel, tmp_path / "out")
    scores = pq.read_table(tmp_path / "out" / "scores.parquet").to_pydict()
    assert scores["id"] == [ex.id for ex in pool.examples] and sum(scores["selected"]) == 2
    assert any("scores.parquet" in note for note in getattr(info.value, "__notes__", []))
