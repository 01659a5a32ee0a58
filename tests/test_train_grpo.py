"""The GRPO stage module: GRPOArgs, data, recipe -> run() on the tiny model, TRL engine, backends."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import alignkit.generation.factory as factory_mod
import alignkit.generation.vllm as vllm_mod
from alignkit.config import DataArgs, LoraArgs, load_recipe
from alignkit.generation.base import SamplingParams
from alignkit.generation.hf import HFGenerator
from alignkit.generation.openai_http import OpenAIHTTPGenerator
from alignkit.rl.loop import GRPOConfig, GRPOLoop
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
    s = args.loop_config(get_reward("r1_zero"))
    assert isinstance(s, GRPOConfig) and s.group_size == 4 and s.loss_type == "grpo_clip"
    assert s.stop == ["</answer>"] and s.append_stop and not s.sync_weights
    assert grpo.GRPOArgs(stop=[]).loop_config(get_reward("r1_zero")).append_stop is False
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
    made = {}

    class FakeVLLM:
        def __init__(self, model_path, **kw):
            made.update(model_path=model_path, **kw)

    monkeypatch.setattr(vllm_mod, "VLLMGenerator", FakeVLLM)
    monkeypatch.setattr(factory_mod, "VLLMGenerator", FakeVLLM, raising=False)  # if the factory imports it
    args = grpo.GRPOArgs(rollout_backend="vllm", vllm_gpu_memory_utilization=0.3, seed=5)
    grpo.rollout_generator(args, None, None, "/models/policy")
    assert made == {"model_path": "/models/policy", "gpu_memory_utilization": 0.3, "seed": 5}
    # the loop's rollout sampling params, as vLLM receives them
    s = args.loop_config(get_reward("r1_zero"))
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            min_new_tokens=s.min_new_tokens, stop=s.stop, seed=7)
    kw = vllm_mod.to_vllm_sampling_kwargs(params)
    assert kw["stop"] == ["</answer>"] and kw["min_tokens"] == 4 and kw["max_tokens"] == 1024
    assert kw["temperature"] == 1.0 and kw["seed"] == 7
    with pytest.raises(ValueError, match="http_base_url and train.http_model"):
        grpo.rollout_generator(grpo.GRPOArgs(rollout_backend="http"), None, None)


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


# ----------------------------------------------------------------------------------------------------------
# One config: the loop's GRPOConfig is the stage's GRPOArgs' base, never restated
# ----------------------------------------------------------------------------------------------------------
def test_one_config_loop_and_stage_share_field_objects():
    loop_fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    stage_fields = {f.name: f for f in dataclasses.fields(grpo.GRPOArgs)}
    assert issubclass(grpo.GRPOArgs, GRPOConfig)
    for name, f in loop_fields.items():
        assert f.metadata.get("help"), f"GRPOConfig.{name} has no help"
        g = stage_fields[name]
        assert g is f, f"GRPOArgs re-declares the loop field {name}"  # the very same Field object
        assert (g.default, g.default_factory, g.metadata["help"]) == (f.default, f.default_factory, f.metadata["help"])
    # the stage adds only stage-level fields, none of them the loop reads
    own = set(stage_fields) - set(loop_fields)
    assert {"engine", "task", "reward", "prompt", "rollout_backend", "http_base_url", "http_model", "n_train",
            "n_val", "learning_rate"} <= own
    # defaults once: a bare stage section and a bare loop config agree on every loop field
    bare_stage, bare_loop = grpo.GRPOArgs(), GRPOConfig()
    assert all(getattr(bare_stage, n) == getattr(bare_loop, n) for n in loop_fields)
    assert bare_loop.resume is False  # a fresh run does not resume unless asked (recipe default: resume false)


def test_loop_config_derives_only_the_computed_values(tmp_path):
    preset = get_reward("r1_zero")
    args = grpo.GRPOArgs(stop=["\n\n"], group_size=4, rollout_batch_size=16, train_batch_size=16)
    cfg = args.loop_config(preset, resume=True, output_dir=str(tmp_path))
    changed = {f.name for f in dataclasses.fields(GRPOConfig) if getattr(cfg, f.name) != getattr(args, f.name)}
    assert changed <= {"stop", "append_stop", "sync_weights", "resume", "output_dir"}
    assert cfg.stop == ["\n\n"] and cfg.append_stop is True and cfg.sync_weights is True  # user's stop kept
    assert cfg.resume is True and cfg.output_dir == str(tmp_path) and isinstance(cfg, GRPOConfig)
    assert args.loop_config(preset).resume is False and args.resume is False  # args itself untouched


def test_loop_runs_directly_on_a_stage_section(tiny_model, gpt2_tokenizer):
    """GRPOLoop takes the stage's section (a GRPOConfig) as it is: no copy into a second settings class."""
    class Gen:
        def generate(self, prompts, params):
            return [SimpleNamespace(text=" 1 </think> <answer>2", num_tokens=3, finish_reason="stop")
                    for _ in prompts]

        def update_weights(self, model):
            pass

    args = grpo.GRPOArgs(rollout_batch_size=2, group_size=2, train_batch_size=2, gradient_accumulation_steps=1,
                         max_new_tokens=4).loop_config(get_reward("r1_zero"))
    loop = GRPOLoop(tiny_model, gpt2_tokenizer, Gen(), get_reward("r1_zero").fn, ["p"], ["2"],
                    torch.optim.SGD(tiny_model.parameters(), lr=0.0), args)
    assert loop.s is args and loop.micro_batch_size == 2  # 2 // (1 accumulation step x 1 process)


