"""alignkit.data.contamination: training rows against the bundled eval sets and --against files, exact and near.

Expected counts, rows and locations are derived from how each training file is built (which GSM8K question went
where, changed how), reading the bundled files directly with json/csv rather than through the module."""
from __future__ import annotations

import csv
import json

import pytest

from alignkit.data.contamination import (
    NGRAM,
    THRESHOLD,
    ContaminationReport,
    builtin_eval_sets,
    check_contamination,
    eval_index,
    eval_set_from_file,
    normalize,
    row_texts,
)
from alignkit.data.io import DataError
from alignkit.data.preference import PreferencePair
from alignkit.data.sft_rows import load_sft_rows
from alignkit.data.unpaired import UnpairedExample
from alignkit.resources import data_path

GSM8K = [json.loads(line)["question"] for line in data_path("gsm8k", "test.jsonl").read_text().splitlines()]
UNRELATED = [
    "Write a short poem about the colour of autumn leaves drifting across a quiet mountain lake at dawn.",
    "Explain to a ten year old child how a refrigerator keeps food cold using a compressor and a gas.",
    "Translate the following sentence into French and explain any idioms: the early bird catches the worm.",
    "List five practical tips for keeping a sourdough starter alive while travelling for two weeks.",
]
SETS = ("gsm8k_test", "mmlu_test", "alpaca_eval", "simple_safety_tests")


def _gsm8k_id(index: int) -> str:
    return f"gsm8k/test.jsonl line {index + 1}"  # one question per line, no blank lines in the bundled file


def _one_word_changed(text: str) -> str:
    """The middle word replaced: at most NGRAM shingles lost, the rest of the question intact."""
    words = text.split()
    middle = len(words) // 2
    words[middle] = "quokka" if words[middle].lower().strip(".,") != "quokka" else "zebra"
    return " ".join(words)


def _reworded(text: str) -> str:
    """Every second word replaced: no word NGRAM-gram (NGRAM >= 2) of the original survives."""
    return " ".join("quokka" if i % 2 else w for i, w in enumerate(text.split()))


