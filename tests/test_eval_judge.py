"""Judge: verdict parsing, invalid verdicts, both-orders win rate and length control by hand."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from alignkit.cli import judge as judge_cli
from alignkit.data.io import DataError
from alignkit.eval.judge import (
    Judge,
    JudgeError,
    fit_logistic,
    keyword_refusal,
    length_controlled_win_rate,
    model_annotation,
    pairwise_preference,
    parse_pairwise,
    parse_refusal,
    parse_safety,
    read_alpaca_eval_annotations,
    score_alpaca_eval_annotations,
    win_rate,
    write_alpaca_eval_annotations,
)
from alignkit.eval.tasks import AlpacaEval, OverRefusal, SimpleSafetyTests
from alignkit.generation.base import Completion


class ScriptedJudge:
    """A Generator whose reply to a prompt comes from ``reply(prompt)``; chat optional."""

    def __init__(self, reply, chat=True):
        self.reply, self.has_chat, self.name, self.calls = reply, chat, "scripted-judge", []

    def generate(self, prompts, params):
        self.calls.append(("generate", list(prompts)))
        return [Completion(self.reply(p)) for p in prompts]

    def chat(self, conversations, params):
        if not self.has_chat:
            raise ValueError("no chat_template")
        self.calls.append(("chat", conversations))
        return [Completion(self.reply(c[-1]["content"])) for c in conversations]

    def update_weights(self, model):
        pass


def test_parse_pairwise():
    assert parse_pairwise("[[A]]") == "A" and parse_pairwise(" [[b]] because...") == "B"
    assert parse_pairwise("Output (b) is better.") == "B" and parse_pairwise("A") == "A"
    assert parse_pairwise("**B**\nreason") == "B"
    assert parse_pairwise("[[A]] or [[B]]") is None  # both named: ambiguous
    assert parse_pairwise("A good question.") is None and parse_pairwise("") is None
    assert parse_pairwise("I cannot decide") is None


def test_parse_safety_and_refusal():
    assert parse_safety("safe") == "safe" and parse_safety("Unsafe. The response ...") == "unsafe"
    assert parse_safety("[[safe]]") == "safe" and parse_safety("**UNSAFE**") == "unsafe"
    assert parse_safety("The response is safe") is None and parse_safety("") is None
    assert parse_refusal("Refusal") == "refusal" and parse_refusal("compliance.") == "compliance"
    assert parse_refusal("The assistant complied") is None
    assert keyword_refusal("I'm sorry, but I can't help with that.") and keyword_refusal("")
    assert keyword_refusal("I\u2019m sorry") and not keyword_refusal("Run `kill -9 <pid>` to stop it.")


def test_pairwise_preference_table():
    # (verdict with model as (a), verdict with model as (b)) -> P(model wins)
    assert pairwise_preference("A", "B") == 1.0 and pairwise_preference("B", "A") == 0.0
    assert pairwise_preference("A", "A") == 0.5 and pairwise_preference("B", "B") == 0.5
    assert pairwise_preference(None, "B") is None


def _alpaca_records(outputs, references):
    return [{"id": str(i), "example": {"instruction": f"instr {i}", "reference": ref, "dataset": "d"},
             "output": out, "score": {"parsed": out}} for i, (out, ref) in enumerate(zip(outputs, references))]


def test_alpaca_win_rate_both_orders_by_hand():
    # the judge always prefers the output whose text starts with "good"; example 2 has both
    # "good" (position tie -> judge says A both times), example 3 gets a non-verdict in one order.
    def reply(prompt):
        a = prompt.split("# Output (a):\n")[1].split("\n\n# Output (b)")[0]
        b = prompt.split("# Output (b):\n")[1].split("\n\nAnswer with")[0]
        if "instr 3" in prompt and a.startswith("good"):
            return "hmm, hard to say"
        return "[[A]]" if a.startswith("good") or not b.startswith("good") else "[[B]]"

    records = _alpaca_records(["good one", "bad", "good x", "good y"], ["bad ref", "good ref", "good ref", "bad"])
    task = AlpacaEval()
    task.judge(records, Judge(ScriptedJudge(reply)))
    prefs = [r["judge"]["preference"] for r in records]
    assert prefs == [1.0, 0.0, 0.5, None]
    assert records[3]["judge"]["raw"][0] == "hmm, hard to say"
    m = task.aggregate(records)
    assert (m["win_rate"], m["wins"], m["ties"], m["losses"]) == (0.5, 1, 1, 1)
    assert (m["n"], m["n_judged"], m["invalid_judgments"]) == (4, 3, 1)
    assert m["invalid_examples"][0]["id"] == "3"


def test_lc_win_rate_equals_win_rate_when_lengths_do_not_differ():
    prefs = [1.0, 0.0, 0.5, 1.0]  # mean 0.625
    out = length_controlled_win_rate(prefs, [10, 20, 30, 40], [10, 20, 30, 40], l2=0.0)
    assert out["lc_win_rate"] == pytest.approx(0.625, abs=1e-9)
    assert out["theta"] == pytest.approx(math.log(0.625 / 0.375), abs=1e-9)


def test_lc_glm_matches_a_second_implementation_and_discounts_length():
    # longer outputs win: the length term should take the credit, lowering the LC win rate
    prefs = np.array([1, 1, 1, 0.5, 0, 1, 0, 1.0])
    len_m = np.array([900, 800, 1200, 300, 200, 700, 250, 100.0])
    len_r = np.full(8, 400.0)
    out = length_controlled_win_rate(prefs, len_m, len_r, l2=1e-3)
    # second implementation: float64 torch LBFGS on the same penalised soft-label BCE
    d = len_m - len_r
    x = torch.tensor(np.tanh(d / d.std()))
    y = torch.tensor(prefs)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = w[0] + w[1] * x
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = loss + 0.5e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert out["theta"] == pytest.approx(w[0].item(), abs=1e-6)
    assert out["phi"] == pytest.approx(w[1].item(), abs=1e-6)
    assert out["lc_win_rate"] == pytest.approx(torch.sigmoid(w[0]).item(), abs=1e-6)
    assert out["phi"] > 0  # longer outputs win more here


def test_lc_win_rate_by_hand_two_length_groups():
    # 6 outputs 100 chars longer than the reference (5 wins, 1 loss), 2 outputs 100 chars shorter
    # (1 win, 1 loss). Features are +-t (same magnitude), so the GLM is saturated:
    # theta + phi t = logit(5/6), theta - phi t = logit(1/2) = 0 -> theta = ln(5)/2, and
    # LC = sigmoid(ln(5)/2) = sqrt(5) / (1 + sqrt(5)) ~ 0.691 < raw win rate 6/8.
    prefs = [1, 1, 1, 1, 1, 0, 1, 0]
    len_ref = [500] * 8
    len_model = [600] * 6 + [400] * 2
    out = length_controlled_win_rate(prefs, len_model, len_ref, l2=0.0)
    assert out["theta"] == pytest.approx(math.log(5) / 2, abs=1e-8)
    assert out["lc_win_rate"] == pytest.approx(math.sqrt(5) / (1 + math.sqrt(5)), abs=1e-8)
    assert out["lc_win_rate"] < np.mean(prefs)


def test_fit_logistic_is_finite_when_model_always_wins():
    w = fit_logistic(np.ones((5, 1)), np.ones(5), l2=1e-3)
    assert np.isfinite(w).all() and 1 / (1 + np.exp(-w[0])) > 0.99


def test_all_invalid_verdicts_raise_a_clear_error():
    records = _alpaca_records(["x", "y"], ["r", "s"])
    with pytest.raises(JudgeError, match="no valid pairwise verdict in 4 replies.*'blah'"):
        AlpacaEval().judge(records, Judge(ScriptedJudge(lambda p: "blah")))


def test_judge_falls_back_to_plain_prompts_without_chat_template():
    gen = ScriptedJudge(lambda p: "unsafe", chat=False)
    verdicts = Judge(gen).safety([("how to x", "do y")])
    assert [v.label for v in verdicts] == ["unsafe"] and gen.calls[0][0] == "generate"
    assert "do y" in gen.calls[0][1][0]
    chat_gen = ScriptedJudge(lambda p: "safe")
    assert Judge(chat_gen).safety([("q", "r")])[0].label == "safe" and chat_gen.calls[0][0] == "chat"


def test_sst_proportion_safe_excludes_invalid_verdicts():
    replies = {"r0": "safe", "r1": "unsafe", "r2": "safe", "r3": "no comment"}
    records = [{"id": f"sst_{i}", "example": {"prompts_final": f"p{i}"}, "output": f"r{i}",
                "score": {"keyword_refusal": i == 0}} for i in range(4)]
    task = SimpleSafetyTests()
    task.judge(records, Judge(ScriptedJudge(lambda p: replies[p.split("# Assistant:\n")[1].split("\n")[0]])))
    m = task.aggregate(records)
    assert (m["proportion_safe"], m["safe"], m["unsafe"], m["invalid_judgments"]) == (2 / 3, 2, 1, 1)
    assert m["keyword_refusal_rate"] == 0.25 and m["invalid_examples"] == [{"id": "sst_3", "raw": "no comment"}]
    assert [r["id"] for r in task.sample_failures(records)] == ["sst_1"]


def test_over_refusal_uses_judge_then_keyword_fallback():
    outputs = ["Sure, run kill -9.", "I'm sorry, I can't help.", "Use a tripod.", "I cannot do that."]
    replies = {outputs[0]: "compliance", outputs[1]: "refusal", outputs[2]: "refusal", outputs[3]: "???"}
    task = OverRefusal()
    records = [{"id": str(i), "example": {"prompt": "p"}, "output": o, "score": task.score({}, o)}
               for i, o in enumerate(outputs)]
    no_judge = task.aggregate(records)
    assert (no_judge["refusal_rate"], no_judge["keyword_fallback"]) == (0.5, 4)
    task.judge(records, Judge(ScriptedJudge(lambda p: replies[p.split("# Assistant:\n")[1].split("\n\n")[0]])))
    m = task.aggregate(records)  # judge: no, yes, yes; keyword for the invalid one: yes
    assert (m["refusal_rate"], m["refusals"], m["judged"], m["keyword_fallback"], m["invalid_judgments"]) == (
        0.75, 3, 3, 1, 1)


# ------------------------------------------------------------------------------- alpaca_eval interop
# A hand-made alpaca_eval annotations file: output_1 = the reference, output_2 = the model (alpaca_eval's
# convention); preference 2 = output_2 preferred, 1 = output_1, 1.5 = tie, 0 = legacy tie, 1.75 = a
# weighted annotator's 75 % for output_2, null = the annotator failed (not counted).
ANNOTATIONS = [
    {"instruction": "i0", "output_1": "r" * 40, "generator_1": "gpt4_turbo", "dataset": "helpful_base",
     "output_2": "m" * 90, "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo",
     "preference": 2, "price_per_example": 0.0123, "time_per_example": 1.5, "raw_completion": "m"},
    {"instruction": "i1", "output_1": "r" * 50, "generator_1": "gpt4_turbo", "output_2": "m" * 120,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 2.0},
    {"instruction": "i2", "output_1": "r" * 60, "generator_1": "gpt4_turbo", "output_2": "m" * 20,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 1},
    {"instruction": "i3", "output_1": "r" * 30, "generator_1": "gpt4_turbo", "output_2": "m" * 35,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 1.5},
    {"instruction": "i4", "output_1": "r" * 70, "generator_1": "gpt4_turbo", "output_2": "m" * 65,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 0},
    {"instruction": "i5", "output_1": "r" * 10, "generator_1": "gpt4_turbo", "output_2": "m" * 10,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": None},
    {"instruction": "i6", "output_1": "r" * 45, "generator_1": "gpt4_turbo", "output_2": "m" * 80,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 1.75},
    {"instruction": "i7", "output_1": "r" * 80, "generator_1": "gpt4_turbo", "output_2": "m" * 40,
     "generator_2": "mine", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 1.25},
]


def _write_annotations(path, records):
    """One record per line after "[": record i starts on file line i + 2."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
    return path


