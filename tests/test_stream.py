"""Streamed pools (data.stream): the scan and every shard read exactly what read_pool reads, the
driver holds no example, the subset files are the in-memory pool's, and the engine, the commands
and the Ray executor give the in-memory scores from a streamed pool."""

from __future__ import annotations

import gc
import gzip
import json
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest

from conftest import probe_pool, ray_test_session, write_jsonl
from mechsieve.config import ConfigError
from mechsieve.data.packed import CodedStrs, CompactIds, IdPacker
from mechsieve.data.readers import DataConfig, DataError, read_pool
from mechsieve.data.stream import (
    StreamedPool,
    StreamError,
    scan_pool,
    wants_stream,
)
from mechsieve.data.writers import write_subset
from mechsieve.engine import EngineConfig, EngineError, plan_shards, score_pool, select_pool
from mechsieve.models.loading import ModelConfig, load_model

pytestmark = pytest.mark.timeout(300)

LOCAL = EngineConfig(executor="local", shard_size=3)


def chat(i: int) -> dict:
    # every third content repeats: repeated ids get ~2, ~3 in both readers
    return {"messages": [{"role": "user", "content": f"Natalia sold clips {i % 9}"},
                         {"role": "assistant", "content": f"The answer is 12 + 30 = {i % 9}."}]}


def tricky_jsonl(path: Path, n: int = 24) -> Path:
    """A BOM, CRLF / CR / LF endings, blank lines, broken JSON, a byte that does not decode, a
    record without its response, records naming their own source and id."""
    with open(path, "wb") as fh:
        fh.write(b"\xef\xbb\xbf")
        for i in range(n):
            record = chat(i)
            if i % 5 == 0:
                record["source"] = f"src{i % 2}"
            if i % 7 == 0:
                record["id"] = f"own-{i % 2}"
            fh.write(json.dumps(record).encode() + (b"\r\n", b"\r", b"\n")[i % 3])
            if i == 4:
                fh.write(b"\n   \n{broken json\n")
            if i == 9:
                fh.write(b'{"messages": "caf\xe9"}\n')
            if i == 13:
                fh.write(json.dumps({"messages": [{"role": "user", "content": "no answer"},
                                                  {"role": "assistant", "content": ""}]}).encode() + b"\n")
    return path


def flat_rows(n: int) -> list[dict]:
    return [{"instruction": f"Add {i % 9} and 3.\nShow the steps.", "output": f"{i % 9} + 3 = {i % 9 + 3}",
             "tag": i} for i in range(n)]


def cases(tmp_path: Path) -> dict[str, DataConfig]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tricky = tricky_jsonl(tmp_path / "tricky.jsonl")
    gz = tmp_path / "pool.jsonl.gz"
    gz.write_bytes(gzip.compress(tricky.read_bytes()))
    rows = flat_rows(23)
    csv_path = tmp_path / "pool.csv"
    csv_path.write_text("instruction,output,tag\n" + "".join(
        f'"{r["instruction"]}",{r["output"]},{r["tag"]}\n' for r in rows))  # quoted fields span two lines
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"note": "kept"})
    pq.write_table(table, tmp_path / "pool.parquet", row_group_size=4)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "data.jsonl", rows)
    return {
        "jsonl-skip": DataConfig(path=str(tricky), skip_invalid=True),
        "jsonl-slice-limit": DataConfig(path=str(tricky), skip_invalid=True, split="train[3:20]", limit=11),
        "jsonl-percent": DataConfig(path=str(tricky), skip_invalid=True, split="train[10%:90%]"),
        "jsonl-gz-source": DataConfig(path=str(gz), skip_invalid=True, source="given"),
        "csv": DataConfig(path=str(csv_path)),
        "parquet": DataConfig(path=str(tmp_path / "pool.parquet")),
        "parquet-map": DataConfig(path=str(tmp_path / "pool.parquet"), field_map={"prompt": "instruction",
                                  "response": "output", "source": "tag"}, split="train[5:]"),
        "disk": DataConfig(path=str(tmp_path / "disk")),
        "dict-slice": DataConfig(path=str(tmp_path / "dict"), split="test[2:19]"),
        "datasets-folder": DataConfig(path=str(tmp_path / "folder")),
        "datasets-streaming": DataConfig(path=str(tmp_path / "folder"), streaming=True, split="train[4:]"),
    }


CASES = ["jsonl-skip", "jsonl-slice-limit", "jsonl-percent", "jsonl-gz-source", "csv", "parquet", "parquet-map",
         "disk", "dict-slice", "datasets-folder", "datasets-streaming"]


