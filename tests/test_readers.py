"""Every reader on every format, malformed and empty input, ids, and writing subsets back."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from mechsieve.data import DataError, read_pool, write_subset
from mechsieve.data.records import content_hash

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "id": None},
          {"instruction": "Translate", "input": "bonjour", "output": "hello", "id": "t1"}]


def _write(path, rows, container):
    if container == "jsonl":
        write_jsonl(path, rows)
    elif container == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif container == "csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    elif container == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif container == "disk":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("container", ["jsonl", "json", "csv", "parquet", "disk"])
def test_every_container_reads_and_writes_back(tmp_path, container):
    suffix = "" if container == "disk" else "." + container
    path = _write(tmp_path / f"pool{suffix}", ALPACA, container)
    pool = read_pool(path)
    assert pool.container == container and pool.format == "alpaca" and len(pool) == 2
    first, second = pool.examples
    assert first.prompt == [{"role": "user", "content": "Add 2 and 3."}] and first.response == "5"
    assert first.id == content_hash(first.prompt, "5")
    assert second.prompt[0]["content"] == "Translate\n\nbonjour" and second.id == "t1"
    out = tmp_path / "out" / f"sel{suffix}"
    write_subset(pool, ["t1"], out)
    again = read_pool(out)
    assert again.container == container and [e.id for e in again.examples] == ["t1"]
    assert again.examples[0].response == "hello"


@pytest.mark.parametrize("rows, fmt, prompt, response", [
    ([{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                    {"role": "assistant", "content": "A2"}]}],
     "messages", ["system", "user", "assistant", "user"], "A2"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
     "messages", ["user"], "yo"),
    ([{"prompt": "P", "completion": "C"}], "prompt_completion", ["user"], "C"),
    ([{"prompt": [{"role": "user", "content": "P"}], "completion": [{"role": "assistant", "content": "C"}]}],
     "prompt_completion", ["user"], "C"),
    ([{"question": "Q?", "answer": "#### 4"}], "question_answer", ["user"], "#### 4"),
    ([{"text": "just text"}], "text", [], "just text"),
])
def test_format_detection(tmp_path, rows, fmt, prompt, response):
    pool = read_pool(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pool.format == fmt
    ex = pool.examples[0]
    assert [m["role"] for m in ex.prompt] == prompt and ex.response == response


def test_field_mapping(tmp_path):
    rows = [{"task_id": 7, "text": "Write f", "code": "def f(): pass", "tests": ["assert f() is None"]}]
    pool = read_pool(write_jsonl(tmp_path / "mbpp.jsonl", rows),
                     field_map={"prompt": "text", "response": "code", "id": "task_id"})
    ex = pool.examples[0]
    assert (ex.id, ex.response, ex.prompt[0]["content"]) == ("7", "def f(): pass", "Write f")
    assert ex.meta["tests"] == ["assert f() is None"] and ex.meta["row"] == 0
    with pytest.raises(DataError, match=r"mbpp.jsonl:1: field 'solution'.*column"):
        read_pool(tmp_path / "mbpp.jsonl", field_map={"prompt": "text", "response": "solution"})


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Q", "answer": "A", "text": "T"}])
    assert read_pool(path).format == "question_answer"
    assert read_pool(path, format="text").examples[0].response == "T"


def test_malformed_record_names_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": 5.5}\n'
                    '{"question": "d", "answer": ["x"]}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: field 'answer': expected a string, got \['x'\]"):
        read_pool(path)
    pool = read_pool(path, skip_invalid=True)
    assert len(pool) == 2 and pool.examples[1].response == "5.5"
    assert len(pool.skipped) == 2
    assert pool.skipped[0].startswith(f"{path}:4:") and pool.skipped[1].startswith(f"{path}:5:")
    assert "not valid JSON" in pool.skipped[1]


def test_json_array_errors_have_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "j"}\n]\n')
    with pytest.raises(DataError, match=r"a\.json:3: field 'output': expected a string"):
        read_pool(path)
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(DataError, match="expected a JSON array"):
        read_pool(tmp_path / "obj.json")


def test_inconsistent_layout_names_the_layout(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}, {"text": "t"}])
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'question': expected a string.*layout question_answer"):
        read_pool(path)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_input_is_an_error(tmp_path, content):
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match="no records"):
        read_pool(path)


def test_unknown_layout_and_missing_paths(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: .*field-map"):
        read_pool(path)
    with pytest.raises(DataError, match="no such file"):
        read_pool(tmp_path / "missing.jsonl")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        read_pool(tmp_path / "f.txt")


def test_hub_id_offline_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is offline"):
        read_pool("someone/some-dataset")


def test_duplicate_ids_are_made_unique_and_ids_are_stable(tmp_path):
    rows = [{"question": "q", "answer": "a"}] * 3
    pool = read_pool(write_jsonl(tmp_path / "d.jsonl", rows))
    base = content_hash([{"role": "user", "content": "q"}], "a")
    assert [e.id for e in pool.examples] == [base, f"{base}~2", f"{base}~3"]
    assert pool.duplicate_ids == 2
    assert read_pool(tmp_path / "d.jsonl").fingerprint() == pool.fingerprint()


def test_gzip_jsonl_and_limit(tmp_path):
    import gzip

    path = tmp_path / "g.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for i in range(5):
            fh.write(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n")
    assert len(read_pool(path, limit=3)) == 3
