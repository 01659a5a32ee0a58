"""alignkit.data.io: every storage format, line numbers, folders/splits, hub names, error messages."""
from __future__ import annotations

import gzip
import json

import pytest

from alignkit.data.io import DataError, Row, location, read_rows

ROWS = [{"a": 1, "b": "x"}, {"a": 2, "b": "y, z"}, {"a": 3, "b": "multi\nline"}]


def _write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_rows_and_file_lines_with_blank_line(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS, blank_after_first=True)
    rows = list(read_rows(path))
    assert [r.data for r in rows] == ROWS
    assert [r.line for r in rows] == [1, 3, 4]  # line 2 is blank
    assert all(r.source == str(path) and r.error is None for r in rows)


def test_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    rows = list(read_rows(path))
    assert [r.data for r in rows] == ROWS and [r.line for r in rows] == [1, 2, 3]


def test_json_array_lines_where_objects_start(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1,\n   "b": "x"},\n  {"a": 2, "b": "y, z"},\n\n  {"a": 3, "b": "multi\\nline"}\n]\n')
    rows = list(read_rows(path))
    assert [r.data for r in rows] == ROWS
    assert [r.line for r in rows] == [2, 4, 6]


def test_json_file_holding_json_lines(tmp_path):
    path = _write_jsonl(tmp_path / "d.json", ROWS)
    assert [r.data for r in read_rows(path)] == ROWS


def test_parquet_row_index(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    rows = list(read_rows(path))
    assert [r.data for r in rows] == ROWS and [r.line for r in rows] == [0, 1, 2]
    assert location(rows[1].source, rows[1].line).endswith("d.parquet row 1")


def test_csv_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('a,b\n1,x\n2,"y, z"\n3,"multi\nline"\n4,after\n')
    rows = list(read_rows(path))
    assert [r.data for r in rows] == [
        {"a": "1", "b": "x"}, {"a": "2", "b": "y, z"}, {"a": "3", "b": "multi\nline"}, {"a": "4", "b": "after"}]
    assert [r.line for r in rows] == [2, 3, 4, 6]  # the quoted newline makes record 3 span lines 4-5


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("a\tb\n1\tx, y\n")
    assert [(r.line, r.data) for r in read_rows(path)] == [(2, {"a": "1", "b": "x, y"})]


def test_folder_with_split_files(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "test.jsonl", ROWS[2:])
    assert [r.data for r in read_rows(tmp_path)] == ROWS[:2]
    assert [r.data for r in read_rows(tmp_path, split="test")] == ROWS[2:]
    with pytest.raises(FileNotFoundError, match=r"no files for split 'validation'; splits present: test, train"):
        list(read_rows(tmp_path, split="validation"))


def test_folder_sharded_and_sub_folder_splits(tmp_path):
    (tmp_path / "train").mkdir()
    _write_jsonl(tmp_path / "train" / "part-b.jsonl", ROWS[1:2])
    _write_jsonl(tmp_path / "train" / "part-a.jsonl", ROWS[:1])
    _write_jsonl(tmp_path / "test-00000-of-00001.jsonl", ROWS[2:])
    assert [r.data for r in read_rows(tmp_path)] == ROWS[:2]  # sorted: part-a before part-b
    assert [r.data for r in read_rows(tmp_path, split="test")] == ROWS[2:]


def test_folder_without_split_names_reads_all_sorted(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    _write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.data for r in read_rows(tmp_path, split="test")] == ROWS


def test_hub_name_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = list(read_rows("someone/prefs", split="test"))
    assert calls == [("someone/prefs", "test")]
    assert [r.data for r in rows] == ROWS and [r.line for r in rows] == [0, 1, 2]
    assert rows[0].source == "hub:someone/prefs[test]"


def test_hub_failure_says_what_was_tried(monkeypatch):
    import datasets

    def boom(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(FileNotFoundError, match=r"'nope' is not an existing file or folder.*offline"):
        list(read_rows("nope"))


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_rows(tmp_path / "missing.jsonl"))


def test_bad_json_names_file_line_error_and_rows_read_before(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,,}\n{"a": 4}\n')
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    text = str(info.value)
    assert f"{path} line 3" in text and "invalid JSON" in text and "column 9" in text
    assert "2 rows were read before it" in text
    assert info.value.line == 3 and info.value.source == str(path)


def test_non_object_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: expected a JSON object, got list"):
        list(read_rows(path))


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('a,b\n1,x\n2,"y\nz",extra\n')
    with pytest.raises(DataError, match=r"d.csv line 3: expected 2 fields \(a, b\), got 3"):
        list(read_rows(path))


def test_collect_yields_bad_records_and_continues(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\nnot json\n"str"\n{"a": 4}\n')
    rows = list(read_rows(path, errors="collect"))
    assert [(r.line, r.data) for r in rows if r.error is None] == [(1, {"a": 1}), (4, {"a": 4})]
    bad = [r for r in rows if r.error]
    assert [r.line for r in bad] == [2, 3]
    assert "invalid JSON" in bad[0].error and "1 rows were read before" in bad[0].error
    assert isinstance(bad[1], Row) and "got str" in bad[1].error


def test_unclosed_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1},\n{"a": 2}\n')  # EOF reached on line 3
    with pytest.raises(DataError, match=r"d.json line 3: invalid JSON \(the array is not closed"):
        list(read_rows(path))


def test_bom_crlf_and_blank_lines_load_every_row(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)]
    body = "\r\n\r\n".join(json.dumps(r) for r in rows) + "\r\n"
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # UTF-8 BOM, CRLF, blank lines between rows
    got = list(read_rows(path))
    assert [r.data for r in got] == rows and [r.line for r in got] == [1, 3, 5]
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfprompt,chosen\r\nq,a\r\n")
    assert [r.data for r in read_rows(csv_path)] == [{"prompt": "q", "chosen": "a"}]


def test_cut_gzip_names_where_it_broke_and_keeps_the_rows_before(tmp_path):
    whole = tmp_path / "whole.jsonl.gz"
    lines = [json.dumps({"prompt": f"p{i}", "chosen": "c" * 50, "rejected": "r"}) for i in range(200)]
    with gzip.open(whole, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    rows = list(read_rows(cut, errors="collect"))
    good = [r for r in rows if r.error is None]
    bad = [r for r in rows if r.error]
    assert 0 < len(good) < 200 and [r.data["prompt"] for r in good] == [f"p{i}" for i in range(len(good))]
    assert bad and "truncated or corrupt compressed file" in bad[-1].error
    assert f"the {len(good)} rows before it were read" in bad[-1].error
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz line \d+: .*truncated or corrupt compressed file"):
        list(read_rows(cut))


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad_line = b'{"a": "caf\xe9"}'
    path.write_bytes(b'{"a": "ok"}\n' + bad_line + b"\n")
    byte = bad_line.index(b"\xe9") + 1  # 1-based position of the Latin-1 e-acute
    with pytest.raises(DataError, match=rf"latin1\.jsonl line 2: undecodable bytes: not UTF-8 at byte {byte} "):
        list(read_rows(path))


def test_invalid_json_shows_the_text_at_the_break(tmp_path):
    path = tmp_path / "d.jsonl"
    line = '{"prompt": "q", "chosen": "a" "rejected": "b"}'  # missing comma before "rejected"
    path.write_text(line + "\n")
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    col = line.index('"rejected"') + 1
    assert f"at column {col}" in str(info.value) and '"a" "rejected"' in str(info.value)
