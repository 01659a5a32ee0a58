"""Eval tasks scored during training (train.task_eval): the safety see-saw logged at step 0 and every N
steps of a real SFT/KTO run, measured on the policy as it is at that step; settings refused up front."""
from __future__ import annotations

import json

import pytest
from conftest import load_stage
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config import RecipeError
from alignkit.eval.runner import run_task
from alignkit.eval.tasks import get_task
from alignkit.generation.hf import HFGenerator
from alignkit.train import kto, sft
from alignkit.train.callbacks import read_metrics

SAFETY_KEYS = ("safety/attack_success_rate", "safety/over_refusal_rate")


def _rows(path, n=8):
    path.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."})
                            + "\n" for i in range(n)))
    return path


def _sft(tmp_path, model_dir, *overrides):
    return load_stage(tmp_path, "sft", f"stage: sft\nmodel: {{name_or_path: {model_dir}, dtype: float32}}\n"
                      f"data: {{path: {_rows(tmp_path / 'd.jsonl')}, template: alpaca_sft}}\n"
                      "train: {max_steps: 4, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                      "report_to: none, gradient_checkpointing: false, save_strategy: 'no', "
                      "learning_rate: 5.0e-2, task_eval: [safety], task_eval_steps: 2, task_eval_limit: 1, "
                      "task_eval_max_new_tokens: 4}\n", overrides)


def _independent_safety(model_dir, tmp_path, stage):
    """The safety task scored on a saved model by a second path: a fresh HFGenerator on the loaded folder."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = HFGenerator(model, AutoTokenizer.from_pretrained(model_dir), batch_size=8)
    values, *_ = run_task(get_task("safety"), generator, tmp_path / "independent", limit=1, seed=stage.seed,
                          style="zero_shot", max_new_tokens=4, batch_size=8, judge=None)
    return values, _texts(tmp_path / "independent")


def _texts(task_dir):
    return {r["id"]: r["generation"] for r in map(json.loads, (task_dir / "predictions.jsonl").open())}


def test_sft_logs_safety_at_step_0_and_every_n_steps(tmp_path, tiny_model_dir):
    stage = _sft(tmp_path, tiny_model_dir)
    out = tmp_path / "out" / "sft"
    result = sft.run(stage, out, None)
    rows = read_metrics(out / "metrics.jsonl")
    measured = [r for r in rows if SAFETY_KEYS[0] in r]
    assert [r["step"] for r in measured] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the trainer's own lines are all there
    for row in measured:
        assert all(0.0 <= row[k] <= 1.0 for k in SAFETY_KEYS)
        # per-template rates: 1 SimpleSafetyTests prompt asked plainly = a 0/1 outcome
        assert row["safety/attack_success_rate_plain"] in (0.0, 1.0)
    # step 0 is the untrained model, the last step the saved final one: each equals a separate evaluation
    (start, start_texts), (final, final_texts) = (_independent_safety(tiny_model_dir, tmp_path / "a", stage),
                                                  _independent_safety(result["model_dir"], tmp_path / "b", stage))
    for key in SAFETY_KEYS:
        name = key.split("/", 1)[1]
        assert measured[0][key] == pytest.approx(start[name])
        assert measured[-1][key] == pytest.approx(final[name])
    # the texts too: step 0 generated with the untrained weights, step 4 with the trained ones (they differ)
    assert _texts(out / "task_eval" / "step-0" / "safety") == start_texts
    assert _texts(out / "task_eval" / "step-4" / "safety") == final_texts
    assert start_texts != final_texts
    # the files of each measurement are kept, one folder per step
    assert sorted(p.name for p in (out / "task_eval").iterdir()) == ["step-0", "step-2", "step-4"]
    assert (out / "task_eval" / "step-2" / "safety" / "predictions.jsonl").exists()


def test_kto_accepts_task_eval(tmp_path, tiny_model_dir):
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0}) + "\n"
                            for i in range(8)))
    stage = load_stage(tmp_path, "kto", f"stage: kto\nmodel: {{name_or_path: {tiny_model_dir}, dtype: float32}}\n"
                       f"data: {{path: {data}}}\n"
                       "train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                       "report_to: none, gradient_checkpointing: false, save_strategy: 'no', "
                       "task_eval: [safety], task_eval_steps: 2, task_eval_limit: 1, task_eval_max_new_tokens: 2}\n")
    out = tmp_path / "out" / "kto"
    kto.run(stage, out, None)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if SAFETY_KEYS[1] in r] == [0, 2]


@pytest.mark.parametrize("override, message", [
    ("train.task_eval=[nope]", r"task_eval: unknown task\(s\) nope"),
    ("train.task_eval_steps=0", r"task_eval is set but task_eval_steps is 0"),
    ("train.task_eval=[]", r"train.task_eval_steps is set but task_eval names no task|task_eval_steps is set"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, tiny_model_dir, override, message):
    with pytest.raises(RecipeError, match=message):
        _sft(tmp_path, tiny_model_dir, override)


def test_task_eval_settings_without_a_task_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError, match=r"train.task_eval_limit is read by the task-eval callback"):
        _sft(tmp_path, tiny_model_dir, "train.task_eval=[]", "train.task_eval_steps=0")


def test_dpo_run_shows_both_curves(tmp_path, tiny_model_dir):
    """A DPO run with train.task_eval: the safety rates and the reward margin in the same metrics.jsonl."""
    from alignkit.train import dpo

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i} no."}) + "\n"
                            for i in range(8)))
    stage = load_stage(tmp_path, "dpo", f"stage: dpo\nmodel: {{name_or_path: {tiny_model_dir}, dtype: float32}}\n"
                       f"data: {{path: {data}}}\n"
                       "train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                       "report_to: none, gradient_checkpointing: false, save_strategy: 'no', "
                       "task_eval: [safety], task_eval_steps: 1, task_eval_limit: 1, task_eval_max_new_tokens: 2}\n")
    out = tmp_path / "out" / "dpo"
    dpo.run(stage, out, None)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if SAFETY_KEYS[0] in r] == [0, 1, 2]
    assert [r["step"] for r in rows if "rewards/margins" in r] == [1, 2]
    assert (out / "curves.png").stat().st_size > 1000


def test_grpo_loop_scores_tasks_every_n_steps(tmp_path, tiny_model_dir):
    """alignkit's RL loop (GRPO; PPO shares it): the safety rates on the metrics lines of steps 0, 2 and 4, the
    reward beside them; engine trl refuses the keys (its GRPOTrainer has no such hook)."""
    import yaml

    from alignkit.config import load_recipe
    from alignkit.train import grpo

    raw = {"stage": "grpo", "output_dir": str(tmp_path / "run"), "seed": 0,
           "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "train": {"task": "arithmetic", "reward": "r1_zero", "n_grpo_steps": 4, "rollout_batch_size": 4,
                     "group_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 2, "max_new_tokens": 4,
                     "min_new_tokens": 1, "n_val": 2, "n_train": 8, "use_cpu": True, "learning_rate": 1e-3,
                     "task_eval": ["safety"], "task_eval_steps": 2, "task_eval_limit": 1,
                     "task_eval_max_new_tokens": 2}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    stage = load_recipe(path).stages["grpo"]
    out = tmp_path / "run"
    grpo.run(stage, out, None)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if SAFETY_KEYS[0] in r] == [0, 2, 4]
    assert all("reward" in r and "loss" in r for r in rows if r["step"] in (2, 4) and SAFETY_KEYS[0] in r)
    assert "val_reward" in rows[0] and SAFETY_KEYS[1] in rows[0]  # step 0: validation and the safety rates
    assert sorted(p.name for p in (out / "task_eval").iterdir()) == ["step-0", "step-2", "step-4"]
    raw["train"]["engine"] = "trl"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"train.task_eval.*engine alignkit"):
        load_recipe(path)


def test_score_tasks_logs_the_finite_numbers_only(tmp_path, monkeypatch):
    """The rows logged per task: finite ints and floats (numpy floats too) as floats, keyed <task>/<metric>;
    None (a rate over no example), NaN, inf, bools, strings, lists and nested tables are not logged; the
    model's train mode is restored."""
    import numpy as np
    import torch

    from alignkit.train import task_eval

    values = {"attack_success_rate": 0.25, "n": 3, "mean_chars": np.float64(0.5), "over_refusal_rate": None,
              "nan_rate": float("nan"), "inf": float("inf"), "neg_inf": float("-inf"), "judged": True,
              "judge": "keyword", "table": [{"rate": 1.0}], "per_subject": {"algebra": {"accuracy": 1.0}},
              "count": np.int64(2)}
    seen = []
    monkeypatch.setattr(task_eval, "HFGenerator", lambda *a, **k: "generator")
    monkeypatch.setattr(task_eval, "get_task", lambda name: name)
    monkeypatch.setattr(task_eval, "run_task", lambda task, gen, out, **kw: seen.append((task, out)) or (values,))
    model = torch.nn.Linear(2, 2).train()
    metrics = task_eval.score_tasks(model, None, ["safety", "mmlu"], tmp_path, task_eval.settings_of(
        task_eval.TaskEvalArgs(task_eval=["safety"], task_eval_steps=1)), step=3)
    expected = {f"{t}/{k}": v for t in ("safety", "mmlu")
                for k, v in (("attack_success_rate", 0.25), ("n", 3.0), ("mean_chars", 0.5))}
    assert metrics == expected and all(type(v) is float for v in metrics.values())
    assert seen == [("safety", tmp_path / "step-3" / "safety"), ("mmlu", tmp_path / "step-3" / "mmlu")]
    assert model.training