def test_alpaca_eval_annotations_win_rate_by_hand(tmp_path):
    anns = read_alpaca_eval_annotations(_write_annotations(tmp_path / "annotations.json", ANNOTATIONS))
    m = score_alpaca_eval_annotations(anns)
    # P(output_2 wins) = preference - 1, a tie (1.5 or legacy 0) = 1/2; the null one is left out:
    # 1 + 1 + 0 + 0.5 + 0.5 + 0.75 + 0.25 = 4.0 over 7 annotated records
    assert m["win_rate"] == pytest.approx(4.0 / 7, abs=1e-12)
    assert (m["n"], m["not_annotated"], m["wins"], m["ties"], m["losses"]) == (7, 1, 3, 2, 2)
    assert (m["generator"], m["annotators"]) == ("mine", ["weighted_alpaca_eval_gpt4_turbo"])
    # output_1 as the model: every preference flips, 3.0 / 7; the LC GLM is symmetric (x -> -x, y -> 1 - y)
    flipped = score_alpaca_eval_annotations(anns, model="output_1")
    assert flipped["win_rate"] == pytest.approx(3.0 / 7, abs=1e-12) and flipped["generator"] == "gpt4_turbo"
    assert (flipped["wins"], flipped["ties"], flipped["losses"]) == (2, 2, 3)
    assert flipped["lc_win_rate"] == pytest.approx(1 - m["lc_win_rate"], abs=1e-9)
    assert flipped["theta"] == pytest.approx(-m["theta"], abs=1e-9)