# ----------------------------------------------------------------------------------------------------------
# Nothing silently ignored: ignored_keys per engine / backend / loss / task
# ----------------------------------------------------------------------------------------------------------
def _stage(lora=False, **train):
    return SimpleNamespace(train=grpo.GRPOArgs(**train), data=DataArgs(), lora=LoraArgs(enabled=lora))


DERIVED = {"train.append_stop", "train.sync_weights", "train.resume"}
DATA_UNREAD = {f"data.{f.name}" for f in dataclasses.fields(DataArgs)} - {"data.path", "data.eval_path",
                                                                          "data.columns", "data.template"}


def _train_keys(ignored: dict) -> set[str]:
    return {k for k in ignored if k.startswith("train.")}


# the task-eval sizes are unread without train.task_eval; engine trl reads none of the task-eval keys
TASK_EVAL_SIZES = {"train.task_eval_limit", "train.task_eval_max_new_tokens", "train.task_eval_batch_size",
                   "train.task_eval_prompt"}


def test_ignored_keys_default_alignkit_hf():
    ignored = grpo.ignored_keys(_stage())
    assert _train_keys(ignored) == DERIVED | {"train.http_base_url", "train.http_model",
                                             "train.vllm_gpu_memory_utilization", "train.bf16",
                                             "train.cliprange", "train.normalize_constant",
                                             "train.arithmetic_max"} | TASK_EVAL_SIZES
    assert "read by the task-eval callback" in ignored["train.task_eval_limit"]
    assert ignored["train.bf16"] == "train.bf16 is read by engine trl; this recipe's engine is alignkit"
    assert ignored["train.cliprange"] == ("train.cliprange is read by engine alignkit with loss_type grpo_clip; this recipe's "
                                          "loss_type is reinforce_with_baseline")
    assert ignored["train.http_model"] == ("train.http_model is read by engine alignkit with rollout_backend http; this recipe's "
                                           "rollout_backend is hf")
    assert "not a recipe key" in ignored["train.resume"] and "top-level resume" in ignored["train.resume"]
    # data: only path / eval_path, for gsm8k; lora off: its settings unread
    assert {k for k in ignored if k.startswith("data.")} == DATA_UNREAD
    assert {k for k in ignored if k.startswith("lora.")} == {f"lora.{f.name}" for f in dataclasses.fields(LoraArgs)
                                                             if f.name != "enabled"}
    assert not any(k.startswith("lora.") for k in grpo.ignored_keys(_stage(lora=True)))


