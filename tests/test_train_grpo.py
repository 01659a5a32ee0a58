"""The GRPO stage module: GRPOArgs, data, recipe -> run() on the tiny model, TRL engine, backends."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.config import load_recipe
from alignkit.generation.base import SamplingParams
from alignkit.rl.loop import GRPOSettings
from alignkit.rl.rewards import get_reward
from alignkit.train import grpo

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, model_dir, **train):
    raw = {"stage": "grpo", "output_dir": str(tmp_path / "run"), "seed": 0,
           "model": {"name_or_path": str(model_dir), "dtype": "float32"},
           "train": {"task": "arithmetic", "reward": "r1_zero", "n_grpo_steps": 1, "rollout_batch_size": 4,
                     "group_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 2,
                     "max_new_tokens": 6, "min_new_tokens": 1, "n_val": 4, "n_train": 16, "use_cpu": True,
                     "learning_rate": 1e-3, **train}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path).stages["grpo"]


def test_every_arg_has_help_and_settings_share_names():
    for f in dataclasses.fields(grpo.GRPOArgs):
        assert f.metadata.get("help"), f"GRPOArgs.{f.name} has no help"
    args = grpo.GRPOArgs(group_size=4, loss_type="grpo_clip", rollout_backend="http")
    s = args.settings(get_reward("r1_zero"))
    assert isinstance(s, GRPOSettings) and s.group_size == 4 and s.loss_type == "grpo_clip"
    assert s.stop == ["</answer>"] and s.append_stop and not s.sync_weights
    assert grpo.GRPOArgs(stop=[]).settings(get_reward("r1_zero")).append_stop is False
    with pytest.raises(ValueError, match="train.engine='ppo': valid values are alignkit, trl"):
        grpo.GRPOArgs(engine="ppo")


def test_arithmetic_data_is_deterministic_and_held_out_disjoint():
    args = grpo.GRPOArgs(task="arithmetic", n_val=16, n_train=32, seed=3)
    train, val = grpo.load_examples(args, None)
    again, _ = grpo.load_examples(args, None)
    assert train == again and len(train) == 32 and len(val) == 16
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    for row in train + val:  # the answer is the sum, computed here independently
        a, b = (int(x) for x in row["question"].removeprefix("What is ").rstrip("?").split(" + "))
        assert row["answer"] == str(a + b) and 1 <= a <= 9 and 1 <= b <= 9


def test_gsm8k_data_and_prompt():
    train, val = grpo.load_examples(grpo.GRPOArgs(n_train=3, n_val=2), None)
    assert len(train) == 3 and len(val) == 2 and "####" in train[0]["answer"]
    template = grpo.prompt_template(grpo.GRPOArgs(), get_reward("r1_zero"))
    prompts, _ = grpo.format_prompts(train, template)
    assert prompts[0].endswith(f"User: {train[0]['question']}\nAssistant: <think>")
    with pytest.raises(ValueError, match="no {question} field"):
        grpo.prompt_template(grpo.GRPOArgs(prompt="alpaca_sft"), get_reward("r1_zero"))


def test_bad_data_row_names_file_line_field(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    data = dataclasses.make_dataclass("D", [("path", str), ("eval_path", str)])(str(bad), str(bad))
    with pytest.raises(ValueError, match=r"train.jsonl line 2: field 'answer'"):
        grpo.load_examples(grpo.GRPOArgs(), data)


@pytest.fixture
def length_reward(tmp_path, monkeypatch):
    """A custom reward (module:function) that varies on random text, so advantages are non-zero."""
    (tmp_path / "grpo_test_rewards.py").write_text(
        "def parity(response, ground_truth):\n"
        "    r = float(len(response) % 2)\n"
        "    return {'reward': r, 'format_reward': 1.0, 'answer_reward': r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_test_rewards:parity"


def test_stage_run_on_tiny_model(tmp_path, tiny_model_dir, length_reward):
    stage = _recipe(tmp_path, tiny_model_dir, reward=length_reward, rollout_batch_size=8, train_batch_size=8,
                    require_improvement=True)
    result = grpo.run(stage, tmp_path / "run", None)
    model_dir = Path(result["model_dir"])
    assert (model_dir / "config.json").exists() and result["model_source"]["kind"] == "folder"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [0, 1, 1] and "loss" in lines[1] and "val_reward" in lines[2]
    assert set(result["before_after"]) == {"val_reward", "val_format_reward", "val_answer_reward"}
    # the saved weights differ from the start (one AdamW step at lr 1e-3)
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), trained.parameters()))
    assert json.loads((tmp_path / "run" / "grpo_summary.json").read_text())["model_dir"] == str(model_dir)
    ba = result["before_after"]["val_reward"]
    assert (ba["after"] > ba["before"]) == result["improved"] == ("checks_failed" not in result)


def test_require_improvement_flags_failure(tmp_path, tiny_model_dir):
    stage = _recipe(tmp_path, tiny_model_dir, require_improvement=True, n_val=2, rollout_batch_size=2,
                    train_batch_size=2, gradient_accumulation_steps=1, max_new_tokens=2)
    result = grpo.run(stage, tmp_path / "run", None)
    # a random tiny model never writes the r1-zero format: 0 -> 0 is no improvement
    assert result["before_after"]["val_reward"] == {"before": 0.0, "after": 0.0}
    assert result["checks_failed"] == ["validation reward did not rise"]


@pytest.mark.slow
def test_stage_run_lora_with_kl_to_adapter_free_base(tmp_path, tiny_model_dir, length_reward):
    stage = _recipe(tmp_path, tiny_model_dir, beta=0.05, epochs_per_rollout_batch=2, reward=length_reward,
                    rollout_batch_size=8, train_batch_size=8)
    stage.lora.enabled, stage.lora.r, stage.lora.alpha = True, 4, 8
    result = grpo.run(stage, tmp_path / "run", None)
    assert (Path(result["adapter_dir"]) / "adapter_config.json").exists()
    assert (Path(result["model_dir"]) / "config.json").exists()  # merged full model for the next stage
    assert result["metrics"]["kl"] > 0  # epoch 2 runs after a step: the adapter moved away from the base


def test_vllm_backend_request_building(monkeypatch):
    """No vLLM on CPU: check what the GRPO stage asks of the vLLM backend, not the backend."""
    import alignkit.generation.vllm as vllm_mod

    made = {}

    class FakeVLLM:
        def __init__(self, model_path, **kw):
            made.update(model_path=model_path, **kw)

    monkeypatch.setattr(vllm_mod, "VLLMGenerator", FakeVLLM)
    args = grpo.GRPOArgs(rollout_backend="vllm", vllm_gpu_memory_utilization=0.3, seed=5)
    grpo.make_generator(args, None, None, "/models/policy")
    assert made == {"model_path": "/models/policy", "gpu_memory_utilization": 0.3, "seed": 5}
    # the loop's rollout sampling params, as vLLM receives them
    s = args.settings(get_reward("r1_zero"))
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            min_new_tokens=s.min_new_tokens, stop=s.stop, seed=7)
    kw = vllm_mod.to_vllm_sampling_kwargs(params)
    assert kw["stop"] == ["</answer>"] and kw["min_tokens"] == 4 and kw["max_tokens"] == 1024
    assert kw["temperature"] == 1.0 and kw["seed"] == 7
    with pytest.raises(ValueError, match="http_base_url and train.http_model"):
        grpo.make_generator(grpo.GRPOArgs(rollout_backend="http"), None, None)


def test_trl_reward_wrapper_signature():
    fns = grpo.trl_reward_funcs(get_reward("r1_zero"), ["</answer>"])
    completions = ["a </think> <answer>4</answer> trailing text TRL did not stop", "a </think> <answer>5",
                   "no format"]
    out = [f(prompts=["p"] * 3, completions=completions, answer=["4", "4", "4"], trainer_state=None) for f in fns]
    assert [f.__name__ for f in fns] == ["reward", "format_reward", "answer_reward"]
    assert out == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


@pytest.mark.slow
def test_trl_engine_two_steps(tmp_path, tiny_model_dir):
    stage = _recipe(tmp_path, tiny_model_dir, engine="trl", n_grpo_steps=2, log_every=1)
    result = grpo.run(stage, tmp_path / "run", None)
    assert (Path(result["model_dir"]) / "config.json").exists()
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in ln or "rewards/reward/mean" in ln for ln in logs)
    assert result["before_after"]["val_reward"]["after"] is not None


def test_recipes_parse():
    for name in ("grpo.yaml", "grpo_quickstart.yaml"):
        stage = load_recipe(ROOT / "recipes" / name).stages["grpo"]
        assert isinstance(stage.train, grpo.GRPOArgs)
