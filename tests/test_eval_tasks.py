"""Eval tasks: data loading, prompts, sampling params, scoring and aggregation vs hand calculations."""
from __future__ import annotations

import csv
import json
import re
import sys
import types

import pytest

from alignkit import resources
from alignkit.eval.config import EvalConfig, problems
from alignkit.eval.tasks import GSM8K, MMLU, AlpacaEval, OverRefusal, SimpleSafetyTests, get_task, wrap_prompt
from alignkit.eval.tasks.base import clean_output
from alignkit.eval.tasks.gsm8k import numbers_equal


@pytest.fixture(autouse=True)
def parsers(monkeypatch):
    """The core engineer's parsers; a minimal stand-in while alignkit/eval/parsers.py is absent."""
    try:
        import alignkit.eval.parsers  # noqa: F401
    except ImportError:
        m = types.ModuleType("alignkit.eval.parsers")

        def parse_mmlu_response(example, text):
            r = re.search(r"correct answer is \(?([ABCD])\b", text)
            return r.group(1) if r else None

        def parse_gsm8k_response(text):
            nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
            return nums[-1] if nums else None

        m.parse_mmlu_response = parse_mmlu_response
        m.parse_gsm8k_response = parse_gsm8k_response
        m.gsm8k_answer = lambda a: a.split("####")[-1].strip().replace(",", "")
        monkeypatch.setitem(sys.modules, "alignkit.eval.parsers", m)


def record(task, example, text, style="zero_shot"):
    """A record as the runner builds it."""
    out = clean_output(text, style)
    return {"id": example["id"], "example": example, "generation": text, "output": out,
            "score": task.score(example, out)}


def test_registry_unknown_name_lists_valid_names():
    assert isinstance(get_task("gsm8k"), GSM8K)
    with pytest.raises(KeyError, match="valid tasks: mmlu, gsm8k, alpaca_eval, sst, over_refusal"):
        get_task("hellaswag")


def test_mmlu_limit_is_a_seeded_sample_across_subjects():
    task = MMLU()
    full = task.load()
    files = sorted(resources.data_path("mmlu", "test").glob("*_test.csv"))
    assert len(full) == sum(len(list(csv.reader(p.open(encoding="utf-8", newline="")))) for p in files)
    assert {e["subject"] for e in full} == {p.name[: -len("_test.csv")] for p in files}
    a, b, c = task.load(40, seed=0), task.load(40, seed=0), task.load(40, seed=1)
    assert [e["id"] for e in a] == [e["id"] for e in b]
    assert [e["id"] for e in a] != [e["id"] for e in c]
    assert len({e["subject"] for e in a}) > 5  # not just the first subject
    position = {e["id"]: i for i, e in enumerate(full)}
    assert [position[e["id"]] for e in a] == sorted(position[e["id"]] for e in a)  # original order
    assert all(e["answer"] in "ABCD" and len(e["options"]) == 4 for e in a)


