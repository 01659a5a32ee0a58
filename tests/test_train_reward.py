"""Reward-model stage on the tiny model: TRL RewardTrainer on a one-output classifier."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_stage
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.train import reward
from alignkit.train.callbacks import read_metrics

PAIRS = [{"prompt": f"Q{i}: add {i} and {i}.", "chosen": f" It is {2 * i}.", "rejected": f" Nope {i}!"}
         for i in range(4)]


def _stage(tmp_path, model_dir, *overrides):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return load_stage(tmp_path, "reward", f"stage: reward\nmodel: {{name_or_path: {model_dir}}}\n"
                      f"data: {{path: {data}}}\n"
                      "train: {max_steps: 1, per_device_train_batch_size: 4, max_length: 64, logging_steps: 1, "
                      "report_to: none, gradient_checkpointing: false, save_strategy: 'no', learning_rate: 0.0, "
                      "seed: 0}\n", overrides)


def test_reward_loss_is_bradley_terry_of_the_model(tmp_path, tiny_model_dir):
    # lr 0 and one batch holding every pair: the logged loss is the BT loss of the (saved) initial model
    stage = _stage(tmp_path, tiny_model_dir)
    result = reward.run(stage, tmp_path / "out", None)
    logged = next(r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r)
    model = AutoModelForSequenceClassification.from_pretrained(result["model_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(result["model_dir"])
    assert model.config.num_labels == 1

    def score(text):
        ids = torch.tensor([tok(text + tok.eos_token)["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids).logits[0, 0].double()

    diffs = torch.stack([score(p["prompt"] + p["chosen"]) - score(p["prompt"] + p["rejected"]) for p in PAIRS])
    assert logged["loss"] == pytest.approx(float(-torch.nn.functional.logsigmoid(diffs).mean()), rel=1e-4)
    assert logged["accuracy"] == pytest.approx(float((diffs > 0).double().mean()))
    assert logged["margin"] == pytest.approx(float(diffs.mean()), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_reward_lora_trains_score_head(tmp_path, tiny_model_dir):
    stage = _stage(tmp_path, tiny_model_dir, "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2",
                   "train.max_steps=3")
    result = reward.run(stage, tmp_path / "out", None)
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]  # same 4 pairs every step: the loss falls
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(result["model_dir"])
    assert merged.config.num_labels == 1


def test_reward_reads_the_preference_data_keys(tmp_path, tiny_model_dir):
    from alignkit.config import RecipeError
    from alignkit.train import dpo, reward

    assert reward.DATA_KEYS == dpo.DATA_KEYS  # the same loader (dpo.preference_loader)
    assert _stage(tmp_path, tiny_model_dir, "data.format=prompt_chosen_rejected").data.format == \
        "prompt_chosen_rejected"
    with pytest.raises(RecipeError, match=r"data\.packing is read by stages sft; this recipe's stage is reward"):
        _stage(tmp_path, tiny_model_dir, "data.packing=alignkit")
