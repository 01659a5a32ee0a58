"""alignkit.data.check: drop reasons, malformed rows, length statistics, report outputs, the CLI."""
from __future__ import annotations

import json
import math

import pytest

from alignkit.data.check import check_preference, check_sft, parse_columns, render
from alignkit.data.preference import PreferencePair, load_preference_rows
from alignkit.data.sft_rows import load_sft_rows
from alignkit.resources import ROOT as RESOURCES
from alignkit.resources import prompt as bundled_prompt

EXAMPLES = RESOURCES / "examples"
BROKEN = EXAMPLES / "preference_broken.csv"
GPT2 = str(RESOURCES / "tokenizers" / "gpt2")


class WordTokenizer:
    """Whitespace stand-in: one token per word, no EOS, no chat template."""

    eos_token = None
    chat_template = None

    def __call__(self, text):
        return {"input_ids": text.split()}


def _percentile(values, q):
    """Linear-interpolation percentile, written out (float64)."""
    v = sorted(float(x) for x in values)
    pos = q / 100 * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] if lo + 1 >= len(v) else v[lo] + (pos - lo) * (v[lo + 1] - v[lo])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_drop_reasons_on_the_broken_example():
    pairs = load_preference_rows(BROKEN, errors="collect", allow_empty=True)
    report = check_preference(pairs)
    src = str(BROKEN)
    assert report.rows_read == 7
    assert [p.line for p in report.kept] == [2, 3, 10]
    assert report.dropped == {"chosen == rejected": [(src, 6)], "empty text": [(src, 7)], "duplicate": [(src, 8)]}
    assert [(b.line, b.field) for b in report.malformed] == [(9, None)]
    assert report.rows_read == report.rows_kept + report.rows_dropped + len(report.malformed)
    assert report.unit == "chars"


def test_hh_multi_turn_skip_is_a_drop_reason():
    report = check_preference(load_preference_rows(EXAMPLES / "hh_sample.jsonl"))
    assert report.rows_kept == 3 and report.dropped == {"multi-turn (hh)": [(str(EXAMPLES / "hh_sample.jsonl"), 3)]}


def _word_pairs():
    # prompt / chosen / rejected word counts: (3, 2, 1), (1, 4, 2), (5, 1, 3), (2, 2, 6)
    texts = [("a b c", " d e", " f"), ("a", " b c d e", " f g"), ("a b c d e", " f", " g h i"),
             ("a b", " c d", " e f g h i j")]
    return [PreferencePair(p, c, r, "mem", i) for i, (p, c, r) in enumerate(texts)]


def test_length_stats_match_hand_computation():
    report = check_preference(_word_pairs(), tokenizer=WordTokenizer())
    expected = {"prompt": [3, 1, 5, 2], "chosen": [2, 4, 1, 2], "rejected": [1, 2, 3, 6],
                "chosen_total": [5, 5, 6, 4], "rejected_total": [4, 3, 8, 8]}
    assert report.lengths == expected
    for name, values in expected.items():
        s = report.stats[name]
        assert (s["n"], s["min"], s["max"]) == (4, min(values), max(values))
        assert s["mean"] == pytest.approx(sum(values) / 4)
        assert s["p50"] == pytest.approx(_percentile(values, 50))
        assert s["p95"] == pytest.approx(_percentile(values, 95))
    assert report.stats["rejected"]["p95"] == pytest.approx(3 + 0.85 * 3)  # sorted 1,2,3,6: pos 2.85


def test_max_length_drops_or_counts():
    report = check_preference(_word_pairs(), tokenizer=WordTokenizer(), max_length=6)
    assert report.over_max_length == 2 and report.dropped == {"over max length": [("mem", 2), ("mem", 3)]}
    assert [p.line for p in report.kept] == [0, 1]
    assert report.lengths["prompt"] == [3, 1, 5, 2]  # stats include the over-long rows
    kept = check_preference(_word_pairs(), tokenizer=WordTokenizer(), max_length=6, drop_over_length=False)
    assert kept.over_max_length == 2 and kept.rows_kept == 4 and not kept.dropped
    assert "Over max_length 6: 2 rows (kept, would be truncated)" in kept.to_markdown()


def test_max_length_needs_a_tokenizer():
    with pytest.raises(ValueError, match="max_length needs a tokenizer"):
        check_preference(_word_pairs(), max_length=10)


def test_gpt2_lengths_with_bundled_alpaca_template(gpt2_tokenizer):
    pair = PreferencePair("Name a colour.", "Red.", "Blue is a colour.", "mem", 1)
    report = check_preference([pair], tokenizer=gpt2_tokenizer, template="alpaca_sft")
    head = bundled_prompt("alpaca_sft").split("{response}")[0].replace("{instruction}", pair.prompt)
    p_ids = gpt2_tokenizer(head)["input_ids"]
    c_ids = gpt2_tokenizer(head + "Red.<|endoftext|>")["input_ids"]
    assert c_ids[:len(p_ids)] == p_ids  # the prompt ends on a token boundary
    assert report.lengths["prompt"] == [len(p_ids)]
    assert report.lengths["chosen"] == [len(c_ids) - len(p_ids)]
    assert report.lengths["chosen_total"] == [len(c_ids)]


def test_render_template():
    assert render("Q: {question}\nA: {response}!", "x{response}", "y") == "Q: x{response}\nA: y"
    assert render("Q: {question}\nA: {response}!", "x") == "Q: x\nA: "
    assert render(None, "p", "c") == "pc"
    with pytest.raises(ValueError, match="placeholder"):
        render("no slot", "p")