def test_ignored_keys_engine_trl():
    ignored = grpo.ignored_keys(_stage(engine="trl"))
    assert "train.loss_type" not in ignored  # mapped: TRL's clipped objective (on-policy = the baseline loss)
    assert _train_keys(ignored) == DERIVED | {"train.http_base_url", "train.http_model",
                                             "train.vllm_gpu_memory_utilization", "train.advantage_eps",
                                             "train.normalize_constant", "train.val_samples", "train.eval_every",
                                             "train.rollout_table_every", "train.rollout_table_size",
                                             "train.improvement_sigmas", "train.arithmetic_max",
                                             "train.task_eval", "train.task_eval_steps"} | TASK_EVAL_SIZES
    assert ignored["train.task_eval"].startswith("train.task_eval is read by engine alignkit (the task-eval hook")
    assert ignored["train.eval_every"].startswith("train.eval_every is read by engine alignkit (") and ignored[
        "train.eval_every"].endswith("this recipe's engine is trl")
    assert ignored["train.http_base_url"] == "train.http_base_url is read by engine alignkit; this recipe's engine is trl"
    # trl + vllm: the vLLM memory share is read, the validation batch size too
    vllm = grpo.ignored_keys(_stage(engine="trl", rollout_backend="vllm"))
    assert "train.vllm_gpu_memory_utilization" not in vllm and "train.generation_batch_size" not in vllm


def test_ignored_keys_alignkit_backends_and_loss_conditions():
    vllm = grpo.ignored_keys(_stage(rollout_backend="vllm"))
    assert vllm["train.generation_batch_size"] == ("train.generation_batch_size is read by engine alignkit with rollout_backend hf; this "
                                                   "recipe's rollout_backend is vllm")
    assert "train.vllm_gpu_memory_utilization" not in vllm and "train.http_model" in vllm
    http = grpo.ignored_keys(_stage(rollout_backend="http", http_base_url="http://h/v1", http_model="m"))
    assert {"train.http_base_url", "train.http_model"}.isdisjoint(http)
    assert {"train.generation_batch_size", "train.vllm_gpu_memory_utilization"} <= set(http)
    dr = grpo.ignored_keys(_stage(loss_type="grpo_clip", length_normalization="constant",
                                  use_std_normalization=False))
    assert {"train.cliprange", "train.normalize_constant"}.isdisjoint(dr)
    assert dr["train.advantage_eps"] == ("train.advantage_eps is read by engine alignkit with use_std_normalization True; this "
                                         "recipe's use_std_normalization is False")


def test_ignored_keys_task_arithmetic_data_paths():
    ignored = grpo.ignored_keys(_stage(task="arithmetic"))
    assert ignored["data.path"] == "data.path is read by task gsm8k; this recipe's task is arithmetic"
    assert "data.eval_path" in ignored and "train.arithmetic_max" not in ignored
    assert ignored["data.columns"] == "data.columns is read by task gsm8k; this recipe's task is arithmetic"
    assert "data.template" not in ignored  # the prompt's rendering: every task reads it
    gsm8k = grpo.ignored_keys(_stage(task="gsm8k"))
    assert "data.path" not in gsm8k
    assert gsm8k["train.arithmetic_max"] == "train.arithmetic_max is read by task arithmetic; this recipe's task is gsm8k"


def test_ignored_keys_cover_every_field_trl_does_not_map():
    """Under engine trl every train field is either refused (ignored_keys), sent to TRL's config
    (TRL_NAMES) or read by run_trl itself (TRL_STAGE_READS): nothing falls between."""
    for backend in ("hf", "vllm"):
        ignored = _train_keys(grpo.ignored_keys(_stage(engine="trl", rollout_backend=backend, task="arithmetic")))
        for f in dataclasses.fields(grpo.GRPOArgs):
            read = f.name in grpo.TRL_NAMES or f.name in grpo.TRL_STAGE_READS or f.name == "output_dir"
            if f.name == "vllm_gpu_memory_utilization":
                read = backend == "vllm"
            assert read != (f"train.{f.name}" in ignored), (backend, f.name)


