"""Unpaired (KTO) data: prompt/completion/label rows, labels, bad rows, pairs unpaired on the fly, the check."""
from __future__ import annotations

import json

import pytest

from alignkit.data.check import check_unpaired, run_check
from alignkit.data.io import DataError
from alignkit.data.unpaired import UnpairedExample, load_unpaired_rows, parse_label, to_trl_dataset


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False), (" up ", True),
    ("Down", False), ("yes", True), ("no", False), ("1", True), ("0", False)])
def test_label_values(value, expected):
    assert parse_label(value) is expected


@pytest.mark.parametrize("value", [2, -1, 0.5, 1.0, "maybe", "", None, [True]])
def test_label_refused(value):
    from alignkit.data.io import RowProblem

    with pytest.raises(RowProblem) as info:
        parse_label(value)
    assert info.value.field == "label" and "expected true/false" in info.value.message


def test_unpaired_rows_and_bad_rows(tmp_path):
    path = _jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": "down"},
        {"prompt": "Sum 2+2", "completion": "4", "label": 2},          # line 3: bad label
        {"prompt": "Sum 2+3", "completion": 5, "label": True},         # line 4: completion not a string
        {"prompt": "Sum 2+4", "completion": "6"},                      # line 5: no label
        "{not json",                                                    # line 6
        {"prompt": "Sum 2+5", "completion": "7", "label": 1},
    ])
    rows = load_unpaired_rows(path, errors="collect")
    assert [(r.prompt, r.completion, r.label, r.line) for r in rows] == [
        ("Hi", "Hello!", True, 1), ("Hi", "Go away.", False, 2), ("Sum 2+5", "7", True, 7)]
    assert rows.format == "unpaired" and rows.rows_read == 7
    assert [(m.line, m.field) for m in rows.malformed] == [(3, "label"), (4, "completion"), (5, "label"),
                                                           (6, None)]
    with pytest.raises(DataError, match=r"kto\.jsonl line 3: field 'label': expected true/false.*got 2") as info:
        load_unpaired_rows(path)
    assert (info.value.line, info.value.field) == (3, "label")


def test_csv_labels_and_columns(tmp_path):
    path = tmp_path / "thumbs.csv"
    path.write_text("question,answer,thumb\nHi,Hello!,up\nHi,Go away.,down\nBye,See you,1\nBye,Whatever,maybe\n")
    rows = load_unpaired_rows(path, columns={"prompt": "question", "completion": "answer", "label": "thumb"},
                              errors="collect")
    assert [(r.completion, r.label, r.line) for r in rows] == [("Hello!", True, 2), ("Go away.", False, 3),
                                                               ("See you", True, 4)]
    assert [(m.line, m.field) for m in rows.malformed] == [(5, "label")]


def test_conversational_completion(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello!"}], "label": True},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "x"}],
         "label": False}])
    rows = load_unpaired_rows(path, errors="collect")
    assert rows[0].prompt == [{"role": "user", "content": "Hi"}] and rows[0].conversational
    assert [(m.line, m.field) for m in rows.malformed] == [(2, "completion[0].role")]


PAIRS = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]


def test_pairs_unpaired_on_the_fly(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [*PAIRS, {"prompt": "Q9", "chosen": "x"}])  # line 4: no rejected
    rows = load_unpaired_rows(path, errors="collect")
    # every chosen (desirable), then every rejected (undesirable), each with its pair's line
    assert [(r.prompt, r.completion, r.label, r.line) for r in rows] == [
        ("Q0", "good 0", True, 1), ("Q1", "good 1", True, 2), ("Q2", "good 2", True, 3),
        ("Q0", "bad 0", False, 1), ("Q1", "bad 1", False, 2), ("Q2", "bad 2", False, 3)]
    assert rows.format == "prompt_chosen_rejected -> unpaired"
    assert rows.rows_read == 2 * 3 + 1 and [(m.line, m.field) for m in rows.malformed] == [(4, "rejected")]
    mapped = _jsonl(tmp_path / "mapped.jsonl", [{"q": "Q", "good": "a", "bad": "b"}])
    got = load_unpaired_rows(mapped, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(r.completion, r.label) for r in got] == [("a", True), ("b", False)]
    forced = load_unpaired_rows(path, format="prompt_chosen_rejected", errors="collect", limit=2)
    assert len(forced) == 4 and forced.rows_read == 4
    with pytest.raises(ValueError, match="format must be one of auto, unpaired, prompt_chosen_rejected"):
        load_unpaired_rows(path, format="kto")