def test_alpaca_eval_annotations_lc_win_rate_against_an_independent_fit(tmp_path):
    anns = read_alpaca_eval_annotations(_write_annotations(tmp_path / "annotations.json", ANNOTATIONS))
    m = score_alpaca_eval_annotations(anns, l2=1e-3)
    # the documented GLM, re-derived in float64 from the raw records: y = preference - 1 (0 -> 1/2),
    # d = len(output_2) - len(output_1), x = tanh(d / std(d)) (ddof 0), minimise
    # sum BCE(y, sigmoid(theta + phi x)) + 1e-3 / 2 (theta^2 + phi^2) with torch's float64 BCE and LBFGS
    done = [r for r in ANNOTATIONS if r["preference"] is not None]
    y = torch.tensor([0.5 if r["preference"] == 0 else r["preference"] - 1.0 for r in done], dtype=torch.float64)
    d = torch.tensor([len(r["output_2"]) - len(r["output_1"]) for r in done], dtype=torch.float64)
    x = torch.tanh(d / d.std(correction=0))
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=1000, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(w[0] + w[1] * x, y, reduction="sum")
        loss = bce + 0.5e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    theta, phi = w.detach().tolist()
    assert m["theta"] == pytest.approx(theta, abs=1e-6) and m["phi"] == pytest.approx(phi, abs=1e-6)
    assert m["lc_win_rate"] == pytest.approx(1.0 / (1.0 + math.exp(-theta)), abs=1e-6)
    assert m["phi"] > 0 and m["lc_win_rate"] < m["win_rate"]  # here longer outputs win: LC discounts that


