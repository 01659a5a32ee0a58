"""KTO stage on TRL's KTOTrainer: the logged loss is TRL's KTO formula of the logged rewards and KL; runs on
the tiny model (LoRA and full fine-tuning with paired data unpaired on the fly); settings refused up front."""
from __future__ import annotations

import json
import math

import pytest
from conftest import load_stage
from transformers import AutoModelForCausalLM

from alignkit.train import STAGES, kto


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _unpaired(path, n=8):
    """Alternating labels, so every batch of 2 (sequential, unshuffled) has one desirable and one undesirable."""
    return _write(path, [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}." if i % 2 == 0
                          else f"No idea about {i}.", "label": i % 2 == 0} for i in range(n)])


def _recipe(tmp_path, model_dir, data, overrides=()):
    return load_stage(tmp_path, "kto", f"stage: kto\nmodel: {{name_or_path: {model_dir}, dtype: float32}}\n"
                      f"data: {{path: {data}}}\n"
                      "train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                      "report_to: none, gradient_checkpointing: false, save_strategy: 'no', "
                      "learning_rate: 5.0e-2, beta: 0.5}\n", overrides)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _train_rows(stage_dir):
    metrics = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in metrics if "loss" in m and "kl" in m]


def test_stage_registered():
    assert STAGES["kto"] is kto and kto.ARGS_CLASS is kto.KTOArgs


def test_lora_run_loss_is_trls_kto_formula(tmp_path, tiny_model_dir):
    """TRL 1.16 KTOTrainer._compute_loss with one desirable and one undesirable row per batch:
    loss = ((1 - s(r_c - beta z)) + (1 - s(beta z - r_r))) / 2, with r_c = rewards/chosen, r_r =
    rewards/rejected (beta times the log-ratio) and z = kl, all logged. Step 1: LoRA B = 0, the policy is the
    reference, so the rewards are 0 and the loss 1/2; step 2 follows an update."""
    stage = _recipe(tmp_path, tiny_model_dir, _unpaired(tmp_path / "kto.jsonl"),
                    ["lora.enabled=true", "lora.r=4", "train.shuffle_rows=false"])
    out = tmp_path / "out"
    result = kto.run(stage, out, None)
    rows = _train_rows(out)
    assert [m["step"] for m in rows] == [1, 2]
    beta = 0.5
    for m in rows:
        r_c, r_r, z = m["rewards/chosen"], m["rewards/rejected"], m["kl"]
        expected = ((1 - _sigmoid(r_c - beta * z)) + (1 - _sigmoid(beta * z - r_r))) / 2
        assert m["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), m
        assert m["rewards/margins"] == pytest.approx(r_c - r_r, abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert rows[1]["rewards/chosen"] != 0 and rows[1]["loss"] != rows[0]["loss"]  # it trained
    assert result["adapter_dir"] == str(out / "final") and (out / "curves.png").is_file()
    assert AutoModelForCausalLM.from_pretrained(result["model_dir"]).config.vocab_size == 50257
    report = json.loads((out / "data_check_train.json").read_text())
    assert (report["kind"], report["rows_read"], report["rows_kept"]) == ("unpaired", 8, 8)


def test_full_finetune_on_pairs_unpaired(tmp_path, tiny_model_dir):
    """Paired data (chosen/rejected) is unpaired on the fly; full fine-tuning uses an explicit frozen reference;
    the held-out rows are evaluated."""
    pairs = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"No idea {i}."}
             for i in range(6)]
    stage = _recipe(tmp_path, tiny_model_dir, _write(tmp_path / "pairs.jsonl", pairs),
                    ["data.val_size=4", "train.per_device_eval_batch_size=2"])
    out = tmp_path / "out"
    result = kto.run(stage, out, None)
    assert [m["step"] for m in _train_rows(out)] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in _train_rows(out))
    assert "eval_loss" in result["metrics"] and (out / "final" / "config.json").is_file()
    report = json.loads((out / "data_check_train.json").read_text())
    assert (report["format"], report["rows_read"], report["rows_kept"]) == ("prompt_chosen_rejected -> unpaired",
                                                                            12, 12)


