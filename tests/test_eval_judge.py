"""Judge: verdict parsing, invalid verdicts, both-orders win rate and length control by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.eval.judge import (
    Judge,
    JudgeError,
    fit_logistic,
    keyword_refusal,
    length_controlled_win_rate,
    pairwise_preference,
    parse_pairwise,
    parse_refusal,
    parse_safety,
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