@pytest.mark.parametrize("case", CASES)
def test_scan_and_every_shard_read_what_read_pool_reads(case, tmp_path):
    cfg = cases(tmp_path)[case]
    whole = read_pool(cfg)
    streamed = scan_pool(cfg)
    assert isinstance(streamed, StreamedPool) and len(streamed) == len(whole) > 5
    assert streamed.ids == [ex.id for ex in whole.examples]
    assert streamed.sources == [ex.source for ex in whole.examples]
    assert list(streamed.rows) == [ex.meta["row"] for ex in whole.examples]
    assert streamed.fingerprint() == whole.fingerprint()
    assert (streamed.container, streamed.format, streamed.split, streamed.skipped, streamed.duplicate_ids) == \
        (whole.container, whole.format, whole.split, whole.skipped, whole.duplicate_ids)
    assert streamed.counts_by_source() == whole.counts_by_source()
    expected = [ex.to_json() for ex in whole.examples]
    for size in (1, 3, 4, len(whole)):
        shards = plan_shards(streamed.examples, size)
        assert all(s.examples == [] and s.reader is not None for s in shards)  # nothing read on planning
        assert [s.ids for s in shards] == [s.ids for s in plan_shards(whole.examples, size)]
        assert [ex.to_json() for s in shards for ex in s.load().examples] == expected, size
    assert [ex.to_json() for ex in streamed.iter_examples(2, 5)] == expected[2:5]


def test_the_tricky_file_exercises_what_it_claims(tmp_path):
    pool = read_pool(DataConfig(path=str(tricky_jsonl(tmp_path / "t.jsonl")), skip_invalid=True))
    reasons = " | ".join(pool.skipped)
    assert len(pool.skipped) == 3 and "not valid JSON" in reasons and "byte 0xe9" in reasons and "empty" in reasons
    assert pool.duplicate_ids > 0 and {"src0", "src1"} <= set(pool.counts_by_source())


def test_a_record_that_changed_since_the_scan_is_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [chat(i) for i in range(9)])
    streamed = scan_pool(DataConfig(path=str(path)))
    shards = plan_shards(streamed.examples, 3)
    path.write_text("".join(json.dumps(chat(i + 100)) + "\n" for i in range(9)))
    with pytest.raises(DataError, match=r"p.jsonl:4: this record has id .* changed since it was scanned"):
        shards[1].load()


def test_the_scan_and_a_shard_hold_no_more_than_one_example(tmp_path, monkeypatch):
    import mechsieve.data.readers as readers

    path = write_jsonl(tmp_path / "p.jsonl", [chat(i) for i in range(300)])
    made: list[weakref.ref] = []
    most = [0]

    def counting(real):
        def to_example(*args, **kwargs):
            ex = real(*args, **kwargs)
            made.append(weakref.ref(ex))
            most[0] = max(most[0], sum(r() is not None for r in made))
            return ex
        return to_example

    # the scan, a shard and read_pool all convert through readers.Converter
    monkeypatch.setattr(readers, "to_example", counting(readers.to_example))
    pool = scan_pool(DataConfig(path=str(path)))
    gc.collect()
    assert len(made) == len(pool) == 300
    assert most[0] <= 2 and all(r() is None for r in made)  # one at a time, none kept by the pool
    shard = plan_shards(pool.examples, 50)[3]
    made.clear()
    most[0] = 0
    loaded = shard.load()
    assert len(made) == 50 and most[0] == 50  # the shard's own examples, read from its own offset
    del loaded
    # the same count on read_pool finds the whole pool alive: the check can fail
    made.clear()
    most[0] = 0
    whole = read_pool(DataConfig(path=str(path)))
    assert most[0] == 300 and len(whole) == 300


def test_refs_give_ids_and_rows_but_refuse_the_text(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [chat(i) for i in range(5)])
    pool = scan_pool(DataConfig(path=str(path)))
    ref = pool.examples[2]
    assert (ref.id, ref.source, ref.meta) == (pool.ids[2], "p", {"row": 2})
    with pytest.raises(StreamError, match=r"'prompt' is not held here.*engine.stream=off \(--no-stream\)"):
        ref.prompt  # noqa: B018
    assert not hasattr(ref, "__deepcopy__")  # dunders stay AttributeErrors (copy, pickle probe them)
    with pytest.raises(StreamError):
        pool.subset(pool.ids[:2])


