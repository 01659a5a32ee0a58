"""MMLU / GSM8K parsers: hand cases and invariants over the bundled data."""
from __future__ import annotations

import csv
import json

import pytest

from alignkit.eval.parsers import gsm8k_answer, parse_gsm8k_response, parse_mmlu_response
from alignkit.eval.tasks import MMLU
from alignkit.resources import data_path

EXAMPLE = {
    "subject": "geography",
    "question": "What is the capital of Germany?",
    "options": ["Paris", "London", "Berlin", "Madrid"],
    "answer": "C",
}


@pytest.mark.parametrize(
    "output, expected",
    [
        ("The correct answer is B. London is the capital of the UK.", "B"),
        ("The correct answer is C", "C"),
        ("the correct answer is: **D**", "D"),
        ("Answer: (A)", "A"),
        ("I believe the answer is option B.", "B"),
        ("B", "B"),
        ("C.", "C"),
        ("(D)", "D"),
        ("B) London", "B"),
        ("A: Paris\nbecause ...", "A"),
        ("Looking at the options, (C) Berlin fits.", "C"),
        ("Berlin.", "C"),  # option text echoed
        ("The correct answer is berlin", "C"),
        # not parseable
        ("The correct answer is 10000 polymerases.", None),
        ("A virus is not an answer.", None),
        ("The answer is a capital city.", None),
        ("Either (A) or (C).", None),
        ("Berlin or Paris", None),
        ("", None),
        ("I don't know.", None),
    ],
)
def test_parse_mmlu_response(output, expected):
    assert parse_mmlu_response(EXAMPLE, output) == expected


def test_parse_mmlu_statement_over_bundled_dev_set():
    """"The correct answer is X." and "(X) <option text>" recover the gold letter for every dev example."""
    n = 0
    for path in sorted(data_path("mmlu", "dev").glob("*_dev.csv")):
        with open(path, encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                example = {"question": row[0], "options": row[1:5], "answer": row[5]}
                letter = row[5]
                option = row[1 + "ABCD".index(letter)]
                assert parse_mmlu_response(example, f"The correct answer is {letter}.") == letter
                assert parse_mmlu_response(example, f"({letter}) {option}") == letter
                n += 1
    assert n > 200


FULL_LIST = "A. Paris\nB. London\nC. Berlin\nD. Madrid"


@pytest.mark.parametrize(
    "output, expected",
    [
        # the option list repeated, in full or in part, in the prompt's layout or another: not an answer
        (FULL_LIST, None),
        (" " + FULL_LIST + "\n", None),
        ("A. Paris\nB. London", None),  # cut short by the token cap
        ("A. Paris\nB. London\nC.", None),
        ("(A) Paris\n(B) London\n(C) Berlin", None),
        ("A) Paris\nB) London\nC) Berlin\nD) Madrid", None),
        ("- **A.** Paris\n- **B.** London", None),
        ("Question: What is the capital of Germany?\n" + FULL_LIST + "\nAnswer:", None),  # the prompt echoed
        ("A. Paris B. London C. Berlin D. Madrid", None),  # on one line
        ("A. Paris\nB. London\nC. Berlin\nD. Madrid\n", None),
        # a list followed by an answer line is that answer
        (FULL_LIST + "\nThe correct answer is C", "C"),
        (FULL_LIST + "\n\nAnswer: (B)", "B"),
        ("A. Paris B. London C. Berlin D. Madrid. The correct answer is D.", "D"),
        ("The correct answer is C.\n" + FULL_LIST, "C"),
        (FULL_LIST + "\nD", "D"),
        # one option line is an answer, as before
        ("B. London", "B"),
        ("C) Berlin\nIt is the capital.", "C"),
    ],
)
def test_parse_mmlu_option_list_is_not_an_answer(output, expected):
    assert parse_mmlu_response(EXAMPLE, output) == expected


def test_echoed_lists_count_as_unparsed_in_the_mmlu_metrics():
    """Seven outputs of the kind a small base model writes (five repeat the option list): the old parser read
    five of them as "A"; now exactly those five are unparsed and the accuracy counts them wrong."""
    task = MMLU()
    ex = dict(EXAMPLE, id="g/1")
    outputs = [FULL_LIST, "A. Paris\nB. London", "A) Paris\nB) London\nC) Berlin", "A. Paris B. London",
               "A: Paris\nB: London\nC: Berlin", "The correct answer is C", "A. Paris"]
    records = [{"id": f"g/{i}", "example": ex, "generation": o, "score": task.score(ex, o)}
               for i, o in enumerate(outputs)]
    m = task.aggregate(records)
    assert [r["score"]["parsed"] for r in records] == [None] * 5 + ["C", "A"]
    assert (m["unparseable"], m["correct"], m["n"]) == (5, 1, 7)
    assert m["accuracy"] == pytest.approx(1 / 7)


@pytest.mark.parametrize(
    "output, expected",
    [
        ("She sold 15 clips.", "15"),
        ("It costs $1,234.", "1234"),
        ("Total: 1,234,567 people", "1234567"),
        ("He has 3.50 dollars", "3.5"),
        ("The answer is 18.00", "18"),
        ("The answer is 18.", "18"),
        ("It drops to -7 degrees", "-7"),
        ("It drops to \u22127 degrees", "-7"),
        ("Pour .5 cups", "0.5"),
        ("The numbers 1,2,3", "3"),
        ("The numbers 1, 2, 3", "3"),
        ("Between 10-3", "3"),
        ("First 4 then 2 + 3 = 5. So 5 apples.", "5"),
        ("The answer is 007", "7"),
        ("-0.0", "0"),
        # a fraction of integers is one answer (the grader decides 1/2 == 0.5)
        ("Half of it: 1/2.", "1/2"),
        ("It drops by -3/4", "-3/4"),
        ("48/2 = 24 clips", "24"),
        ("Born 12/25/2020", "2020"),
        ("0/5 left", "0"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_parse_gsm8k_response(output, expected):
    assert parse_gsm8k_response(output) == expected


def test_gsm8k_answer_by_hand():
    assert gsm8k_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_answer("... #### 1,000") == "1000"
    assert gsm8k_answer("#### -3.50") == "-3.5"
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_answer("The answer is 5")


def test_gsm8k_gold_numbers_of_bundled_data():
    """For every bundled solution the gold is a number equal (as float) to the raw text after ####, and the
    last number of the whole solution text is that gold."""
    n = 0
    for name in ("train.jsonl", "test.jsonl"):
        for line in data_path("gsm8k", name).read_text().splitlines():
            answer = json.loads(line)["answer"]
            gold = gsm8k_answer(answer)
            raw = answer.rsplit("####", 1)[1].strip().replace(",", "")
            assert float(gold) == float(raw)
            assert parse_gsm8k_response(answer) == gold
            n += 1
    assert n > 100