def test_refused_settings(tmp_path, tiny_model_dir):
    data = _unpaired(tmp_path / "kto.jsonl")
    with pytest.raises(ValueError, match="train_sampling_strategy='random'.*needs 'sequential'"):
        _recipe(tmp_path, tiny_model_dir, data, ["train.train_sampling_strategy=random"])
    with pytest.raises(ValueError, match="per_device_train_batch_size=1.*needs at least 2"):
        _recipe(tmp_path, tiny_model_dir, data, ["train.per_device_train_batch_size=1"])
    apo = _recipe(tmp_path, tiny_model_dir, data, ["train.loss_type=apo_zero_unpaired",
                                                   "train.per_device_train_batch_size=1"])
    assert apo.train.loss_type == "apo_zero_unpaired"  # no KL term: one row per batch is fine
    with pytest.raises(ValueError, match=r"train\.ref_model_sync_steps is read with train\.sync_ref_model: true"):
        _recipe(tmp_path, tiny_model_dir, data, ["train.ref_model_sync_steps=8"])


def test_ignored_keys_contract(tmp_path, tiny_model_dir):
    stage = _recipe(tmp_path, tiny_model_dir, _unpaired(tmp_path / "kto.jsonl"))
    keys = kto.ignored_keys(stage)
    task_eval_sizes = {"train.task_eval_limit", "train.task_eval_max_new_tokens", "train.task_eval_batch_size",
                       "train.task_eval_prompt"}  # read only with train.task_eval
    assert set(keys) == {"train.ref_model_mixup_alpha", "train.ref_model_sync_steps",
                         "train.precompute_ref_batch_size"} | task_eval_sizes
    assert all(msg.startswith(k + " is ") and "\n" not in msg for k, msg in keys.items())
    synced = _recipe(tmp_path, tiny_model_dir, _unpaired(tmp_path / "kto.jsonl"),
                     ["train.sync_ref_model=true", "train.precompute_ref_log_probs=true",
                      "train.task_eval=[safety]", "train.task_eval_steps=10"])
    assert kto.ignored_keys(synced) == {}


def test_shipped_recipe_runs_on_tiny_chat_model(tmp_path, tiny_model_dir):
    """recipes/kto.yaml as shipped (quickstart:dpo pairs, template chat, LoRA) on the tiny model with a chat
    template, cut to one step: the pipeline builds the data, checks it (report saved) and trains."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from alignkit import pipeline
    from alignkit.config import load_recipe

    model = shutil.copytree(tiny_model_dir, tmp_path / "chat-model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(model)
    path = Path(__file__).resolve().parents[1] / "recipes" / "kto.yaml"
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model}",
                                "data.max_rows=4", "train.max_steps=1", "train.gradient_accumulation_steps=1",
                                "train.logging_steps=1", "train.max_length=512"])
    assert pipeline.run_recipe(recipe) == 0
    stage_dir = recipe.stage_dir("kto")
    report = json.loads((stage_dir / "data_check_train.json").read_text())
    assert (report["kind"], report["rows_read"], report["rows_kept"]) == ("unpaired", 8, 8)
    assert json.loads((stage_dir / "state.json").read_text())["result"]["global_step"] == 1
    assert [m["step"] for m in _train_rows(stage_dir)] == [1]


def test_kl_term_with_a_reference_unlike_the_policy(tmp_path, tiny_model_dir):
    """With a reference unlike the policy the KL estimate z is positive, and TRL's loss on one batch (one
    desirable, one undesirable row) is the weighted KTO formula with the KL term: (w_d (1 - s(r_c - beta z)) +
    w_u (1 - s(beta z - r_r))) / 2, from the rewards and z the trainer records."""
    import torch
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer
    from trl import KTOTrainer

    from alignkit.data.unpaired import UnpairedExample

    ref_dir = build_tiny_llama(tmp_path / "ref", seed=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    rows = [UnpairedExample(f"What is {i} plus {i}?", f"It is {2 * i}." if i % 2 == 0 else f"No idea about {i}.",
                            i % 2 == 0) for i in range(4)]
    beta, w_d, w_u = 0.5, 1.5, 1.0
    args = kto.KTOArgs(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_length=48,
                       report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, beta=beta,
                       desirable_weight=w_d, undesirable_weight=w_u)
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32), args=args,
                         train_dataset=kto.to_trl_examples(rows, None), processing_class=tok)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["label"].tolist() == [True, False]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    logged = trainer._metrics["train"]
    z, r_c, r_r = logged["kl"][-1], logged["rewards/chosen"][-1], logged["rewards/rejected"][-1]
    assert z > 0.05
    expected = (w_d * (1 - _sigmoid(r_c - beta * z)) + w_u * (1 - _sigmoid(beta * z - r_r))) / 2
    assert loss == pytest.approx(expected, rel=1e-5)
    without_kl = (w_d * (1 - _sigmoid(r_c)) + w_u * (1 - _sigmoid(-r_r))) / 2
    assert abs(loss - without_kl) > 1e-3  # the KL term mattered