def test_which_pools_stream(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [chat(i) for i in range(5)])
    array = tmp_path / "p.json"
    array.write_text(json.dumps([chat(i) for i in range(5)]))
    size_mb = path.stat().st_size / 1e6
    cfg = DataConfig(path=str(path))
    assert wants_stream(cfg, "on", 512) and not wants_stream(cfg, "off", 0)
    assert wants_stream(cfg, "auto", size_mb * 0.9) and not wants_stream(cfg, "auto", size_mb * 1.1)
    assert not wants_stream(DataConfig(path=str(array)), "auto", 0)  # a JSON array is never streamed by auto
    with pytest.raises(ConfigError, match=r"JSON array.*jq -c"):
        wants_stream(DataConfig(path=str(array)), "on", 512)
    with pytest.raises(ConfigError, match=r"engine.stream.*auto"):
        EngineConfig(stream="sometimes")
    assert EngineConfig(stream="on").sharded and EngineConfig(stream="on").effective_shard_size() == 256


def test_a_subset_of_a_streamed_pool_is_the_in_memory_pools_subset(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    all_cases = cases(tmp_path)
    for case in ("jsonl-skip", "csv", "parquet", "dict-slice", "datasets-folder"):
        cfg = all_cases[case]
        whole, streamed = read_pool(cfg), scan_pool(cfg)
        ids = whole.examples[1].id, whole.examples[4].id, whole.examples[-1].id
        a = write_subset(whole, ids, tmp_path / "a" / case / Path(cfg.path).name)
        b = write_subset(streamed, ids, tmp_path / "b" / case / Path(cfg.path).name)
        if case == "parquet":
            ta, tb = pq.read_table(a), pq.read_table(b)
            assert tb.equals(ta) and tb.schema.metadata == ta.schema.metadata and tb.num_rows == 3
        elif case == "dict-slice":
            da, db = datasets.load_from_disk(str(a)), datasets.load_from_disk(str(b))
            assert db["test"].to_list() == da["test"].to_list() and len(db["test"]) == 3
        else:
            assert b.read_bytes() == a.read_bytes() and len(b.read_text().splitlines()) >= 3, case


def driver_memory(folder: Path, n: int) -> tuple[int, int]:
    """Python memory (tracemalloc, bytes) of a streamed pool of `n` distinct short examples on the
    driver: what the scan holds, and the most that planning the shards, checking their rows,
    selecting and writing the selection take beyond it."""
    import tracemalloc

    from mechsieve.engine.run import check_rows
    from mechsieve.scorers import ScoreResult, make_scorer
    from mechsieve.select.pipeline import selection_from_result, write_selection

    path = write_jsonl(folder / f"pool-{n}.jsonl", [{"instruction": f"What is {i} plus 3?",
                                                     "output": f"{i} plus 3 is {i + 3}."} for i in range(n)])
    scorer = make_scorer("loss")
    scores = np.random.default_rng(0).random(n)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pool = scan_pool(DataConfig(path=str(path)))
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        shards = plan_shards(pool.examples, 256)
        check_rows("scores", {"scores": scores}, shards, pool.examples)
        sel = selection_from_result("loss", scorer, ScoreResult(scores), pool, 0.1)
        write_selection(pool, sel, folder / f"out-{n}")
        return held, tracemalloc.get_traced_memory()[1] - base - held
    finally:
        tracemalloc.stop()


def test_the_driver_holds_an_id_and_a_few_numbers_per_example(tmp_path):
    driver_memory(tmp_path, 100)  # imports and first allocations (pyarrow's, the writers') are not the pool's
    small, large = driver_memory(tmp_path, 1000), driver_memory(tmp_path, 4000)
    held, beyond = ((b - a) / 3000 for a, b in zip(small, large))
    # each example: its id's bytes and offset (CompactIds: 16 hex digits, ~24 bytes), its source's
    # code (4), its row, line and byte offset in arrays (24): ~56 bytes; the ids as a list of str
    # held ~107, an object per example (an ExampleRef, a dict) would add 100 or more
    assert held < 65, held
    # then its score, rank and mask, and the ranking's index arrays: ~30 bytes (Arrow's, outside
    # tracemalloc, only for tied scores); a list of every id as str adds ~80 (before: ~46 with the
    # ids' strs already held)
    assert beyond < 40, beyond


def test_packed_ids_and_sources_read_as_lists_of_str():
    import pickle

    ids = ["a", "", "café", "a\x00b", "\U0001f600", "\ud800", "x" * 300] + [f"id{i}" for i in range(600)]
    packed = CompactIds.of(ids)
    assert packed == ids and ids == packed and list(packed) == ids and len(packed) == len(ids)
    assert packed[2] == "café" and packed[-1] == ids[-1] and packed[3:9] == ids[3:9] and packed[::50] == ids[::50]
    assert packed != ids[:-1] and packed != [*ids[:-1], "other"]
    with pytest.raises(IndexError):
        packed[len(ids)]
    view = packed.view(500, 510)
    assert view == ids[500:510] and view.data is packed.data  # a window, no copy
    sent = pickle.dumps(view)
    assert pickle.loads(sent) == ids[500:510] and b"id100" not in sent and len(sent) < 1000  # only its own bytes
    assert packed.arrow(600, 607).to_pylist() == ids[600:607]
    with pytest.raises(DataError, match=r"id '\\ud800' holds a lone surrogate"):
        packed.arrow(0, 7)

    sources = CodedStrs(["math", "code"], np.array([0, 1, 1, 0, 1], dtype=np.intc))
    assert sources == ["math", "code", "code", "math", "code"] and sources[1:3] == ["code", "code"]
    assert sources.counts() == {"math": 2, "code": 3}
    assert sources.counts(np.array([1, 0, 0, 0, 0], dtype=bool)) == {"math": 1, "code": 0}
    assert sources.arrow(2, 5).to_pylist() == ["code", "math", "code"]


def test_the_scan_renames_repeated_ids_as_read_pool_does():
    from mechsieve.data.records import Example, make_unique_ids

    # "a~2" in the data beside a renamed "a" stays a repeat, as make_unique_ids leaves it; 5000
    # distinct ids grow the table of repeats several times
    raw = ["a", "b", "a", "a~2", "a", "c"] * 50 + [f"id{i % 5000}" for i in range(12000)]
    packer = IdPacker()
    stored = [packer.add(x) for x in raw]
    examples = [Example(x, "s", [], "r", {}) for x in raw]
    assert packer.renamed == make_unique_ids(examples) > 0
    assert stored == [ex.id for ex in examples] and packer.ids() == stored


# --- the engine ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_model(model_dir):
    return load_model(ModelConfig(name=str(model_dir), device="cpu"))


def pool_file(tmp_path: Path, n: int = 10) -> Path:
    pool = probe_pool(n, tag="p")
    rows = [{"messages": [*ex.prompt, {"role": "assistant", "content": ex.response + f" {i * 7 + 3}"}]}
            for i, ex in enumerate(pool.examples)]
    return write_jsonl(tmp_path / "pool.jsonl", rows)


def target_pool():
    from mechsieve.data.records import Pool

    exs = probe_pool(4, tag="t").examples
    for i, ex in enumerate(exs):
        ex.source = "math" if i % 2 else "code"
    return Pool(exs, "", "memory", "memory")


@pytest.mark.parametrize("method", ["loss", "rds"])
def test_a_streamed_pool_gets_the_in_memory_scores(method, folder_model, tmp_path):
    cfg = DataConfig(path=str(pool_file(tmp_path)))
    whole, streamed = read_pool(cfg), scan_pool(cfg)
    target = target_pool()
    plain = select_pool(method, whole, 4, target=target, model=folder_model, engine=LOCAL,
                        folder=tmp_path / "memory", progress=False)
    # a default EngineConfig: a streamed pool is sharded all the same (256 a shard: one shard)
    for engine in (LOCAL, EngineConfig()):
        sel = select_pool(method, streamed, 4, target=target, model=folder_model, engine=engine,
                          folder=tmp_path / "stream", progress=False)
        if engine is LOCAL:  # the same shards, the same batches: the same numbers
            np.testing.assert_array_equal(sel.scores, plain.scores)
        else:
            np.testing.assert_allclose(sel.scores, plain.scores, rtol=1e-5, atol=1e-6)
        assert sel.ids == plain.ids and sel.settings["engine"]["shards"] == (4 if engine is LOCAL else 1)


def test_methods_that_need_the_whole_pool_refuse_a_streamed_one(folder_model, tmp_path):
    streamed = scan_pool(DataConfig(path=str(pool_file(tmp_path))))
    with pytest.raises(EngineError, match=r"kcenter needs the whole pool in memory.*--no-stream"):
        score_pool("kcenter", streamed, model=folder_model, engine=LOCAL, folder=tmp_path / "s")
    result, _ = score_pool("random", streamed, engine=LOCAL, folder=tmp_path / "s")  # ids are enough
    assert result.scores.shape == (10,)


# --- the commands ------------------------------------------------------------------------------

def test_commands_with_a_streamed_pool_write_what_they_write_in_memory(model_dir, tmp_path, capsys):
    import datasets
    import pandas as pd

    from mechsieve.cli import main
    from mechsieve.store.artefacts import load_artefact

    pool = pool_file(tmp_path, 8)
    target = write_jsonl(tmp_path / "target.jsonl", [{"messages": [*ex.prompt, {"role": "assistant",
                                                      "content": ex.response}]} for ex in target_pool().examples])
    common = ["--pool", str(pool), "--model", str(model_dir), "--quiet", "--shard-size", "3"]
    sel = ["select", "--method", "rds", "--target", str(target), "--budget", "3", "--write-rejected", *common]
    assert main([*sel, "--out", str(tmp_path / "one"), "--no-stream"]) == 0
    assert "streaming the pool" not in capsys.readouterr().out
    assert main([*sel, "--out", str(tmp_path / "streamed"), "--stream"]) == 0
    assert "streaming the pool: 8 examples scanned" in capsys.readouterr().out
    one, streamed = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("one", "streamed"))
    assert list(streamed["selected"]) == list(one["selected"]) and list(streamed["id"]) == list(one["id"])
    assert list(streamed["source"]) == list(one["source"]) and list(streamed["rank"]) == list(one["rank"])
    np.testing.assert_array_equal(streamed["score"], one["score"])
    for name in ("selected.jsonl", "rejected.jsonl"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    # auto streams above the threshold
    assert main([*sel, "--out", str(tmp_path / "auto"), "--set", "engine.stream_above_mb=0"]) == 0
    assert "streaming the pool" in capsys.readouterr().out

    cap = ["capture", *common, "--layers", "0,2", "--max-len", "64"]
    assert main([*cap, "--out", str(tmp_path / "c1")]) == 0
    assert main([*cap, "--out", str(tmp_path / "c2"), "--stream"]) == 0
    a, _ = load_artefact(tmp_path / "c1", "activations")
    b, _ = load_artefact(tmp_path / "c2", "activations")
    np.testing.assert_array_equal(b["mean_response"], a["mean_response"])

    mask = ["mask-tokens", *common, "--domain", "math", "--set", "xtf.tr_classes=3"]
    assert main([*mask, "--out", str(tmp_path / "m1")]) == 0
    assert main([*mask, "--out", str(tmp_path / "m2"), "--stream"]) == 0
    m1, m2 = (datasets.load_from_disk(str(tmp_path / d)) for d in ("m1", "m2"))
    assert m1["input_ids"] == m2["input_ids"] and m1["labels"] == m2["labels"]
    assert m1["mask_reason"] == m2["mask_reason"] and m1["id"] == m2["id"]

    capsys.readouterr()
    assert main(["select", "--method", "kcenter", *common, "--stream", "--out", str(tmp_path / "k")]) == 2
    assert "engine.stream=on: kcenter needs the whole pool" in capsys.readouterr().err


# --- Ray ---------------------------------------------------------------------------------------

def test_ray_shards_of_a_streamed_pool_carry_readers_not_examples(tmp_path):
    pytest.importorskip("pyarrow")
    from mechsieve.engine.ray_executor import shard_tables

    streamed = scan_pool(DataConfig(path=str(pool_file(tmp_path))))
    tables = shard_tables(plan_shards(streamed.examples, 3))
    assert len(tables) == 4 and all(t.num_rows == 1 and "example" not in t.column_names for t in tables)
    blobs = [t.column("reader")[0].as_py() for t in tables]
    assert not any(b"Natalia" in b or b"The answer" in b for b in blobs)  # no text travels, only ids and places
    first = pickle.loads(blobs[0]).ids
    assert first == streamed.ids[:3] and len(first.data) == sum(len(x.encode()) for x in streamed.ids[:3])


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    yield from ray_test_session(tmp_path_factory, __name__)


def test_ray_actors_read_their_own_shards_and_give_the_local_scores(ray_session, model_dir, folder_model,
                                                                    tmp_path):
    cfg = DataConfig(path=str(pool_file(tmp_path)))
    local = select_pool("loss", read_pool(cfg), 4, model=folder_model, engine=LOCAL, folder=tmp_path / "local",
                        progress=False)
    remote = select_pool("loss", scan_pool(cfg), 4, model=ModelConfig(name=str(model_dir), device="cpu"),
                         engine=EngineConfig(executor="ray", shard_size=3, actors=2), folder=tmp_path / "ray",
                         progress=False)
    np.testing.assert_array_equal(remote.scores, local.scores)
    assert remote.ids == local.ids
    assert remote.settings["engine"]["executor"] == "ray" and remote.settings["engine"]["ran"] == 4