def test_shipped_grpo_recipes_set_no_ignored_key():
    for name in ("grpo.yaml", "grpo_quickstart.yaml"):
        raw = yaml.safe_load((ROOT / "recipes" / name).read_text())
        stage = load_recipe(ROOT / "recipes" / name).stages["grpo"]
        ignored = grpo.ignored_keys(stage)
        user = {f"{sec}.{k}" for sec in ("train", "data", "lora") for k in (raw.get(sec) or {})}
        assert not user & set(ignored), (name, {k: ignored[k] for k in user & set(ignored)})


def test_trl_engine_refuses_what_trl_cannot_run():
    with pytest.raises(ValueError, match="train.loss_type=no_baseline is read by engine alignkit only"):
        grpo.GRPOArgs(engine="trl", loss_type="no_baseline")
    with pytest.raises(ValueError, match="set train.loss_type=grpo_clip"):
        grpo.GRPOArgs(engine="trl", epochs_per_rollout_batch=2)  # off-policy: TRL clips, alignkit would not
    with pytest.raises(ValueError, match="train.rollout_backend=http is read by engine alignkit only"):
        grpo.GRPOArgs(engine="trl", rollout_backend="http")
    grpo.GRPOArgs(engine="trl", epochs_per_rollout_batch=2, loss_type="grpo_clip")  # the same objective: fine


