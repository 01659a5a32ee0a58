"""PackedSFTDataset / iterate_batches: exact token streams with a character tokenizer and GPT-2."""
from __future__ import annotations

import gzip
import itertools
import json
import math

import pytest
import torch

from alignkit.data import PackedSFTDataset, iterate_batches
from alignkit.data.io import DataError
from alignkit.resources import data_path, prompt

TEMPLATE = prompt("alpaca_sft")
BOS, EOS = 2, 3


class CharTokenizer:
    """Token id = code point; optional BOS. Counts calls (cache tests)."""

    eos_token_id = EOS
    bos_token_id = BOS
    def __init__(self, add_bos: bool = True):
        self.special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>"}
        self.add_bos_token = add_bos
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return {"input_ids": [([BOS] if self.add_bos_token else []) + [ord(c) for c in t] for t in texts]}

    def __len__(self):
        return 0x110000

    def get_vocab(self):
        return {"<s>": BOS, "</s>": EOS}


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "response": "yes" * (i % 3 + 1)} for i in range(n)]


def _write(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _doc_ids(row, bos=True) -> list[int]:
    # the document ends with the response: what follows {response} in the prompt file (a newline) is cut
    head = TEMPLATE[: TEMPLATE.index("{response}")]
    text = head.replace("{instruction}", row["prompt"]) + row["response"]
    return ([BOS] if bos else []) + [ord(c) for c in text] + [EOS]


def _items(ds) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


def test_exact_stream_items_and_boundaries(tmp_path):
    rows = _rows(3)
    ds = PackedSFTDataset(CharTokenizer(), _write(tmp_path / "d.jsonl", rows), 64, False, cache_dir=tmp_path)
    stream = [t for r in rows for t in _doc_ids(r)]
    m = 64
    assert len(ds) == (len(stream) - 1) // m
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (m,)
        assert item["input_ids"].tolist() == stream[i * m : (i + 1) * m]
        assert item["labels"].tolist() == stream[i * m + 1 : (i + 1) * m + 1]
    # the incomplete tail is not an item
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1]["input_ids"].tolist() == ds[len(ds) - 1]["input_ids"].tolist()
    starts = [0, len(_doc_ids(rows[0])), len(_doc_ids(rows[0])) + len(_doc_ids(rows[1]))]
    assert ds.document_boundaries.tolist() == starts


def test_cs336_length_example(tmp_path):
    """11 tokens, m = 4 -> 2 items ([0..3], [4..7]) (supplement section 3.2.1)."""

    class Fixed(CharTokenizer):
        def __call__(self, texts):
            return {"input_ids": [list(range(10)) for _ in texts]}  # + EOS -> 11 tokens

    ds = PackedSFTDataset(Fixed(), _write(tmp_path / "d.jsonl", _rows(1)), 4, False, cache_dir=False)
    assert len(ds) == 2
    assert ds[1]["input_ids"].tolist() == [4, 5, 6, 7] and ds[1]["labels"].tolist() == [5, 6, 7, 8]