def test_conversational_lengths_use_the_chat_template(gpt2_tokenizer):
    import copy

    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    pair = PreferencePair([{"role": "user", "content": "Hi there"}], [{"role": "assistant", "content": "Hello"}],
                          [{"role": "assistant", "content": "Go away now"}], "mem", 1)
    report = check_preference([pair], tokenizer=tok)
    n = lambda text: len(gpt2_tokenizer(text)["input_ids"])
    assert report.lengths["prompt"] == [n("<|user|>Hi there\n<|assistant|>")]
    assert report.lengths["chosen_total"] == [n("<|user|>Hi there\n<|assistant|>Hello\n")]
    assert report.lengths["rejected_total"] == [n("<|user|>Hi there\n<|assistant|>Go away now\n")]
    with pytest.raises(ValueError, match="chat template"):
        check_preference([pair], tokenizer=gpt2_tokenizer)


def test_check_sft_reasons_and_lengths(tmp_path):
    rows = [{"prompt": "a b", "response": " c"}, {"prompt": "a b", "response": " c"},
            {"instruction": "x", "input": "y z", "output": " w v"}, {"question": "q", "answer": ""},
            {"prompt": "only"}]
    loaded = load_sft_rows(_jsonl(tmp_path / "s.jsonl", rows), errors="collect", allow_empty=True)
    assert loaded[2] == {"prompt": "x\n\ny z", "completion": " w v"}
    report = check_sft(loaded, tokenizer=WordTokenizer())
    src = str(tmp_path / "s.jsonl")
    assert report.dropped == {"duplicate": [(src, 2)], "empty text": [(src, 4)]}
    assert [(b.line, b.field) for b in report.malformed] == [(5, "prompt")]
    assert report.lengths == {"prompt": [2, 3], "completion": [1, 2], "total": [3, 5]}
    assert report.rows_read == 5 == report.rows_kept + report.rows_dropped + len(report.malformed)


def test_check_sft_messages_in_chars():
    rows = load_sft_rows(EXAMPLES / "sft_chat.jsonl")
    report = check_sft(rows)
    expected = [sum(len(m["content"]) for m in r["messages"]) for r in rows]
    assert report.lengths["total"] == expected and report.rows_kept == 3


def test_report_outputs(tmp_path):
    report = check_preference(load_preference_rows(BROKEN, errors="collect", allow_empty=True),
                              tokenizer=WordTokenizer())
    md = report.to_markdown()
    assert "| read | 7 |" in md and "| kept | 3 |" in md and "| dropped: duplicate | 1 |" in md
    assert f"| {BROKEN} | 9 | - | expected 3 fields (prompt, chosen, rejected), got 2 |" in md
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rows_kept"] == 3 and data["dropped"]["empty text"] == [{"source": str(BROKEN), "line": 7}]
    assert data["lengths"]["prompt"]["n"] == 3 and data["unit"] == "tokens"
    png = report.histogram_png(tmp_path / "h" / "lengths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raise_if_empty():
    pair = PreferencePair("p", "same", "same", "f.csv", 4)
    report = check_preference([pair])
    with pytest.raises(ValueError, match=r"no rows kept of 1 read \(1 chosen == rejected; 0 malformed\)"):
        report.raise_if_empty()
    assert check_preference(_word_pairs()).raise_if_empty().rows_kept == 4


def test_parse_columns():
    assert parse_columns("prompt=question, chosen=good") == {"prompt": "question", "chosen": "good"}
    with pytest.raises(ValueError, match="--columns"):
        parse_columns("prompt")










def test_chat_template_option_measures_plain_text_as_messages(gpt2_tokenizer):
    import copy

    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}[assistant] {% endif %}"
    plain = PreferencePair("Hi there", "Hello", "Go away now", "mem", 1)
    conv = PreferencePair([{"role": "user", "content": "Hi there"}], [{"role": "assistant", "content": "Hello"}],
                          [{"role": "assistant", "content": "Go away now"}], "mem", 1)
    chat = check_preference([plain], tokenizer=tok, template="chat")
    assert chat.lengths == check_preference([conv], tokenizer=tok).lengths
    assert chat.lengths["chosen_total"] == [len(gpt2_tokenizer("[user] Hi there\n[assistant] Hello\n")["input_ids"])]


def test_sft_rows_mapping_and_errors(tmp_path):
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"conversation": conv}, {"conversation": conv[:1]}, {"conversation": "text"}]
    loaded = load_sft_rows(_jsonl(tmp_path / "c.jsonl", rows), columns={"messages": "conversation"},
                           errors="collect")
    assert list(loaded) == [{"messages": conv}] and loaded.format == "messages"
    assert [(b.line, b.field, b.message) for b in loaded.malformed] == [
        (2, "messages", "no assistant turn to train on"),
        (3, "messages", "expected a non-empty list of messages, got str")]
    pc = load_sft_rows(_jsonl(tmp_path / "p.jsonl", [{"prompt": conv[:1], "completion": conv[1:]}]))
    assert pc == [{"prompt": conv[:1], "completion": conv[1:]}]
    with pytest.raises(ValueError, match=r"x.jsonl line 1: field 'prompt': missing: no messages column"):
        load_sft_rows(_jsonl(tmp_path / "x.jsonl", [{"text": "t"}]))
    with pytest.raises(ValueError, match=r"y.jsonl line 1: field 'completion': expected a string, got int"):
        load_sft_rows(_jsonl(tmp_path / "y.jsonl", [{"prompt": "p", "completion": 3}]))
