"""Rewards on hand-written completions: r1-zero format + math equivalence, GSM8K last number, loader."""
from __future__ import annotations

import sys
import textwrap

import pytest

from alignkit.rl.rewards import (
    REWARDS,
    answers_equivalent,
    get_reward,
    gsm8k_reward,
    load_reward_fn,
    r1_zero_reward,
)

GSM8K_GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"


def r(format_, answer, reward):
    return {"format_reward": float(format_), "answer_reward": float(answer), "reward": float(reward)}


@pytest.mark.parametrize("completion, gold, expected", [
    # well formed (completion starts inside <think>, ends with the re-appended </answer>)
    ("2 + 3 = 5 </think> <answer>5</answer>", "5", r(1, 1, 1)),
    ("reasoning\nover lines </think>\n<answer> 5 </answer>\n", "5", r(1, 1, 1)),
    ("half </think> <answer>0.5</answer>", "1/2", r(1, 1, 1)),
    ("half </think> <answer>1/2</answer>", "0.5", r(1, 1, 1)),
    ("half </think> <answer>\\frac{1}{2}</answer>", "0.5", r(1, 1, 1)),
    ("boxed </think> <answer>\\boxed{42}</answer>", "42", r(1, 1, 1)),
    ("neg </think> <answer>-7</answer>", "-7", r(1, 1, 1)),
    ("sep </think> <answer>1,072</answer>", GSM8K_GOLD, r(1, 1, 1)),
    ("sep </think> <answer>1072</answer>", GSM8K_GOLD, r(1, 1, 1)),
    # well formed, wrong answer
    ("neg </think> <answer>7</answer>", "-7", r(1, 0, 0)),
    ("half </think> <answer>0.51</answer>", "1/2", r(1, 0, 0)),
    ("empty </think> <answer></answer>", "5", r(1, 0, 0)),
    # malformed: a correct answer earns nothing without the format (CS336 / R1-Zero convention)
    ("5", "5", r(0, 0, 0)),
    ("thinking <answer>5</answer>", "5", r(0, 0, 0)),  # no </think>
    ("x </think> 5", "5", r(0, 0, 0)),  # no answer block
    ("x </think> <answer>5</answer> and more", "5", r(0, 0, 0)),  # text after </answer>
    ("x </think> <answer>5", "5", r(0, 0, 0)),  # truncated: stop string never reached
    ("<think> x </think> <answer>5</answer>", "5", r(0, 0, 0)),  # a second <think>
    ("x </think> <answer>4</answer> </think> <answer>5</answer>", "5", r(0, 0, 0)),  # two answers
])
def test_r1_zero_reward(completion, gold, expected):
    assert r1_zero_reward(completion, gold) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("She sold 48 + 24 = 72 clips.", "72", r(1, 1, 1)),
    ("So the total is $1,072.", GSM8K_GOLD, r(1, 1, 1)),
    ("The result is -3.", "-3", r(1, 1, 1)),
    ("It is 2.50 dollars", "2.5", r(1, 1, 1)),
    ("The answer is 71", "72", r(1, 0, 0)),
    ("I do not know", "72", r(0, 0, 0)),
])
def test_gsm8k_reward_last_number(completion, gold, expected):
    assert gsm8k_reward(completion, gold) == expected


def test_answers_equivalent_symmetric_forms():
    assert answers_equivalent("\\frac{3}{4}", "0.75") and answers_equivalent("0.75", "3/4")
    assert not answers_equivalent("3/4", "0.7")
    assert not answers_equivalent("", "0")


def test_registry_and_presets():
    assert set(REWARDS) == {"gsm8k", "r1_zero"}
    preset = get_reward("r1_zero")
    assert preset.stop == ["</answer>"] and preset.append_stop and preset.prompt == "r1_zero"
    assert get_reward("gsm8k").fn is gsm8k_reward


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_rl_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(textwrap.dedent("""
        LIMIT = 3
        def score(response, ground_truth):
            ok = float(response.strip() == ground_truth)
            return {"reward": ok, "format_reward": 1.0, "answer_reward": ok}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg_rl_test.rewards"
    sys.modules.pop("mypkg_rl_test.rewards", None)
    sys.modules.pop("mypkg_rl_test", None)


def test_load_reward_fn_import_path(reward_module):
    fn = load_reward_fn(f"{reward_module}:score")
    assert fn("4", "4")["reward"] == 1.0 and fn("5", "4")["reward"] == 0.0
    assert get_reward(f"{reward_module}:score").fn is fn


@pytest.mark.parametrize("suffix, error, fragment", [
    (":nope", AttributeError, "has no attribute 'nope'; callables there: score"),
    (":LIMIT", TypeError, "is a int, not a function"),
])
def test_load_reward_fn_errors(reward_module, suffix, error, fragment):
    with pytest.raises(error) as err:
        load_reward_fn(reward_module + suffix)
    assert fragment in str(err.value)


@pytest.mark.parametrize("spec, error, fragment", [
    ("no_colon_here", ValueError, "registered name (gsm8k, r1_zero) or 'module.path:function'"),
    ("a:b:c", ValueError, "'module.path:function'"),
    ("not_a_module_xyz:score", ImportError, "cannot import module 'not_a_module_xyz'"),
])
def test_load_reward_fn_bad_specs(spec, error, fragment):
    with pytest.raises(error) as err:
        get_reward(spec)
    assert fragment in str(err.value)


# (answer as the model writes it, gold, correct?) -- expected values by hand
AGREEMENT = [
    ("1/2", "0.5", True),
    ("0.5", "1/2", True),
    ("1,000", "1000", True),
    ("1000.0", "1,000", True),
    ("$5", "5", True),
    ("1,072", GSM8K_GOLD, True),
    ("-7", "-7", True),
    ("0.51", "0.5", False),
    ("1/3", "0.5", False),
    ("7", "-7", False),
    ("1,001", "1000", False),
    ("$6", "5", False),
]


@pytest.mark.parametrize("answer, gold, correct", AGREEMENT)
def test_eval_score_and_rl_rewards_agree(answer, gold, correct):
    """The GSM8K task's score (eval), its reward, and the gsm8k / r1_zero presets give one verdict."""
    from alignkit.eval.tasks import GSM8K

    task = GSM8K()
    example = GSM8K.example_for(gold)
    text = f"So the answer is {answer}."
    assert task.score(example, text)["correct"] is correct
    assert task.reward(example, text) == r(1, correct, correct)
    assert gsm8k_reward(text, gold) == r(1, correct, correct)
    assert r1_zero_reward(f"reasoning </think> <answer>{answer}</answer>", gold) == r(1, correct, correct)
    assert GSM8K.grade(answer, GSM8K.example_for(gold)["gold"]) is correct


def test_gsm8k_preset_is_the_task_reward(monkeypatch):
    """The gsm8k preset calls the GSM8K task's reward (the grader is really wired, not a copy)."""
    from alignkit.eval.tasks import GSM8K

    calls = []
    monkeypatch.setattr(GSM8K, "grade", classmethod(lambda cls, answer, gold: calls.append((answer, gold)) or True))
    assert get_reward("gsm8k").fn("It is 3.", GSM8K_GOLD)["reward"] == 1.0
    assert r1_zero_reward("x </think> <answer>4</answer>", "9")["reward"] == 1.0
    assert calls == [("3", "1072"), ("4", "9")]