def test_mmlu_prompt_follows_the_supplement():
    ex = {"id": "x/1", "subject": "high_school_geography", "question": "Q?", "options": ["w", "x", "y", "z"],
          "answer": "B"}
    body = MMLU().instruction(ex)
    assert body == (
        "Answer the following multiple choice question about high school geography. Respond with a single "
        'sentence of the form "The correct answer is _", filling the blank with the letter corresponding '
        "to the correct answer (i.e., A, B, C or D).\n\nQuestion: Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    zero = MMLU().format_prompt(ex, "zero_shot")
    assert zero == resources.prompt("zero_shot_system_prompt").replace("{instruction}", body)
    assert zero.endswith("# Answer:\n```\n")
    alpaca = MMLU().format_prompt(ex, "alpaca")
    assert alpaca.endswith("### Response:\n") and f"### Instruction:\n{body}\n" in alpaca
    assert MMLU().format_prompt(ex, "chat") == [{"role": "user", "content": body}]
    with pytest.raises(ValueError, match="valid styles"):
        wrap_prompt("q", "few_shot")


def test_sampling_params_are_greedy_and_stop_at_query():
    p = GSM8K().sampling_params("zero_shot")
    assert (p.temperature, p.top_p, p.stop, p.max_new_tokens) == (0.0, 1.0, ["# Query:"], GSM8K.max_new_tokens)
    assert GSM8K().sampling_params("chat", max_new_tokens=7).max_new_tokens == 7
    assert GSM8K().sampling_params("chat").stop == []


def test_clean_output_removes_closing_fence_for_zero_shot_only():
    assert clean_output("  The answer is 4.\n```\n\n", "zero_shot") == "The answer is 4."
    assert clean_output("code:\n```", "chat") == "code:\n```"


def test_mmlu_score_and_aggregate_by_hand():
    task = MMLU()
    exs = [{"id": f"s{i}", "subject": s, "question": "q", "options": list("wxyz"), "answer": a}
           for i, (s, a) in enumerate([("anatomy", "A"), ("anatomy", "B"), ("virology", "C"), ("virology", "D")])]
    texts = ["The correct answer is A.\n```", "The correct answer is C.", "I am not sure.", "The correct answer is D."]
    records = [record(task, e, t) for e, t in zip(exs, texts)]
    assert [r["score"]["correct"] for r in records] == [True, False, False, True]
    m = task.aggregate(records)
    assert (m["accuracy"], m["n"], m["correct"], m["unparseable"]) == (0.5, 4, 2, 1)
    assert m["unparseable_examples"] == [{"id": "s2", "generation": "I am not sure."}]
    assert m["per_subject"] == {"anatomy": {"accuracy": 0.5, "n": 2}, "virology": {"accuracy": 0.5, "n": 2}}


def test_gsm8k_gold_score_reward_and_aggregate():
    task = GSM8K()
    first = task.load(2)
    assert first[0]["gold"] == "18"  # Janet's ducks: "#### 18"
    ex = dict(first[0])
    records = [record(task, ex, "She makes 9 * 2 = 18 dollars."), record(task, ex, "It is 17."),
               record(task, ex, "no idea")]
    assert [r["score"]["correct"] for r in records] == [True, False, False]
    assert task.aggregate(records) | {"unparseable_examples": None} == {
        "accuracy": 1 / 3, "n": 3, "correct": 1, "unparseable": 1, "unparseable_examples": None}
    assert task.reward(ex, "so 18") == {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}
    assert task.reward(ex, "so 17") == {"reward": 0.0, "format_reward": 1.0, "answer_reward": 0.0}
    assert task.reward(ex, "none") == {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}


def test_numbers_equal():
    assert numbers_equal("1,000", "1000") and numbers_equal("$18.00", "18") and numbers_equal("18.", "18")
    assert not numbers_equal("18.5", "18") and not numbers_equal(None, "18")


def test_bad_data_errors_name_file_line_and_field(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text('q,a,b,c,d,A\nq2,a,b,c,D\n')
    with pytest.raises(ValueError, match=r"anatomy_test.csv: row 2: expected 6 fields"):
        MMLU(tmp_path).load()
    (tmp_path / "test" / "anatomy_test.csv").write_text('q,a,b,c,d,E\n')
    with pytest.raises(ValueError, match=r"row 1: field 'answer' must be A, B, C or D"):
        MMLU(tmp_path).load()
    bad = tmp_path / "g.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"g.jsonl line 2: field 'answer'"):
        GSM8K(bad).load()
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"g.jsonl line 1: invalid JSON"):
        AlpacaEval(bad).load()
    sst = tmp_path / "s.csv"
    sst.write_text("id,harm_area,counter,category\nsst_1,a,1,b\n")
    with pytest.raises(ValueError, match="lacks column.*prompts_final"):
        SimpleSafetyTests(sst).load()
    sst.write_text("id,harm_area,counter,category,prompts_final\nsst_1,a,1,b,\n")
    with pytest.raises(ValueError, match=r"s.csv: line 2: field 'prompts_final' is empty"):
        SimpleSafetyTests(sst).load()


def test_bundled_data_counts_and_fields():
    assert len(AlpacaEval().load()) == 805 and len(SimpleSafetyTests().load()) == 100
    assert len(GSM8K().load(5)) == 5 and len(AlpacaEval().load(3)) == 3
    over = OverRefusal().load()
    assert 25 <= len(over) <= 40 and len({e["id"] for e in over}) == len(over)
    assert any("kill a Python process" in e["prompt"] for e in over)
    assert AlpacaEval().format_prompt(AlpacaEval().load(1)[0], "chat")[0]["content"] == AlpacaEval().load(1)[0][
        "instruction"]


# ------------------------------------------------------------------------------- task specs
def test_every_task_is_defined_by_its_spec():
    from alignkit.eval.tasks import SPECS, TASKS

    assert list(SPECS) == list(TASKS)
    for name, cls in TASKS.items():
        assert cls.spec is SPECS[name] and cls.name == name == cls.spec.name
        assert cls.max_new_tokens == cls.spec.max_new_tokens and cls().data_path.exists()
    assert (GSM8K.max_new_tokens, MMLU.max_new_tokens, AlpacaEval.max_new_tokens) == (256, 128, 512)
    ex = GSM8K().load(1)[0]
    assert GSM8K().instruction(ex) == ex["question"] + "\nAnswer:"
    assert SimpleSafetyTests().instruction({"prompts_final": "P"}) == "P"
    assert OverRefusal().instruction({"prompt": "Q"}) == "Q"


def test_a_task_from_a_spec_alone():
    """A new task needs only a spec and a loader: prompt, stops, cap, score and reward follow from it."""
    from alignkit.eval.tasks import Task, TaskSpec
    from alignkit.eval.tasks.graders import exact

    class Toy(Task):
        spec = TaskSpec(name="toy", data="gsm8k/test.jsonl", prompt="Q: {q} ({q})", max_new_tokens=5,
                        metric="exact_match", target="gold", stop=("\n\n",), grader=exact,
                        parser=lambda example, text: text.strip().upper() or None)

    toy = Toy()
    assert (Toy.name, Toy.max_new_tokens, toy.instruction({"q": "{x}"})) == ("toy", 5, "Q: {x} ({x})")
    assert toy.sampling_params("zero_shot").stop == ["# Query:", "\n\n"]
    assert toy.sampling_params("chat").stop == ["\n\n"]
    assert toy.score({"gold": "A"}, " a ") == {"parsed": "A", "gold": "A", "correct": True}
    assert toy.reward({"gold": "A"}, "  ") == {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}
    assert toy.harness_metrics({"gold": "B"}, "a") == {"exact_match": 0.0}


def test_spec_checks_its_fields():
    from alignkit.eval.tasks import TaskSpec
    from alignkit.eval.tasks.graders import exact

    with pytest.raises(ValueError, match="unknown metric 'f1'; valid: exact_match, acc"):
        TaskSpec(name="t", data="x", prompt="p", max_new_tokens=1, metric="f1")
    with pytest.raises(ValueError, match="parser, grader and target come together"):
        TaskSpec(name="t", data="x", prompt="p", max_new_tokens=1, metric="acc", grader=exact)
    with pytest.raises(NotImplementedError, match="'sst' has no grader"):
        SimpleSafetyTests.grade("a", "a")


def test_mmlu_reads_one_subject_csv():
    path = resources.data_path("mmlu", "test", "anatomy_test.csv")
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
    one = MMLU(path).load()
    assert len(one) == len(rows) and {e["subject"] for e in one} == {"anatomy"}
    assert one[0]["id"] == "anatomy/1" and one[0]["answer"] == rows[0][5]


def test_graders_by_hand():
    from alignkit.eval.tasks.graders import answers_equivalent, exact

    assert GSM8K.grade("1/2", "0.5") and GSM8K.grade("\\frac{3}{4}", "0.75") and GSM8K.grade("$1,000", "1000")
    assert not GSM8K.grade(None, "0") and not GSM8K.grade("", "0") and not GSM8K.grade("2", "0.5")
    assert GSM8K.spec.grader is answers_equivalent and MMLU.spec.grader is exact
    assert MMLU.grade("B", "B") and not MMLU.grade("b", "B") and not MMLU.grade(None, "B")


def _write_subjects(folder, sizes: dict[str, int]) -> dict[str, list[list[str]]]:
    """One hand-made <subject>_test.csv per entry; returns the rows written, per subject, in file order."""
    (folder / "test").mkdir()
    written = {}
    for subject, n in sizes.items():
        rows = [[f"{subject} q{i}", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(n)]
        with open(folder / "test" / f"{subject}_test.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
        written[subject] = rows
    return written


def test_mmlu_limit_per_subject_takes_the_first_n_of_each_file(tmp_path):
    written = _write_subjects(tmp_path, {"anatomy": 5, "virology": 2, "astronomy": 3})
    got = MMLU(tmp_path).load(limit_per_subject=3)
    counts = {s: sum(e["subject"] == s for e in got) for s in written}
    assert counts == {"anatomy": 3, "virology": 2, "astronomy": 3}  # min(3, rows in the file)
    for subject, rows in written.items():  # the first rows of the file, in file order
        assert [e["question"] for e in got if e["subject"] == subject] == [r[0] for r in rows[:3]]
        assert [e["id"] for e in got if e["subject"] == subject] == [f"{subject}/{i}" for i in
                                                                      range(1, min(3, len(rows)) + 1)]
    assert MMLU(tmp_path).load(limit_per_subject=0) == []
    assert len(MMLU(tmp_path).load(limit_per_subject=None)) == 10
    with pytest.raises(ValueError, match="limit_per_subject must be >= 0"):
        MMLU(tmp_path).load(limit_per_subject=-1)


def test_mmlu_limit_per_subject_on_the_bundled_data_then_seeded_limit():
    files = sorted(resources.data_path("mmlu", "test").glob("*_test.csv"))
    got = MMLU().load(limit_per_subject=2)
    assert len(got) == 2 * len(files)
    for path in files:
        subject = path.name[: -len("_test.csv")]
        first = [r[0] for r in list(csv.reader(path.open(encoding="utf-8", newline="")))[:2]]
        assert [e["question"] for e in got if e["subject"] == subject] == first
    sampled = MMLU().load(limit=10, seed=3, limit_per_subject=2)  # a seeded sample of those
    assert len(sampled) == 10 and {e["id"] for e in sampled} <= {e["id"] for e in got}
    assert [e["id"] for e in sampled] == [e["id"] for e in MMLU().load(limit=10, seed=3, limit_per_subject=2)]


@pytest.mark.parametrize("cls", [GSM8K, AlpacaEval, SimpleSafetyTests, OverRefusal])
def test_tasks_without_subjects_refuse_limit_per_subject(cls):
    with pytest.raises(ValueError, match=rf"limit_per_subject is read only by tasks with subjects \(mmlu\); "
                                         rf"task '{cls.name}' ignores it"):
        cls().load(limit_per_subject=2)
    assert cls().load(limit=1, limit_per_subject=None)  # unset: nothing refused


def test_eval_config_refuses_limit_per_subject_where_it_is_not_read():
    assert problems(EvalConfig(model="m", tasks="mmlu", limit_per_subject=2)) == []
    assert problems(EvalConfig(model="m", tasks="mmlu,gsm8k", limit_per_subject=2)) == [
        "limit_per_subject is read only by tasks with subjects (mmlu); tasks gsm8k ignore it"]
    [harness_only] = problems(EvalConfig(model="m", harness="mmlu", limit_per_subject=2))
    assert harness_only.startswith("limit_per_subject is read only by the bundled-task runner")
    assert problems(EvalConfig(model="m", tasks="mmlu", limit_per_subject=-1)) == [
        "limit_per_subject must be >= 0, got -1"]
