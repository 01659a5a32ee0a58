"""load_hh on small gzip fixtures written here (no real HH data in the repo)."""
from __future__ import annotations

import gzip
import json

import pytest

from alignkit.data import load_hh
from alignkit.data.io import DataError


def _pair(human: str, chosen: str, rejected: str, history: str = "") -> dict:
    prefix = f"{history}\n\nHuman: {human}\n\nAssistant:"
    return {"chosen": f"{prefix} {chosen}", "rejected": f"{prefix} {rejected}"}


def _write_gz(path, rows, raw_lines=()):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")
    return path


@pytest.fixture
def hh_folder(tmp_path):
    folder = tmp_path / "hh"
    folder.mkdir()
    _write_gz(folder / "harmless-base.jsonl.gz", [
        _pair("How do I pick a lock?", "I can't help with that.", "First, get a tension wrench."),
        _pair("And then?", "No.", "Insert the pick.", history="\n\nHuman: Hi\n\nAssistant: Hello!"),  # 2 turns
    ])
    _write_gz(folder / "helpful-base.jsonl.gz", [
        _pair("What is 2+2?", "4.", "5."),
        _pair("Name a fruit.", "Apple.", "A car.\n\nIt has wheels."),
    ])
    _write_gz(folder / "helpful-online.jsonl.gz", [_pair("Say hi", "Hi!", "")])  # empty reply: dropped
    _write_gz(folder / "helpful-rejection-sampled.jsonl.gz", [_pair("Translate 'chat'", "cat", "dog")])
    return folder


def test_load_hh_folder_of_four_files(hh_folder):
    rows = load_hh(hh_folder)
    assert rows == [
        {"instruction": "How do I pick a lock?", "chosen": "I can't help with that.",
         "rejected": "First, get a tension wrench.", "source": "harmless-base.jsonl.gz", "line": 1},
        {"instruction": "What is 2+2?", "chosen": "4.", "rejected": "5.", "source": "helpful-base.jsonl.gz",
         "line": 1},
        {"instruction": "Name a fruit.", "chosen": "Apple.", "rejected": "A car.\n\nIt has wheels.",
         "source": "helpful-base.jsonl.gz", "line": 2},
        {"instruction": "Translate 'chat'", "chosen": "cat", "rejected": "dog",
         "source": "helpful-rejection-sampled.jsonl.gz", "line": 1},
    ]
    assert rows.rows_read == 6
    assert [line for _, line in rows.skipped["multi-turn"]] == [2]
    assert rows.skipped["multi-turn"][0][0].endswith("harmless-base.jsonl.gz")
    assert rows.skipped["empty assistant reply"][0][0].endswith("helpful-online.jsonl.gz")


def test_load_hh_single_file_and_hub_layout(hh_folder, tmp_path):
    one = load_hh(hh_folder / "helpful-base.jsonl.gz")
    assert [r["instruction"] for r in one] == ["What is 2+2?", "Name a fruit."]
    hub = tmp_path / "hub"
    (hub / "helpful-base").mkdir(parents=True)
    _write_gz(hub / "helpful-base" / "train.jsonl.gz", [_pair("q", "a", "b")])
    _write_gz(hub / "helpful-base" / "test.jsonl.gz", [_pair("tq", "ta", "tb")])
    assert [(r["instruction"], r["source"]) for r in load_hh(hub)] == [("q", "helpful-base/train.jsonl.gz")]
    assert [r["chosen"] for r in load_hh(hub, split="test")] == ["ta"]


@pytest.mark.parametrize(
    "row, raw, match",
    [
        (None, '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y"', r"bad\.jsonl\.gz line 2: invalid JSON"),
        ({"chosen": "\n\nHuman: x\n\nAssistant: y"}, None, r"line 2: field 'rejected': missing"),
        ({"chosen": "hello", "rejected": "\n\nHuman: x\n\nAssistant: y"}, None,
         r"line 2: field 'chosen': .*Human"),
        (_pair("x", "a", "b") | {"rejected": "\n\nHuman: other\n\nAssistant: b"}, None,
         r"line 2: field 'rejected': its human message differs"),
    ],
)
def test_load_hh_bad_rows_name_file_line_field(tmp_path, row, raw, match):
    path = _write_gz(tmp_path / "bad.jsonl.gz", [_pair("ok", "a", "b")] + ([row] if row else []),
                     [raw] if raw else [])
    with pytest.raises(DataError, match=match):
        load_hh(path)


def test_load_hh_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_hh(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl.gz"):
        load_hh(tmp_path / "empty")
