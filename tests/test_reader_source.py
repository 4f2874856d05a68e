"""A record's own `source` field: it wins over the file-name default, a given source wins over it,
and a mixed pool written as messages JSONL reads back with its sources."""

import csv

from conftest import write_jsonl
from mechsieve.data import read_pool
from mechsieve.data.records import Example
from mechsieve.data.writers import example_to_messages

CHATS = [
    {"id": "a", "source": "gsm8k", "messages": [{"role": "user", "content": "2+2?"},
                                                {"role": "assistant", "content": "4"}]},
    {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"id": "c", "source": "  ", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"id": "d", "source": 7, "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "q"}]},
]


def test_own_source_wins_over_the_file_name_and_leaves_meta(tmp_path):
    pool = read_pool(write_jsonl(tmp_path / "mixed.jsonl", CHATS))
    # a blank or non-string field is no name: those take the file-name default
    assert [ex.source for ex in pool.examples] == ["gsm8k", "mixed", "mixed", "mixed"]
    assert "source" not in pool.examples[0].meta and pool.examples[3].meta["source"] == 7
    assert pool.counts_by_source() == {"gsm8k": 1, "mixed": 3}


def test_a_given_source_and_a_field_map_win_over_the_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", CHATS)
    assert {ex.source for ex in read_pool(path, source="mine").examples} == {"mine"}
    rows = [{"q": "2+2?", "a": "4", "source": "gsm8k", "origin": "o1"}]
    mapped = read_pool(write_jsonl(tmp_path / "m.jsonl", rows), field_map={"prompt": "q", "response": "a",
                                                                          "source": "origin"})
    assert mapped.examples[0].source == "o1"
    # mapped without source=: the record's own field still names it
    plain = read_pool(tmp_path / "m.jsonl", field_map={"prompt": "q", "response": "a"})
    assert plain.examples[0].source == "gsm8k" and "source" not in plain.examples[0].meta


def test_csv_empty_source_cell_is_the_default(tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["question", "answer", "source"])
        w.writeheader()
        w.writerows([{"question": "1+1?", "answer": "2", "source": "arith"},
                     {"question": "2+3?", "answer": "5", "source": ""}])
    assert [ex.source for ex in read_pool(path).examples] == ["arith", "t"]


def test_a_mixed_pool_written_as_messages_reads_back_with_its_sources(tmp_path):
    exs = [Example(f"e{i}", src, [{"role": "user", "content": f"q{i}"}], f"r{i}")
           for i, src in enumerate(["gsm8k_train", "medqa", "mbpp", "medqa"])]
    back = read_pool(write_jsonl(tmp_path / "pool.jsonl", [example_to_messages(ex) for ex in exs]))
    assert [(ex.id, ex.source) for ex in back.examples] == [(ex.id, ex.source) for ex in exs]
    assert back.counts_by_source() == {"gsm8k_train": 1, "medqa": 2, "mbpp": 1}