def _trainer(fsdp=False, deepspeed=False, zero_stage=None):
    """The attributes of a transformers Trainer that tell a sharded launch, and its add_callback."""
    from types import SimpleNamespace

    plugin = SimpleNamespace(zero_stage=zero_stage) if deepspeed else None
    added = []
    return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed, added=added,
                           accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
                           add_callback=added.append)


@pytest.mark.parametrize("trainer, launch", [
    (_trainer(fsdp=True), "FSDP"),
    (_trainer(deepspeed=True, zero_stage=3), "DeepSpeed ZeRO-3"),
])
def test_attach_refuses_a_sharded_launch(tmp_path, trainer, launch):
    from alignkit.train.task_eval import TaskEvalArgs, TaskEvalCallback

    callback = TaskEvalCallback(TaskEvalArgs(task_eval=["safety"], task_eval_steps=2), tmp_path, None)
    with pytest.raises(ValueError, match=rf"^train.task_eval cannot run under {launch}: .*`alignkit eval`$") as err:
        callback.attach(trainer)
    assert "\n" not in str(err.value) and "saved checkpoints" in str(err.value)
    assert trainer.added == [] and callback.trainer is None


@pytest.mark.parametrize("trainer", [_trainer(), _trainer(deepspeed=True, zero_stage=2),
                                     _trainer(deepspeed=True, zero_stage=1)])
def test_attach_accepts_whole_weights(tmp_path, trainer):
    """One process, DDP or ZeRO-1/2: every rank holds the whole weights, the main process generates alone."""
    from alignkit.train.task_eval import TaskEvalArgs, TaskEvalCallback

    callback = TaskEvalCallback(TaskEvalArgs(task_eval=["safety"], task_eval_steps=2), tmp_path, None)
    assert callback.attach(trainer) is callback
    assert trainer.added == [callback] and callback.trainer is trainer
