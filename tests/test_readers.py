"""Every reader on every format, malformed and empty input, ids, and writing subsets back."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from mechsieve.data import DataConfig, DataError, read_pool, write_subset
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


# --- issue 17: undecodable bytes, byte-order marks, the encoding setting --------------------------

def test_undecodable_byte_in_jsonl_names_file_line_and_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: byte 0xe9 at byte offset 27 is not valid utf-8.*"
                                        r"data\.encoding=latin-1.*--skip-invalid"):
        read_pool(path)
    pool = read_pool(path, skip_invalid=True)
    assert [e.response for e in pool.examples] == ["a", "b"] and [e.meta["row"] for e in pool.examples] == [0, 2]
    assert len(pool.skipped) == 1 and pool.skipped[0].startswith(f"{path}:2: byte 0xe9")
    latin = read_pool(DataConfig(path=str(path), encoding="latin-1"))
    assert [e.response for e in latin.examples] == ["a", "café", "b"]


def test_undecodable_byte_in_csv_names_the_line_it_is_on(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'question,answer\nq1,a1\n"q2\nmore \xff",a2\nq3,a3\n')
    with pytest.raises(DataError, match=r"bad\.csv:4: byte 0xff at byte offset 31 is not valid utf-8"):
        read_pool(path)
    pool = read_pool(path, skip_invalid=True)
    assert [e.response for e in pool.examples] == ["a1", "a3"] and len(pool.skipped) == 1
    assert pool.skipped[0].startswith(f"{path}:4:")
    out = write_subset(pool, [pool.examples[1].id], tmp_path / "out" / "sel.csv")
    assert [e.response for e in read_pool(out).examples] == ["a3"]
    (tmp_path / "head.csv").write_bytes(b'qu\xe9stion,answer\nq,a\n')
    with pytest.raises(DataError, match=r"head\.csv:1: the header: byte 0xe9"):
        read_pool(tmp_path / "head.csv", skip_invalid=True)


def test_undecodable_byte_in_a_json_array_cannot_be_skipped(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n {"text": "a"},\n {"text": "\xe9"}\n]\n')
    for skip in (False, True):
        with pytest.raises(DataError, match=r"bad\.json:3: byte 0xe9 at byte offset 29 is not valid utf-8; "
                                            r"a JSON array is decoded as a whole"):
            read_pool(path, skip_invalid=skip)
    assert read_pool(DataConfig(path=str(path), encoding="latin-1")).examples[1].response == "é"


@pytest.mark.parametrize("name, body", [
    ("b.jsonl", b'{"text": "a"}\n{"text": "b"}\n'),
    ("b.json", b'[{"text": "a"}, {"text": "b"}]'),
    ("b.csv", b"text\na\nb\n"),
])
def test_a_utf8_byte_order_mark_reads_fine(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body)
    pool = read_pool(path)
    assert [e.response for e in pool.examples] == ["a", "b"] and pool.format == "text"
    out = write_subset(pool, [pool.examples[1].id], tmp_path / "out" / name)
    assert [e.response for e in read_pool(out).examples] == ["b"]


def test_encoding_setting_is_checked():
    from mechsieve.config import ConfigError

    with pytest.raises(ConfigError, match="data.encoding='nope'"):
        DataConfig(encoding="nope")
    with pytest.raises(ConfigError, match="data.encoding='utf-16'.*iconv"):
        DataConfig(encoding="utf-16")
    assert DataConfig(encoding="utf-8-sig").encoding == "utf-8-sig"


def test_cli_undecodable_pool_exits_2_naming_file_line(tmp_path, capsys):
    from mechsieve.cli import main

    path = tmp_path / "pool.jsonl"
    path.write_bytes(b"".join(b'{"question": "q%d", "answer": "caf\xe9 %d"}\n' % (i, i) for i in range(4)))
    out = tmp_path / "out"
    assert main(["select", "--method", "random", "--pool", str(path), "--budget", "2", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: byte 0xe9" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["select", "--method", "random", "--pool", str(path), "--budget", "2", "--out", str(out),
                 "--set", "data.encoding=latin-1", "--quiet"]) == 0
    assert len((out / "selected.jsonl").read_text(encoding="utf-8").splitlines()) == 2


# --- issue 17: the fingerprint covers meta; a JSON array reads in linear time ---------------------

def test_fingerprint_covers_meta_but_not_the_row(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a", "options": ["x", "y"]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "a", "options": ["x", "z"]}])
    pa_, pb = read_pool(a, source="s"), read_pool(b, source="s")
    assert pa_.examples[0].id == pb.examples[0].id and pa_.examples[0].response == pb.examples[0].response
    assert pa_.fingerprint() != pb.fingerprint()
    # Key order inside meta does not matter; where the record sat in the file does not either.
    c = write_jsonl(tmp_path / "c.jsonl", [{"options": ["x", "y"], "answer": "a", "question": "q"}])
    assert read_pool(c, source="s").fingerprint() == pa_.fingerprint()
    d = tmp_path / "d.jsonl"
    d.write_text('{not json}\n' + a.read_text())
    skipped = read_pool(d, source="s", skip_invalid=True)
    assert skipped.examples[0].meta["row"] == 1 and skipped.fingerprint() == pa_.fingerprint()


def test_json_array_reads_in_linear_time_with_right_line_numbers(tmp_path):
    import time

    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(20_000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, indent=1))
    t0 = time.perf_counter()
    assert len(read_pool(path)) == 20_000
    assert time.perf_counter() - t0 < 5
    del rows[17_000]["output"]
    text = json.dumps(rows, indent=1)
    path.write_text(text)
    line = text[:text.index('"Add 17000 and 1."')].count("\n")  # the record's '{' is on the line above
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=rf"big\.json:{line}: field 'output'"):
        read_pool(path)
    pool = read_pool(path, skip_invalid=True)
    assert time.perf_counter() - t0 < 5
    assert len(pool) == 19_999 and pool.skipped[0].startswith(f"{path}:{line}:")


# --- issue 17: empty responses, long CSV fields, unreadable tables, layouts with nulls, --encoding --

@pytest.mark.parametrize("name, rows, field", [
    ("qa.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": ""}], "answer"),
    ("alpaca.json", [{"instruction": "i1", "output": "o1"}, {"instruction": "i2", "output": " \n"}], "output"),
    ("text.jsonl", [{"text": "t1"}, {"text": ""}], "text"),
    ("pc.jsonl", [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": ""}], "completion"),
    ("chat.jsonl", [{"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]},
                    {"messages": [{"role": "user", "content": "u2"}, {"role": "assistant", "content": ""}]}],
     "messages"),
    ("qa.csv", [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": ""}], "answer"),
    ("mapped.jsonl", [{"task": "t1", "code": "c1"}, {"task": "t2", "code": ""}], "code"),
])
def test_an_empty_response_is_an_invalid_record(tmp_path, name, rows, field):
    path = _write(tmp_path / name, rows, name.rsplit(".", 1)[1])
    kw = {"field_map": {"prompt": "task", "response": "code"}} if name.startswith("mapped") else {}
    line = {"json": 6, "csv": 3}.get(name.rsplit(".", 1)[1], 2)  # the second record (json: its '{')
    with pytest.raises(DataError, match=rf"{name}:{line}: field '{field}': empty response.*--skip-invalid"):
        read_pool(path, **kw)
    pool = read_pool(path, skip_invalid=True, **kw)
    assert len(pool) == 1 and len(pool.skipped) == 1 and pool.skipped[0].startswith(f"{path}:{line}: field")


def test_prompt_only_records_are_still_read(tmp_path):
    """A chat that ends on the user turn, or a mapping without a response column, has no response
    field at all: such prompt-only records (generation prompts) stay readable."""
    chat = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert read_pool(chat).examples[0].response == ""
    mapped = write_jsonl(tmp_path / "m.jsonl", [{"task": "write f"}])
    assert read_pool(mapped, field_map={"prompt": "task"}).examples[0].prompt[0]["content"] == "write f"


def test_a_csv_field_longer_than_the_csv_module_limit_reads(tmp_path):
    long = "7 " * 100_000
    path = _write(tmp_path / "long.csv", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": long}],
                  "csv")
    assert read_pool(path).examples[1].response == long


def test_any_other_csv_error_names_file_and_line(tmp_path, monkeypatch):
    import csv as csv_module

    from mechsieve.data import readers

    path = _write(tmp_path / "c.csv", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "x" * 50}],
                  "csv")
    monkeypatch.setattr(readers, "_allow_long_csv_fields", lambda: None, raising=False)
    old = csv_module.field_size_limit(20)
    try:
        with pytest.raises(DataError, match=r"c\.csv:3: not a readable CSV row \(field larger than field limit"):
            read_pool(path)
    finally:
        csv_module.field_size_limit(old)


def test_a_truncated_parquet_file_is_a_data_error(tmp_path):
    path = _write(tmp_path / "t.parquet", ALPACA, "parquet")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for skip in (False, True):
        with pytest.raises(DataError, match=r"t\.parquet: not a readable Parquet file \(.*\); "
                                            r"was it written completely\?"):
            read_pool(path, skip_invalid=skip)


def test_a_truncated_or_empty_saved_dataset_is_a_data_error(tmp_path):
    import datasets

    path = _write(tmp_path / "cut", ALPACA, "disk")
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut: not a readable saved dataset \(.*\); was it written completely\?"):
        read_pool(path)
    empty = tmp_path / "empty"
    nothing = datasets.Dataset(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}))
    nothing.save_to_disk(str(empty))
    with pytest.raises(DataError, match=r"empty: no records$"):
        read_pool(empty)
    datasets.DatasetDict({"train": nothing}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: no records$"):
        read_pool(tmp_path / "dd")


@pytest.mark.parametrize("container", ["parquet", "disk"])
def test_null_fields_do_not_count_for_the_layout(tmp_path, container):
    rows = [{"id": f"g{i}", "question": f"q{i}", "answer": f"a{i}", "instruction": None, "output": None}
            for i in range(3)] + [{"id": None, "question": None, "answer": None, "instruction": "Say hi.",
                                   "output": "hi"}]
    path = _write(tmp_path / ("mixed.parquet" if container == "parquet" else "mixed"), rows, container)
    with pytest.raises(DataError, match=r"mixed(\.parquet)?:row 3: .*mixed layouts: expected layout "
                                        r"question_answer \(detected from the first record\), found layout alpaca"):
        read_pool(path)
    pool = read_pool(path, skip_invalid=True)
    assert pool.format == "question_answer" and [e.id for e in pool.examples] == ["g0", "g1", "g2"]
    assert len(pool.skipped) == 1 and "row 3" in pool.skipped[0]


def test_a_record_in_another_layout_says_so(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"},
                                              {"instruction": "Say hi.", "input": "", "output": "hi"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'question'.*mixed layouts: expected layout "
                                        r"question_answer \(detected from the first record\), found layout alpaca"):
        read_pool(path)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,answer,input,instruction,output,question\nr0,a,,,,q\n,,,Say hi.,hi,\n")
    assert read_pool(csv_path, skip_invalid=True).format == "question_answer"
    with pytest.raises(DataError, match=r"m\.csv:3: field 'answer': empty response.*found layout alpaca"):
        read_pool(csv_path)


def test_cli_encoding_flag(tmp_path, capsys):
    from mechsieve.cli import main

    path = tmp_path / "pool.csv"
    path.write_bytes(b"".join([b"question,answer\n"] + [b"q%d,caf\xe9 %d\n" % (i, i) for i in range(4)]))
    out = tmp_path / "out"
    argv = ["select", "--method", "random", "--pool", str(path), "--budget", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 2 and f"{path}:2: byte 0xe9" in capsys.readouterr().err
    assert main([*argv, "--encoding", "latin-1"]) == 0
    rows = (out / "selected.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "question,answer" and len(rows) == 3 and all("café" in r for r in rows[1:])
    assert main([*argv[:-1], "--encoding", "nope", "--quiet"]) == 2
    assert "data.encoding='nope'" in capsys.readouterr().err


# Chat data as it comes: tool calls, and TRL's standard (non-conversational) prompt/completion.

TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHATS = [
    {"id": "w1", "messages": [{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                              {"role": "tool", "name": "get_weather", "content": {"celsius": 22}},
                              {"role": "assistant", "content": "It is 22C."}]},
    {"id": "w2", "messages": [{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]},
    {"id": "p", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
]
# ChatML that writes tool calls out, as templates that support tools do
TOOLS_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("container", ["jsonl", "parquet"])
def test_tool_call_chats_are_read_not_refused(tmp_path, container):
    rows = TOOL_CHATS
    if container == "parquet":  # a column holds one type: there the tool result is the JSON text
        rows = json.loads(json.dumps(TOOL_CHATS).replace('{"celsius": 22}', '"{\\"celsius\\": 22}"'))
    pool = read_pool(_write(tmp_path / f"tools.{container}", rows, container))
    assert [e.id for e in pool.examples] == ["w1", "w2", "p"] and not pool.skipped
    w1, w2, _ = pool.examples
    assert w1.prompt == [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                         {"role": "tool", "content": '{"celsius": 22}', "name": "get_weather"}]
    assert (w1.response, w1.tool_calls) == ("It is 22C.", [])
    assert (w2.prompt, w2.response, w2.tool_calls) == ([{"role": "user", "content": "Weather in Paris?"}], "",
                                                       [TOOL_CALL])
    # an answer that only calls tools is content too: another call is another id
    other = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    assert content_hash(w2.prompt, "", [other]) != content_hash(w2.prompt, "", [TOOL_CALL]) != content_hash(w2.prompt, "")


def test_tool_calls_render_through_a_template_that_supports_them(tmp_path, tokenizer):
    from mechsieve.data import render_example

    tok = _with_template(tokenizer, TOOLS_TEMPLATE)
    w1, w2, _ = read_pool(_write(tmp_path / "t.jsonl", TOOL_CHATS, "jsonl")).examples
    r = render_example(w1, tok)
    assert tok.decode(r.input_ids) == ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
                                       f"{CALL_TEXT}<|im_end|>\n<|im_start|>tool\n{{\"celsius\": 22}}<|im_end|>\n"
                                       "<|im_start|>assistant\nIt is 22C.<|im_end|>\n")
    assert tok.decode(r.input_ids[r.response_mask]) == f"{CALL_TEXT}<|im_end|>\nIt is 22C.<|im_end|>\n"
    assert r.fallback == ""
    r = render_example(w2, tok)
    assert tok.decode(r.input_ids[r.response_mask]) == f"{CALL_TEXT}<|im_end|>\n"
    assert tok.decode(r.input_ids[: r.prompt_len]).endswith("<|im_start|>assistant\n")


def test_tool_calls_a_template_cannot_render_are_skipped_with_a_count(tmp_path, tokenizer):
    from mechsieve.data import render_pool
    from mechsieve.data.render import skip_unrenderable

    path = _write(tmp_path / "t.jsonl", TOOL_CHATS, "jsonl")
    pool = read_pool(path)
    kept = skip_unrenderable(pool, tokenizer)  # the fixture's ChatML writes content only
    assert [e.id for e in kept.examples] == ["p"] and len(pool) == 3
    assert kept.skipped == [f"{path}:{line} (id {i}): tool calls this tokenizer's chat template does not render: "
                            "it leaves out the call to 'get_weather'; skipped" for line, i in ((1, "w1"), (2, "w2"))]
    raising = _with_template(tokenizer, "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception("
                                        "'no tool role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (why,) = skip_unrenderable(pool, raising).skipped[:1]
    assert why.endswith("it fails on them (TemplateError: no tool role); skipped") and "(id w1)" in why
    # rendered anyway (a pool not filtered), they are not refused: plain template, counted
    rendered, stats = render_pool(pool.examples, tokenizer)
    assert stats.plain_fallback == 2 and stats.fallback_ids == ["w1", "w2"]
    assert stats.summary().endswith("2 with tool calls the chat template does not render (rendered with the plain "
                                    "template instead)")
    assert tokenizer.decode(rendered[1].input_ids) == f"<s>User: Weather in Paris?\n\nAssistant: {CALL_TEXT}</s>"
    assert tokenizer.decode(rendered[0].input_ids[rendered[0].response_mask]) == f"{CALL_TEXT}It is 22C.</s>"


def test_cli_reads_and_uses_tool_call_chats(tmp_path, capsys, model_dir):
    from mechsieve.cli import main

    path = _write(tmp_path / "t.jsonl", TOOL_CHATS, "jsonl")
    assert main(["info", "--pool", str(path), "--model", str(model_dir)]) == 0
    assert "  records: 3\n" in capsys.readouterr().out
    out = tmp_path / "sel"
    assert main(["select", "--method", "random", "--pool", str(path), "--budget", "3", "--out", str(out),
                 "--quiet"]) == 0
    assert [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()] == TOOL_CHATS


def test_template_none_renders_prompt_plus_completion_as_trl_does(tmp_path, tokenizer):
    from mechsieve.config import ConfigError
    from mechsieve.data import RenderConfig, render_example

    prompt, completion = "Natalia sold clips to 48 of her friends.", " The answer is 72"
    ex = read_pool(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])).examples[0]
    r = render_example(ex, tokenizer, RenderConfig(template="none"))
    # TRL, standard format: ids of prompt + completion + EOS; the completion starts where the
    # prompt's own ids stop being a prefix of them
    full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    start = next(i for i, (a, b) in enumerate(zip([*prompt_ids, None], full)) if a != b)
    assert r.input_ids.tolist() == full == [1, 353, 336, 302, 299, 326, 29, 332, 328, 87, 338, 310, 370, 19,
                                            226, 306, 281, 348, 330, 226, 358, 2]
    assert r.response_mask.tolist() == [False] * start + [True] * (len(full) - start) and start == 14
    assert r.prompt_len == 14 and tokenizer.decode(r.input_ids[r.response_mask]) == completion + "</s>"
    g = render_example(ex, tokenizer, RenderConfig(template="none"), add_generation_prompt=True)
    assert g.input_ids.tolist() == prompt_ids and not g.response_mask.any()
    chat = read_pool(_write(tmp_path / "c.jsonl", TOOL_CHATS[2:] + [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}]}], "jsonl")).examples
    assert render_example(chat[0], tokenizer, RenderConfig(template="none")).input_ids.tolist() == (
        tokenizer("hi" + "yo" + tokenizer.eos_token)["input_ids"])
    with pytest.raises(ConfigError, match=r"render\.template=none renders a prompt that is one string .* has a chat "
                                          r"prompt \(system, user\); set render\.template=auto"):
        render_example(chat[1], tokenizer, RenderConfig(template="none"))
