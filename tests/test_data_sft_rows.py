"""alignkit.data.sft_rows.load_sft_rows: column aliases and their precedence, the ``columns`` mapping, the
``format`` / ``rows_read`` / ``locations`` bookkeeping across storage formats, and bad rows named by file,
line and field. (Drop reasons and lengths: tests/test_data_check.py; packed SFT: tests/test_data_sft.py.)"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.io import DataError
from alignkit.data.sft_rows import load_sft_rows

USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello!"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "c"}),
    ({"prompt": "p", "response": "r"}, {"prompt": "p", "completion": "r"}),
    ({"instruction": "i", "output": "o"}, {"prompt": "i", "completion": "o"}),
    ({"instruction": "i", "input": "", "output": "o"}, {"prompt": "i", "completion": "o"}),  # no blank line
    ({"instruction": "i", "input": None, "output": "o"}, {"prompt": "i", "completion": "o"}),
    ({"instruction": "i", "response": "r"}, {"prompt": "i", "completion": "r"}),
    ({"instruction": "i", "input": "ctx", "response": "r"}, {"prompt": "i\n\nctx", "completion": "r"}),
    ({"question": "q", "answer": "a", "id": 7}, {"prompt": "q", "completion": "a"}),  # other columns dropped
])
def test_each_alias_gives_prompt_completion(tmp_path, row, expected):
    loaded = load_sft_rows(_jsonl(tmp_path / "d.jsonl", [row]))
    assert list(loaded) == [expected]


def test_alias_precedence(tmp_path):
    rows = [{"messages": [USER, BOT], "prompt": "p", "completion": "c"},  # messages first
            {"prompt": "p", "completion": "c", "response": "r"},  # prompt/completion, then prompt/response
            {"instruction": "i", "output": "o", "response": "r"},  # instruction/output, then .../response
            {"prompt": "p", "response": "r", "instruction": "i", "output": "o"}]  # prompt/* first
    loaded = load_sft_rows(_jsonl(tmp_path / "d.jsonl", rows))
    assert list(loaded) == [{"messages": [USER, BOT]}, {"prompt": "p", "completion": "c"},
                            {"prompt": "i", "completion": "o"}, {"prompt": "p", "completion": "r"}]
    # the shapes in the order first seen
    assert loaded.format == "messages, prompt/completion, instruction/output, prompt/response"


def test_messages_keep_role_and_content_only(tmp_path):
    row = {"messages": [{"role": "system", "content": "Be brief.", "name": "sys"}, USER,
                        {"role": "assistant", "content": "Hello!", "weight": 0}]}
    loaded = load_sft_rows(_jsonl(tmp_path / "d.jsonl", [row]))
    assert list(loaded) == [{"messages": [{"role": "system", "content": "Be brief."}, USER, BOT]}]
    assert loaded.format == "messages"


def test_bookkeeping_counts_and_locations(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n'
                    '{"question": "q", "answer": "x"}\nnot json\n')
    loaded = load_sft_rows(path, errors="collect")
    assert list(loaded) == [{"prompt": "a", "completion": "b"}, {"prompt": "q", "completion": "x"}]
    assert loaded.locations == [(str(path), 1), (str(path), 4)]  # file lines: the blank line 2 counts
    assert loaded.rows_read == 4 and loaded.format == "prompt/completion, question/answer"
    assert [(m.line, m.field) for m in loaded.malformed] == [(3, "prompt"), (5, None)]  # None: whole record
    assert loaded.malformed[1].message.startswith("invalid JSON")


def test_same_rows_from_csv_parquet_and_a_split_folder(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p, 2", "completion": "c\n2"}]
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,completion\np1,c1\n"p, 2","c\n2"\n')
    from_csv = load_sft_rows(csv)
    assert list(from_csv) == rows and from_csv.locations == [(str(csv), 2), (str(csv), 3)]  # header is line 1
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_parquet = load_sft_rows(parquet)
    assert list(from_parquet) == rows and from_parquet.locations == [(str(parquet), 0), (str(parquet), 1)]
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", rows[:1])
    _jsonl(folder / "test.jsonl", rows[1:])
    assert list(load_sft_rows(folder)) == rows[:1]
    assert list(load_sft_rows(folder, split="test")) == rows[1:]


# ------------------------------------------------------------------------------------------- columns
def test_columns_map_prompt_and_completion(tmp_path):
    rows = [{"q": "2+2?", "a": "4", "prompt": "ignored", "response": "ignored"}]
    loaded = load_sft_rows(_jsonl(tmp_path / "d.jsonl", rows), columns={"prompt": "q", "completion": "a"})
    assert list(loaded) == [{"prompt": "2+2?", "completion": "4"}] and loaded.format == "prompt/completion"


def test_columns_to_a_missing_column_name_the_column(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}, {"q": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'a': missing \(mapped to 'completion'\); "
                                         r"columns present: q, answer") as err:
        load_sft_rows(path, columns={"prompt": "q", "completion": "a"})
    assert (err.value.line, err.value.field) == (2, "a")


def test_columns_with_an_unknown_target_are_refused_before_any_row(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(ValueError, match=r"columns: unknown target\(s\) \['chosen'\]; "
                                         r"map onto prompt, completion, messages"):
        load_sft_rows(path, columns={"prompt": "q", "chosen": "a"}, errors="collect")


# ------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize("row, field, message", [
    ({"prompt": None, "completion": "c"}, "prompt", "is null"),
    ({"prompt": "p", "completion": ["c"]}, "completion", "expected a string, got list"),
    ({"prompt": "p", "completion": "\n "}, "completion", "empty text"),
    ({"messages": []}, "messages", "expected a non-empty list of messages, got an empty list"),
    ({"messages": [USER, "Hello"]}, "messages[1]", "expected a message dict, got str"),
    ({"messages": [USER, {"role": "bot", "content": "x"}]}, "messages[1].role",
     "expected one of system, user, assistant, tool, got 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, BOT]}, "messages[0].content",
     "expected a string, got int"),
    ({"messages": [{"role": "user", "content": " "}, BOT]}, "messages[0].content", "empty text"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages[1].content", "missing"),
    ({"prompt": [USER], "completion": "Hello!"}, "completion",
     "expected a non-empty list of messages, got str"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": ""}]}, "completion[0].content",
     "empty text"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "ok"}, row])
    with pytest.raises(DataError) as err:
        load_sft_rows(path)
    assert str(err.value) == f"{path} line 2: field {field!r}: {message}"
    assert (err.value.source, err.value.line, err.value.field) == (str(path), 2, field)
    collected = load_sft_rows(path, errors="collect")
    assert list(collected) == [{"prompt": "ok", "completion": "ok"}] and collected.rows_read == 2
    got = [(m.source, m.line, m.field, m.message) for m in collected.malformed]
    assert got == [(str(path), 2, field, message)]


def test_bad_csv_row_names_the_file_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc, \n")
    with pytest.raises(DataError, match=r"d\.csv line 3: field 'completion': empty text"):
        load_sft_rows(path)


def test_allow_empty_keeps_empty_texts(tmp_path):
    rows = [{"prompt": "", "completion": "c"}, {"messages": [{"role": "user", "content": ""}, BOT]}]
    loaded = load_sft_rows(_jsonl(tmp_path / "d.jsonl", rows), allow_empty=True)
    assert list(loaded) == [{"prompt": "", "completion": "c"},
                            {"messages": [{"role": "user", "content": ""}, BOT]}]
    assert loaded.malformed == []