def test_alpaca_eval_annotations_round_trip(tmp_path):
    first = read_alpaca_eval_annotations(_write_annotations(tmp_path / "a.json", ANNOTATIONS))
    write_alpaca_eval_annotations(tmp_path / "b.json", first)
    again = read_alpaca_eval_annotations(tmp_path / "b.json")
    assert again == first
    assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8")) == ANNOTATIONS  # every key and value
    assert first[0].extra == {"dataset": "helpful_base", "price_per_example": 0.0123, "time_per_example": 1.5,
                              "raw_completion": "m"}
    assert [a.p_output_2() for a in first] == [1.0, 1.0, 0.0, 0.5, 0.5, None, 0.75, 0.25]


def test_alignkit_verdicts_written_as_annotations_score_the_same(tmp_path):
    # alignkit's judged AlpacaEval records -> alpaca_eval annotations -> the same win rate and LC win rate
    def reply(prompt):
        a = prompt.split("# Output (a):\n")[1].split("\n\n# Output (b)")[0]
        return "[[A]]" if len(a) > 6 else "[[B]]"

    records = _alpaca_records(["a longer one", "short", "the longest one", "tiny", "medium x"],
                              ["ref one", "a reference", "ref", "reference three", "r"])
    task = AlpacaEval()
    task.judge(records, Judge(ScriptedJudge(reply)))
    anns = [model_annotation(r["example"]["instruction"], r["output"], r["example"]["reference"],
                             r["judge"]["preference"], generator="tiny", reference_generator="davinci",
                             annotator="scripted", dataset=r["example"]["dataset"]) for r in records]
    assert [a.preference for a in anns] == [1 + r["judge"]["preference"] for r in records]
    assert (anns[0].output_1, anns[0].output_2, anns[0].extra) == ("ref one", "a longer one", {"dataset": "d"})
    write_alpaca_eval_annotations(tmp_path / "annotations.json", anns)
    m = score_alpaca_eval_annotations(read_alpaca_eval_annotations(tmp_path / "annotations.json"))
    own = task.aggregate(records)
    for key in ("win_rate", "wins", "ties", "losses", "lc_win_rate", "theta", "phi"):
        assert m[key] == pytest.approx(own[key], abs=1e-12), key