# ----------------------------------------------------------------------------------------------------------
# What engine trl reads reaches TRL's GRPOConfig (built, not trained)
# ----------------------------------------------------------------------------------------------------------
def test_trl_config_values_by_hand(tmp_path):
    args = grpo.GRPOArgs(engine="trl", n_grpo_steps=3, rollout_batch_size=8, group_size=4, train_batch_size=4,
                         gradient_accumulation_steps=2, epochs_per_rollout_batch=2, loss_type="grpo_clip",
                         learning_rate=3e-6, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, cliprange=0.3,
                         beta=0.04, use_std_normalization=False, length_normalization="constant",
                         max_new_tokens=32, min_new_tokens=3, temperature=0.7, top_p=0.9, max_grad_norm=None,
                         log_every=2, save_every=1, seed=11, use_cpu=True)
    c = grpo.trl_config(args, tmp_path)
    # 8 rollouts / 4 per optimizer step = 2 optimizer steps per pass, x 2 passes = 4 per GRPO step
    assert (c.max_steps, c.logging_steps, c.save_steps) == (3 * 4, 2 * 4, 1 * 4)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (4 // 2, 2)
    assert (c.generation_batch_size, c.steps_per_generation, c.num_generations, c.num_iterations) == (8, 4, 4, 2)
    assert (c.learning_rate, c.weight_decay, c.adam_beta1, c.adam_beta2) == (3e-6, 0.1, 0.8, 0.9)
    assert (c.epsilon, c.beta, c.scale_rewards, c.loss_type) == (0.3, 0.04, "none", "dr_grpo")
    assert (c.max_completion_length, c.generation_kwargs) == (32, {"min_new_tokens": 3})
    assert (c.temperature, c.top_p, c.max_grad_norm, c.seed, c.use_vllm) == (0.7, 0.9, 0.0, 11, False)
    assert c.reward_weights == [1.0, 0.0, 0.0] and c.output_dir == str(tmp_path)
    vllm = grpo.trl_config(dataclasses.replace(args, rollout_backend="vllm", vllm_gpu_memory_utilization=0.4),
                           tmp_path)
    assert vllm.use_vllm and vllm.vllm_gpu_memory_utilization == 0.4 and vllm.generation_kwargs == {"min_tokens": 3}


ALTERNATIVES = {"learning_rate": 2e-5, "weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.9, "n_grpo_steps": 5,
                "rollout_batch_size": 16, "train_batch_size": 4, "gradient_accumulation_steps": 4,
                "group_size": 2, "epochs_per_rollout_batch": 2, "max_new_tokens": 16, "min_new_tokens": 1,
                "temperature": 0.5, "top_p": 0.8, "beta": 0.1, "cliprange": 0.1, "use_std_normalization": False,
                "length_normalization": "constant", "max_grad_norm": 0.5, "seed": 3, "log_every": 2,
                "save_every": 1, "rollout_backend": "hf", "vllm_gpu_memory_utilization": 0.5,
                "use_cpu": False, "bf16": True}


def test_every_trl_mapped_field_changes_trl_config(tmp_path):
    base = grpo.GRPOArgs(engine="trl", loss_type="grpo_clip", rollout_batch_size=8, group_size=4,
                         train_batch_size=8, gradient_accumulation_steps=2, n_grpo_steps=2, use_cpu=True,
                         rollout_backend="vllm", vllm_gpu_memory_utilization=0.3)
    assert set(ALTERNATIVES) == set(grpo.TRL_NAMES)
    ref = grpo.trl_config(base, tmp_path)
    for ours, theirs in grpo.TRL_NAMES.items():
        changed = dataclasses.replace(base, **{ours: ALTERNATIVES[ours]})
        got = grpo.trl_config(changed, tmp_path)
        assert getattr(got, theirs) != getattr(ref, theirs), f"train.{ours} does not reach TRL's {theirs}"


def test_rollout_generators_come_from_the_factory(tiny_model, gpt2_tokenizer, caplog):
    hf = grpo.rollout_generator(grpo.GRPOArgs(generation_batch_size=3), tiny_model, gpt2_tokenizer, "/m")
    assert isinstance(hf, HFGenerator) and hf.model is tiny_model and hf.batch_size == 3 and hf.name == "hf:/m"
    args = grpo.GRPOArgs(rollout_backend="http", http_base_url="http://127.0.0.1:1/v1", http_model="served")
    with caplog.at_level(logging.WARNING, logger="alignkit.train.grpo"):
        http = grpo.rollout_generator(args, None, None)
    assert isinstance(http, OpenAIHTTPGenerator) and http.model == "served"
    assert http.base_url == "http://127.0.0.1:1/v1" and "weights are not updated" in caplog.text
    assert grpo.make_generator is factory_mod.make_generator and not hasattr(grpo, "main")  # no twin, no main()


# ----------------------------------------------------------------------------------------------------------
# Kill and resume (issue 14): rerunning the same command continues exactly from the newest checkpoint
# ----------------------------------------------------------------------------------------------------------
KILL_STEPS = 8


def _kill_resume_recipe(tmp_path, model_dir) -> Path:
    (tmp_path / "kill_rewards.py").write_text(
        "def parity(response, ground_truth):\n"
        "    r = float(len(response) % 2)\n"
        "    return {'reward': r, 'format_reward': 1.0, 'answer_reward': r}\n")
    raw = {"stage": "grpo", "output_dir": str(tmp_path / "unused"), "seed": 0, "resume": True,
           "model": {"name_or_path": str(model_dir), "dtype": "float32"},
           "train": {"task": "arithmetic", "reward": "kill_rewards:parity", "n_grpo_steps": KILL_STEPS,
                     "rollout_batch_size": 8, "group_size": 2, "train_batch_size": 4,
                     "gradient_accumulation_steps": 2, "epochs_per_rollout_batch": 2, "loss_type": "grpo_clip",
                     "max_new_tokens": 8, "min_new_tokens": 1, "n_val": 2, "n_train": 32, "use_cpu": True,
                     "learning_rate": 1e-3, "save_every": 1, "rollout_table_every": 1, "rollout_table_size": 1}}
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_then_rerun_continues_exactly(tmp_path, tiny_model_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    recipe = _kill_resume_recipe(tmp_path, tiny_model_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")

    def cmd(out):
        return [sys.executable, "-m", "alignkit", "train", str(recipe), f"output_dir={out}"]

    # 1. the uninterrupted run (in this process: the same pipeline, without a second interpreter start-up)
    from alignkit import pipeline

    full = tmp_path / "full"
    sys.path.insert(0, str(tmp_path))
    try:
        assert pipeline.run_recipe(load_recipe(recipe, [f"output_dir={full}"])) == 0
    finally:
        sys.path.remove(str(tmp_path))
    # 2. the same run, SIGKILLed once a checkpoint exists, then the same command again
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-2" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before a checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    steps_at_kill = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    assert not (run / "DONE").exists() and max(steps_at_kill) < KILL_STEPS
    again = subprocess.run(cmd(run), check=False, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    # 3. final weights equal the uninterrupted run's; every step logged once, with the same loss
    a, b = load_file(full / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # float32 after 6 steps in two processes: CI saw one weight of 2048 off by 1.004e-6
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    m_full, m_run = _metrics(full), _metrics(run)
    assert [m["step"] for m in m_run] == [m["step"] for m in m_full] == [0, *range(1, KILL_STEPS + 1), KILL_STEPS]
    for x, y in zip(m_full, m_run):
        for key in ("loss", "reward", "grad_norm", "val_reward"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-6), (x["step"], key)
    rollout_steps = [json.loads(x)["step"] for x in (run / "rollouts.rank0.jsonl").read_text().splitlines()]
    assert rollout_steps == list(range(1, KILL_STEPS + 1))  # one table row per step, none twice


# ----------------------------------------------------------------------------------------------------------
# data.columns and data.template: chat (the prompt as a user message through the policy's chat template)
# ----------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _data(**kw):
    return DataArgs(**kw)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_columns_map_recipe_names_onto_question_and_answer(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"problem": "1+1?", "solution": "#### 2", "id": 0},
                                              {"problem": "2+3?", "solution": "#### 5", "id": 1}])
    val = _write(tmp_path / "val.jsonl", [{"problem": "4+4?", "solution": "#### 8"}])
    data = _data(path=train, eval_path=val, columns={"question": "problem", "answer": "solution"})
    got_train, got_val = grpo.load_examples(grpo.GRPOArgs(), data)
    assert [(r["question"], r["answer"]) for r in got_train] == [("1+1?", "#### 2"), ("2+3?", "#### 5")]
    assert [(r["question"], r["answer"]) for r in got_val] == [("4+4?", "#### 8")]
    # only the recipe's files are mapped: without eval_path the bundled GSM8K test split (question/answer) is read
    _, bundled = grpo.load_examples(grpo.GRPOArgs(n_val=2), _data(path=train, columns={"question": "problem",
                                                                                       "answer": "solution"}))
    first = json.loads((ROOT / "alignkit/resources/data/gsm8k/test.jsonl").read_text().splitlines()[0])
    assert bundled[0]["question"] == first["question"] and len(bundled) == 2


def test_columns_errors_name_file_line_and_field(tmp_path):
    mapping = {"question": "problem", "answer": "solution"}
    missing = _write(tmp_path / "train.jsonl", [{"problem": "1+1?", "solution": "2"}, {"problem": "2+2?"}])
    with pytest.raises(ValueError, match=r"train.jsonl line 2: field 'solution': missing \(mapped to 'answer'\)"):
        grpo.load_examples(grpo.GRPOArgs(), _data(path=missing, eval_path=missing, columns=mapping))
    typed = _write(tmp_path / "typed.jsonl", [{"problem": 7, "solution": "  "}])
    with pytest.raises(ValueError, match=r"typed.jsonl line 1: fields problem, solution: problem: expected a "
                                         r"string, got int; solution: empty text"):
        grpo.load_examples(grpo.GRPOArgs(), _data(path=typed, eval_path=typed, columns=mapping))
    with pytest.raises(ValueError, match=r"data.columns: unknown target\(s\) prompt; this task maps onto "
                                         r"question, answer"):
        grpo.load_examples(grpo.GRPOArgs(), _data(path=missing, columns={"prompt": "problem"}))


def test_chat_template_renders_each_prompt_as_a_user_message(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 1 + 1?", "answer": "2"}]
    template = grpo.prompt_template(grpo.GRPOArgs(), get_reward("r1_zero"))
    plain, answers = grpo.format_prompts(rows, template)
    chat, chat_answers = grpo.format_prompts(rows, template, tokenizer, "chat")
    expected = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in plain]
    assert chat == expected and chat_answers == answers == ["5", "2"]
    assert chat[0] == f"<user>{plain[0]}\n<assistant>"  # by hand, from CHAT_TEMPLATE
    assert grpo.format_prompts(rows, template, tokenizer, None)[0] == plain  # unset: plain text, as before


def test_chat_template_drops_a_bos_the_tokenizer_adds_itself(gpt2_tokenizer):
    class AddsBos:  # a Llama-like tokenizer: its template writes BOS and encoding adds BOS too
        chat_template, bos_token, bos_token_id = "x", "<s>", 1

        def __call__(self, text):
            return {"input_ids": [1, 5]}

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<s>[U]{messages[0]['content']}[A]"

    assert grpo.chat_prompts(["hi"], AddsBos()) == ["[U]hi[A]"]  # the generator/TRL encoding adds <s> once


def test_chat_template_refusals(gpt2_tokenizer):
    with pytest.raises(ValueError, match="data.template=chat: the tokenizer of .* has no chat template; unset "
                                         "data.template"):
        grpo.format_prompts([{"question": "q", "answer": "a"}], "{question}", gpt2_tokenizer, "chat")
    with pytest.raises(ValueError, match="data.template='alpaca_sft': stage grpo takes chat"):
        grpo.format_prompts([{"question": "q", "answer": "a"}], "{question}", gpt2_tokenizer, "alpaca_sft")


def _chat_model_dir(tmp_path, tiny_model_dir) -> Path:
    out = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def test_stage_reads_columns_and_template_from_the_recipe(tmp_path, tiny_model_dir, monkeypatch):
    """The recipe loader accepts data.columns/data.template for grpo; run() hands the loop chat prompts."""
    train = _write(tmp_path / "q.jsonl", [{"problem": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(6)])
    raw = {"stage": "grpo", "output_dir": str(tmp_path / "run"), "seed": 0,
           "model": {"name_or_path": str(_chat_model_dir(tmp_path, tiny_model_dir)), "dtype": "float32"},
           "data": {"path": train, "eval_path": train, "columns": {"question": "problem", "answer": "solution"},
                    "template": "chat"},
           "train": {"task": "gsm8k", "reward": "r1_zero", "n_val": 2, "use_cpu": True}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    stage = load_recipe(path).stages["grpo"]
    seen = {}

    class Stop(Exception):
        pass

    def fake_loop(policy, tokenizer, generator, fn, prompts, answers, *a, **kw):
        seen.update(prompts=prompts, answers=answers, val=kw["val_prompts"])
        raise Stop

    monkeypatch.setattr(grpo, "GRPOLoop", fake_loop)
    with pytest.raises(Stop):
        grpo.run(stage, tmp_path / "run")
    template = grpo.prompt_template(grpo.GRPOArgs(), get_reward("r1_zero"))
    assert seen["prompts"][0] == "<user>" + template.replace("{question}", "What is 0 + 1?") + "\n<assistant>"
    assert seen["answers"] == [str(i + 1) for i in range(6)] and len(seen["val"]) == 2
    # task arithmetic reads no data file: data.columns is refused there, data.template is not
    raw["train"]["task"] = "arithmetic"
    del raw["data"]["path"], raw["data"]["eval_path"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="data.columns is read by task gsm8k; this recipe's task is arithmetic"):
        load_recipe(path)
    del raw["data"]["columns"]
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).stages["grpo"].data.template == "chat"
