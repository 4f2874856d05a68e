"""Writing subsets back: a Parquet subset keeps the pool's schema; a DatasetDict pool writes its split."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mechsieve.data import DataConfig, DataError, read_pool, write_subset


def test_parquet_subset_keeps_the_schema_and_its_metadata(tmp_path):
    schema = pa.schema([
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("n", pa.int32()),
        pa.field("w", pa.float32()),
        pa.field("empty", pa.string()),
        pa.field("tags", pa.list_(pa.int16())),
    ], metadata={b"huggingface": b'{"info": {"features": {}}}', b"note": b"kept"})
    table = pa.table({
        "question": [f"q{i}" for i in range(6)],
        "answer": [f"a{i}" for i in range(6)],
        "n": pa.array(range(6), pa.int32()),
        "w": pa.array([i / 4 for i in range(6)], pa.float32()),
        "empty": pa.array([None] * 6, pa.string()),
        "tags": pa.array([[i, i + 1] for i in range(6)], pa.list_(pa.int16())),
    }, schema=schema)
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path)
    pool = read_pool(path)
    chosen = [pool.examples[i].id for i in (4, 1)]
    out = write_subset(pool, chosen, tmp_path / "out" / "selected.parquet")
    written = pq.read_table(out)
    assert pq.read_schema(out).equals(pq.read_schema(path), check_metadata=True)
    assert written.schema.metadata[b"note"] == b"kept"
    assert written.to_pylist() == table.take([1, 4]).to_pylist()


def _dataset_dict(folder):
    import datasets

    train = datasets.Dataset.from_list([{"question": f"t{i}", "answer": f"x{i}"} for i in range(5)])
    test = datasets.Dataset.from_list([{"question": f"e{i}", "answer": f"y{i}", "k": i} for i in range(4)])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    return folder


def test_dataset_dict_pool_reads_its_split_and_writes_that_split(tmp_path):
    import datasets

    folder = _dataset_dict(tmp_path / "dd")
    pool = read_pool(DataConfig(path=str(folder), split="test"))
    assert pool.container == "disk" and [e.response for e in pool.examples] == ["y0", "y1", "y2", "y3"]
    out = write_subset(pool, [pool.examples[3].id, pool.examples[1].id], tmp_path / "out" / "selected")
    written = datasets.load_from_disk(str(out))
    assert isinstance(written, datasets.DatasetDict) and list(written) == ["test"]
    assert written["test"].to_list() == [{"question": "e1", "answer": "y1", "k": 1},
                                         {"question": "e3", "answer": "y3", "k": 3}]
    again = read_pool(DataConfig(path=str(out), split="test"))
    assert [e.response for e in again.examples] == ["y1", "y3"]
    with pytest.raises(DataError, match=r"without split 'train'.*\['test'\].*data.split"):
        read_pool(out)