def test_gpt2_stream_on_bundled_sample(tmp_path, gpt2_tokenizer):
    path = data_path("sft_sample.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    stream = []
    for r in rows:
        text = TEMPLATE[: TEMPLATE.index("{response}")].replace("{instruction}", r["prompt"]) + r["response"]
        stream += gpt2_tokenizer.encode(text) + [gpt2_tokenizer.eos_token_id]
    ds = PackedSFTDataset(gpt2_tokenizer, path, 128, False, cache_dir=tmp_path)
    assert len(ds) == (len(stream) - 1) // 128
    assert ds[len(ds) - 1]["labels"].tolist() == stream[(len(ds) - 1) * 128 + 1 : len(ds) * 128 + 1]
    assert torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist() == stream[: len(ds) * 128]


def test_gzip_equals_plain(tmp_path):
    rows = _rows(7)
    plain = PackedSFTDataset(CharTokenizer(), _write(tmp_path / "a.jsonl", rows), 32, False, cache_dir=False)
    gz = PackedSFTDataset(CharTokenizer(), _write(tmp_path / "a.jsonl.gz", rows, gz=True), 32, False,
                          cache_dir=False)
    assert _items(gz) == _items(plain) and len(gz) > 0


def _documents(ds) -> list[list[int]]:
    ids, starts = ds.ids.tolist(), list(ds.document_boundaries) + [len(ds.ids)]
    return [ids[a:b] for a, b in itertools.pairwise(starts)]


def test_shuffle_permutes_documents_deterministically(tmp_path):
    rows = _rows(20)
    path = _write(tmp_path / "d.jsonl", rows)
    tok = CharTokenizer(add_bos=False)
    ordered = PackedSFTDataset(tok, path, 16, False, cache_dir=tmp_path)
    a = PackedSFTDataset(tok, path, 16, True, seed=1, cache_dir=tmp_path)
    b = PackedSFTDataset(tok, path, 16, True, seed=1, cache_dir=tmp_path)
    c = PackedSFTDataset(tok, path, 16, True, seed=2, cache_dir=tmp_path)
    file_docs = [_doc_ids(r, bos=False) for r in rows]
    assert _documents(ordered) == file_docs
    assert sorted(_documents(a)) == sorted(file_docs)  # same multiset of documents
    assert _documents(a) != file_docs  # a different order
    assert _documents(a) == _documents(b) and _items(a) == _items(b)
    assert _documents(c) != _documents(a)
    assert len(a) == len(ordered)  # same token count
    assert tok.calls == 1  # shuffling reorders cached documents, never re-tokenizes


def test_cache_hit_does_not_call_tokenizer(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl", _rows(5))
    first_tok = CharTokenizer()
    first = PackedSFTDataset(first_tok, path, 16, False, cache_dir=tmp_path / "cache")
    assert first_tok.calls == 1 and not first.cache_hit

    def refuse(self, texts):
        raise AssertionError("tokenizer called on a cache hit")

    with monkeypatch.context() as patch:
        patch.setattr(CharTokenizer, "__call__", refuse)
        second = PackedSFTDataset(CharTokenizer(), path, 16, False, cache_dir=tmp_path / "cache")
    assert second.cache_hit and _items(second) == _items(first)
    # a different tokenizer (no BOS) or different file content misses the cache
    other_tok = CharTokenizer(add_bos=False)
    PackedSFTDataset(other_tok, path, 16, False, cache_dir=tmp_path / "cache")
    assert other_tok.calls == 1
    _write(path, _rows(6))
    third_tok = CharTokenizer()
    PackedSFTDataset(third_tok, path, 16, False, cache_dir=tmp_path / "cache")
    assert third_tok.calls == 1


def test_position_ids_restart_per_document(tmp_path):
    rows = _rows(4)
    ds = PackedSFTDataset(CharTokenizer(), _write(tmp_path / "d.jsonl", rows), 40, False, cache_dir=False,
                          return_position_ids=True)
    stream = [t for r in rows for t in _doc_ids(r)]
    expected, pos = [], 0
    for tok in stream:  # position restarts after each EOS
        expected.append(pos)
        pos = 0 if tok == EOS else pos + 1
    for i in range(len(ds)):
        assert ds[i]["position_ids"].tolist() == expected[i * 40 : (i + 1) * 40]
    assert any(0 in ds[i]["position_ids"].tolist()[1:] for i in range(len(ds)))  # a boundary inside an item


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", '], r"d\.jsonl line 2: invalid JSON"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": "c", "response": "d"}', '{"prompt": "e"}'],
         r"d\.jsonl line 3: field 'response': missing .*2 rows were read"),
        (['{"prompt": " ", "response": "b"}'], r"line 1: field 'prompt': empty text"),
        (['{"prompt": "a", "response": 5}'], r"line 1: field 'response': expected a string, got int"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, lines, match):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        PackedSFTDataset(CharTokenizer(), path, 8, False, cache_dir=False)


def test_iterate_batches_one_epoch(tmp_path):
    ds = PackedSFTDataset(CharTokenizer(), _write(tmp_path / "d.jsonl", _rows(6)), 8, False, cache_dir=False)
    n = len(ds)
    batches = iterate_batches(ds, 5, shuffle=False)
    assert len(batches) == math.ceil(n / 5)
    got = list(batches)
    assert [b["input_ids"].shape for b in got] == [(5, 8)] * (n // 5) + ([(n % 5, 8)] if n % 5 else [])
    assert torch.cat([b["input_ids"] for b in got]).tolist() == [it[0] for it in _items(ds)]
    shuffled = list(iterate_batches(ds, 5, shuffle=True, seed=0))
    rows = torch.cat([b["labels"] for b in shuffled]).tolist()
    assert sorted(rows) == sorted(it[1] for it in _items(ds)) and rows != [it[1] for it in _items(ds)]
    again = list(iterate_batches(ds, 5, shuffle=True, seed=0))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(shuffled, again))


@pytest.mark.real_model
def test_real_smollm2_tokenizer_stream(tmp_path):
    from alignkit.models import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    path = data_path("sft_sample.jsonl")
    stream = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        text = TEMPLATE[: TEMPLATE.index("{response}")].replace("{instruction}", r["prompt"]) + r["response"]
        stream += tok(text)["input_ids"] + [tok.eos_token_id]  # the response, then EOS (nothing in between)
    ds = PackedSFTDataset(tok, path, 256, False, cache_dir=tmp_path)
    assert torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist() == stream[: len(ds) * 256]
    assert PackedSFTDataset(tok, path, 256, False, cache_dir=tmp_path).cache_hit


def test_document_boundary_matches_the_reference_fixture(tmp_path, gpt2_tokenizer):
    """CS336's tokenized_sft_sample fixture ends each document with the response's last token followed
    directly by EOS (then the next document): no newline token from the prompt file in between."""
    rows = [{"prompt": "Say hi.", "response": "Hi."}, {"prompt": "Say bye.", "response": "Bye."}]
    ds = PackedSFTDataset(gpt2_tokenizer, _write(tmp_path / "d.jsonl", rows), 8, False, cache_dir=False)
    ids = ds.ids.tolist()
    eos = gpt2_tokenizer.eos_token_id
    first_end = ids.index(eos)
    assert gpt2_tokenizer.decode(ids[first_end - 1]) == "."  # "Hi." ends with '.', then EOS
    assert gpt2_tokenizer.decode(ids[:first_end]).endswith("### Response:\nHi.")
    newline = gpt2_tokenizer.encode("\n")
    assert ids[first_end - len(newline): first_end] != newline
    assert gpt2_tokenizer.decode(ids[first_end + 1:]).startswith("Below is an instruction")