def test_check_unpaired_drop_reasons_and_counts(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "A", "completion": "a", "label": True},
        {"prompt": "A", "completion": "a", "label": True},     # duplicate of line 1
        {"prompt": "B", "completion": "b", "label": True},
        {"prompt": "B", "completion": "b", "label": False},    # B/b labelled both ways: lines 3 and 4 dropped
        {"prompt": "C", "completion": " ", "label": False},    # empty
        {"prompt": "D", "completion": "d", "label": "?"},      # malformed
        {"prompt": "E", "completion": "e", "label": False},
    ])
    report = check_unpaired(load_unpaired_rows(path, errors="collect", allow_empty=True))
    assert report.kind == "unpaired" and report.rows_read == 7
    assert [(e.prompt, e.label) for e in report.kept] == [("A", True), ("E", False)]
    assert {r: [n for _, n in v] for r, v in report.dropped.items()} == {
        "duplicate": [2], "labelled both ways": [3, 4], "empty text": [5]}
    assert report.rows_read == report.rows_kept + report.rows_dropped + len(report.malformed)
    assert report.lengths["total"] == [2, 2]  # characters, rows that passed the content checks
    with pytest.raises(DataError, match=r"1 malformed data rows, first: .*line 6: field 'label'"):
        report.verdict("raise")
    assert report.verdict("drop") is report


def test_run_check_unpaired_pairs_with_tokenizer(tmp_path, gpt2_tokenizer):
    """chosen == rejected becomes one row labelled both ways (both dropped); an over-long reply is dropped."""
    rows = [*PAIRS, {"prompt": "Q3", "chosen": "same", "rejected": "same"},
            {"prompt": "Q4", "chosen": "ok", "rejected": "word " * 40}]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    report = run_check({"data": str(path), "kind": "unpaired", "max_length": 20}, tokenizer=gpt2_tokenizer)
    assert report.rows_read == 10 and report.rows_kept == 7
    assert {r: sorted(n for _, n in v) for r, v in report.dropped.items()} == {
        "labelled both ways": [4, 4], "over max length": [5]}
    eos = gpt2_tokenizer.eos_token
    prompt_ids = gpt2_tokenizer("Q0")["input_ids"]
    full = gpt2_tokenizer("Q0good 0" + eos)["input_ids"]
    assert report.lengths["prompt"][0] == len(prompt_ids) and report.lengths["total"][0] == len(full)
    assert sum(e.label for e in report.kept) == 4  # Q0-Q2 and Q4's chosen


def test_cli_data_check_reaches_the_same_verdict(tmp_path, tiny_model_dir):
    from alignkit.cli import data as data_cli

    path = _jsonl(tmp_path / "pairs.jsonl", [*PAIRS, {"prompt": "Q9", "chosen": "x"}])
    recipe = tmp_path / "kto.yaml"
    recipe.write_text(f"stage: kto\nmodel: {{name_or_path: {tiny_model_dir}}}\ndata: {{path: {path}}}\n"
                      "train: {max_length: 64}\n")
    out = tmp_path / "check"
    assert data_cli.main(["check", str(recipe), "--output", str(out)]) == 1  # one malformed row: training stops
    saved = json.loads((out / "report.json").read_text())
    assert (saved["kind"], saved["rows_read"], saved["rows_kept"], len(saved["malformed"])) == ("unpaired", 7, 6, 1)
    assert data_cli.main(["check", str(recipe), "data.on_error=drop", "--output", str(out)]) == 0


def test_to_trl_dataset():
    ds = to_trl_dataset([UnpairedExample("p", "c", True), UnpairedExample("p", "d", False)], metadata=False)
    assert ds.column_names == ["prompt", "completion", "label"] and ds["label"] == [True, False]
    with pytest.raises(DataError, match="a dataset holds one kind"):
        to_trl_dataset([UnpairedExample("p", "c", True),
                        UnpairedExample("p", [{"role": "assistant", "content": "c"}], False)])