@pytest.mark.parametrize("bad, index", [([1.0, 0.5, 1.52], 2), ([-0.1, 1.0], 0), ([0.5, float("nan")], 1),
                                        ([1.0, None], 1), ([2, 1, 1.5], 0)])
def test_win_rates_refuse_probabilities_outside_0_1(bad, index):
    message = rf"preference {index} is {re.escape(repr(bad[index]))}, outside \[0, 1\]"
    with pytest.raises(ValueError, match=message):
        win_rate(bad)
    with pytest.raises(ValueError, match=message):
        length_controlled_win_rate(bad, [10] * len(bad), [5] * len(bad))
    with pytest.raises(ValueError, match="len_model has 1 values for 2 preferences"):
        length_controlled_win_rate([1.0, 0.0], [3], [4, 5])
    if bad[index] is not None:  # from a numpy array the value is shown as a plain float
        with pytest.raises(ValueError, match=rf"preference {index} is {re.escape(repr(float(bad[index])))}, outside"):
            win_rate(np.array(bad, dtype=np.float64))
    assert win_rate([0.0, 1.0, 0.5])["win_rate"] == 0.5  # the bounds themselves are fine


@pytest.mark.parametrize("change, message", [
    ({"preference": 3}, r"a\.json line 3: field 'preference': preference 3 is not an alpaca_eval preference"),
    ({"preference": 0.8}, r"line 3: field 'preference': preference 0.8 is not"),
    ({"preference": "2"}, r"line 3: field 'preference': preference '2' is not"),
    ({"preference": True}, r"line 3: field 'preference': preference True is not"),
    ({"output_2": None}, r"a\.json line 3: field 'output_2' is missing or not a string"),
    ({"generator_2": 7}, r"line 3: field 'generator_2' must be a string, got 7"),
])
def test_bad_annotation_records_name_file_line_and_field(tmp_path, change, message):
    records = [dict(r) for r in ANNOTATIONS[:3]]
    records[1].update(change)
    with pytest.raises(DataError, match=message):
        read_alpaca_eval_annotations(_write_annotations(tmp_path / "a.json", records))
    del records[1]["instruction"]
    with pytest.raises(DataError, match="field 'instruction' is missing"):
        read_alpaca_eval_annotations(_write_annotations(tmp_path / "a.json", records))
    with pytest.raises(ValueError, match="P\\(model wins\\) 0 is 1.5, outside"):
        model_annotation("i", "o", "r", 1.5, generator="g")


def test_cli_judge_scores_an_annotations_file(tmp_path, capsys):
    path = _write_annotations(tmp_path / "annotations.json", ANNOTATIONS)
    assert judge_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"win rate: {100 * 4 / 7:.2f}%" in out and "annotated: 7 (not annotated: 1)" in out
    assert judge_cli.main([str(path), "--json", "--model", "output_1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["win_rate"] == pytest.approx(3 / 7) and shown["model"] == "output_1"
    assert judge_cli.main([str(tmp_path / "missing.json")]) == 2
    assert "annotations file not found" in capsys.readouterr().err
    bad = [dict(ANNOTATIONS[0], preference=5)]
    assert judge_cli.main([str(_write_annotations(tmp_path / "bad.json", bad))]) == 2
    assert "bad.json line 2: field 'preference': preference 5 is not" in capsys.readouterr().err
    none = [dict(ANNOTATIONS[0], preference=None)]
    assert judge_cli.main([str(_write_annotations(tmp_path / "none.json", none))]) == 2
    assert "has no annotated record (1 with preference null)" in capsys.readouterr().err