def _write(path, rows: list[dict]) -> list[int]:
    """JSONL with a blank line after every third row; returns each row's 1-based file line."""
    lines, text, line = [], "", 0
    for i, row in enumerate(rows):
        line += 1
        lines.append(line)
        text += json.dumps(row) + "\n"
        if i % 3 == 2:
            text += "\n"
            line += 1
    path.write_text(text)
    return lines


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A training file of GSM8K questions: verbatim, re-cased/re-punctuated, one word changed, reworded, in the
    completion, in a messages transcript, plus unrelated rows and internal near-repeats. Returns what was planted."""
    rows, plan = [], {"exact": {}, "near": {}, "none": [], "repeats": {}}

    def add(row, kind=None, question=None):
        rows.append(row)
        if kind in ("exact", "near"):
            plan[kind][len(rows) - 1] = question
        elif kind == "none":
            plan["none"].append(len(rows) - 1)
        return len(rows) - 1

    for q in (0, 1, 2):
        add({"prompt": GSM8K[q], "completion": f"The answer is {q}."}, "exact", q)
    add({"prompt": "  " + GSM8K[3].upper().replace(".", " !! ").replace(" ", "   ") + "\n", "completion": "ok"},
        "exact", 3)
    for q in (10, 11, 12, 13):
        add({"prompt": _one_word_changed(GSM8K[q]), "completion": f"Result {q}"}, "near", q)
    for q in (20, 21):
        add({"prompt": _reworded(GSM8K[q]), "completion": f"Reply {q}"}, "none")
    add({"prompt": "Solve this.", "completion": GSM8K[30]}, "exact", 30)
    add({"messages": [{"role": "user", "content": GSM8K[31]}, {"role": "assistant", "content": "Let me see."}]},
        "exact", 31)
    unrelated = [add({"prompt": text, "completion": "Sure, here it is."}, "none") for text in UNRELATED]
    # near-repeats inside the training set: one word changed; re-cased with punctuation changed (same normalised text)
    plan["repeats"][add({"prompt": _one_word_changed(UNRELATED[0]), "completion": "Sure, here it is."}, "none")] = \
        unrelated[0]
    plan["repeats"][add({"prompt": UNRELATED[1].lower().replace(",", ""), "completion": "Sure, here it is!"},
                        "none")] = unrelated[1]
    path = tmp_path_factory.mktemp("contam") / "train.jsonl"
    plan["lines"] = _write(path, rows)
    plan["path"] = path
    return plan


@pytest.fixture(scope="module")
def report(planted) -> ContaminationReport:
    rows = load_sft_rows(planted["path"])
    return check_contamination(rows, locations=rows.locations)


def test_normalisation_rule():
    assert normalize("  Janet’s DUCKS,\tlay 16 eggs!!\n") == "janets ducks lay 16 eggs"
    assert normalize("Janet's ducks lay 16-eggs") == "janets ducks lay 16eggs"
    assert normalize("ＡＢＣ  x_y") == "abc xy"  # NFKC folds full-width letters; "_" is deleted like punctuation
    assert normalize("...") == ""


def test_planted_counts_per_eval_set(report, planted):
    counts = report.counts()
    assert counts["gsm8k_test"] == {"exact": len(planted["exact"]), "near": len(planted["near"])}
    for name in SETS[1:]:
        assert counts[name] == {"exact": 0, "near": 0}, name
    assert [s.name for s in report.eval_sets] == list(SETS)


def test_planted_locations_and_items(report, planted):
    path = str(planted["path"])
    for kind in ("exact", "near"):
        found = {m.row: m for m in report.matches_of("gsm8k_test", kind)}
        assert sorted(found) == sorted(planted[kind])
        for row, question in planted[kind].items():
            m = found[row]
            assert (m.source, m.line) == (path, planted["lines"][row])
            assert m.eval_id == _gsm8k_id(question) and m.eval_text == GSM8K[question]
            assert (m.similarity == 1.0) == (kind == "exact")
            if kind == "near":
                assert THRESHOLD <= m.similarity < 1.0
    fields = {m.row: m.field for m in report.matches}
    assert fields[min(planted["exact"])] == "prompt"
    assert {fields[r] for r, q in planted["exact"].items() if q == 30} == {"completion"}
    assert {fields[r] for r, q in planted["exact"].items() if q == 31} == {"messages (user)"}
    assert not set(planted["none"]) & report.contaminated


def test_one_word_changed_is_caught_in_every_gsm8k_question():
    """Every GSM8K test question (15 to 164 words) with its middle word changed is a near-duplicate of that very
    question; unrelated questions and the reworded forms match nothing."""
    rows = [{"prompt": _one_word_changed(q)} for q in GSM8K]
    rows += [{"prompt": text} for text in UNRELATED] + [{"prompt": _reworded(q)} for q in GSM8K[:50]]
    got = check_contamination(rows, eval_sets=builtin_eval_sets()[:1], internal=False)
    assert [(m.row, m.eval_id, m.kind) for m in got.matches] == [(i, _gsm8k_id(i), "near") for i in range(len(GSM8K))]
    assert min(m.similarity for m in got.matches) >= THRESHOLD


def test_other_bundled_sets_are_read_with_their_layouts():
    """An MMLU test question (header-less CSV, column 1), an AlpacaEval instruction and a SimpleSafetyTests prompt
    (CSV with a header: its first data row is line 2)."""
    with open(data_path("mmlu", "test", "abstract_algebra_test.csv"), newline="", encoding="utf-8") as fh:
        mmlu = next(csv.reader(fh))[0]
    alpaca = json.loads(data_path("alpaca_eval", "alpaca_eval.jsonl").read_text().splitlines()[6])["instruction"]
    with open(data_path("simple_safety_tests", "simple_safety_tests.csv"), newline="", encoding="utf-8") as fh:
        sst = next(csv.DictReader(fh))["prompts_final"]
    rows = [{"prompt": mmlu, "completion": "B"}, {"instruction": alpaca, "output": "..."},
            {"prompt": sst, "completion": "I can't help with that."}]
    got = check_contamination(rows, internal=False)
    assert [(m.row, m.eval_set, m.eval_id, m.kind) for m in got.matches] == [
        (0, "mmlu_test", "mmlu/test/abstract_algebra_test.csv line 1", "exact"),
        (1, "alpaca_eval", "alpaca_eval/alpaca_eval.jsonl line 7", "exact"),
        (2, "simple_safety_tests", "simple_safety_tests/simple_safety_tests.csv line 2", "exact"),
    ]


def test_internal_near_duplicates(report, planted):
    path = str(planted["path"])
    pairs = {p.second: p for p in report.internal}
    assert sorted(pairs) == sorted(planted["repeats"])
    for second, first in planted["repeats"].items():
        p = pairs[second]
        assert p.first == first and THRESHOLD <= p.similarity <= 1.0
        assert (p.first_at, p.second_at) == ((path, planted["lines"][first]), (path, planted["lines"][second]))
    assert report.duplicates == set(planted["repeats"])


def test_drop_set_is_what_the_counts_say(report, planted):
    contaminated = set(planted["exact"]) | set(planted["near"])
    assert report.contaminated == contaminated
    assert len(contaminated) == sum(c["exact"] + c["near"] for c in report.counts().values())
    assert report.drop_indices() == contaminated | set(planted["repeats"])
    assert report.drop_indices(internal=False) == contaminated
    assert report.drop_indices(eval_sets=False) == set(planted["repeats"])
    path = str(planted["path"])
    assert report.drop_locations() == {(path, planted["lines"][i]) for i in report.drop_indices()}
    rows = load_sft_rows(planted["path"])
    kept = report.filter(rows)
    assert len(kept) == len(rows) - len(report.drop_indices())
    assert kept == [r for i, r in enumerate(rows) if i not in contaminated | set(planted["repeats"])]
    with pytest.raises(ValueError, match="rows given"):
        report.filter(rows[:-1])


def test_against_file_and_field(tmp_path):
    items = [UNRELATED[0], UNRELATED[1], "How many legs do three spiders and two ants have in total, counted together?"]
    against = tmp_path / "my_eval.jsonl"
    against.write_text("".join(json.dumps({"question": q, "id": i}) + "\n" for i, q in enumerate(items)))
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + f'"{items[2]}",x\n')
    rows = [{"prompt": UNRELATED[3]}, {"prompt": items[1]}, {"prompt": _one_word_changed(items[2])}]
    got = check_contamination(rows, eval_sets=[], against=[against], internal=False)
    assert [s.name for s in got.eval_sets] == ["my_eval.jsonl"]
    assert [(m.row, m.kind, m.eval_id) for m in got.matches] == [(1, "exact", f"{against} line 2"),
                                                                 (2, "near", f"{against} line 3")]
    got = check_contamination(rows, eval_sets=[], against=[other], against_field="text", internal=False)
    assert [(m.row, m.kind, m.eval_id) for m in got.matches] == [(2, "near", f"{other} line 2")]
    with pytest.raises(DataError, match=r"other\.csv line 2: eval file has no field prompt or question or instr"):
        eval_set_from_file(other)


def test_preference_pairs_and_their_locations():
    pairs = [PreferencePair(UNRELATED[0], "yes", "no", "p.jsonl", 4),
             PreferencePair("Question?", GSM8K[5], "I don't know.", "p.jsonl", 9)]
    assert [f for f, _ in row_texts(pairs[1])] == ["prompt", "chosen", "rejected"]
    got = check_contamination(pairs, eval_sets=builtin_eval_sets()[:1])
    assert [(m.source, m.line, m.field, m.eval_id) for m in got.matches] == [("p.jsonl", 9, "chosen", _gsm8k_id(5))]


def test_report_outputs(report, planted):
    lines = report.lines()
    assert len(lines) == len(SETS) + 1
    first = min(planted["exact"])
    assert lines[0].startswith(f"gsm8k_test (1319 items): {len(planted['exact'])} exact, {len(planted['near'])} near: "
                               f"{planted['path']} line {planted['lines'][first]} exact {_gsm8k_id(first)}")
    assert lines[-1].startswith(f"training set: {len(planted['repeats'])} rows nearly repeat an earlier row")
    md = report.to_markdown()
    for name in SETS:
        assert f"| {name} |" in md
    assert f"word {NGRAM}-gram Jaccard >= {THRESHOLD}" in md
    d = json.loads(json.dumps(report.to_dict()))
    assert d["counts"] == report.counts() and d["drop"] == sorted(report.drop_indices())
    assert len(d["matches"]) == len(report.matches)


def test_eval_index_is_built_once_per_process():
    sets = builtin_eval_sets()
    assert eval_index(sets) is eval_index(list(sets)) and eval_index(sets[0]) is eval_index([sets[0]])
    index = eval_index(sets)
    mmlu_items = len(sets[1].texts)
    assert index.too_short[1] > 0 and index.compared[1] + index.too_short[1] == mmlu_items
    assert len(index.owner) == sum(index.compared)


def test_unpaired_examples_compare_prompt_and_completion():
    row = UnpairedExample("What is 2+2?", "It is four.", True, "f.jsonl", 3)
    assert row_texts(row) == [("prompt", "What is 2+2?"), ("completion", "It is four.")]
