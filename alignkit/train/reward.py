"""Reward-model stage: TRL's ``RewardTrainer`` on ``AutoModelForSequenceClassification(num_labels=1)``
(Bradley-Terry loss ``-log sigmoid(r(x, y_w) - r(x, y_l))``, Ouyang et al. 2022 Eq. 1); stage-module
contract: see alignkit/train/__init__.py. Logged by TRL: accuracy, margin, min/mean/max reward."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForSequenceClassification, set_seed
from trl import RewardConfig, RewardTrainer

from alignkit.train import common
from alignkit.train.dpo import DATA_KEYS, preference_loader, to_trl_pairs

__all__ = ["ARGS_CLASS", "DATA_KEYS", "RewardArgs", "run"]  # DATA_KEYS: the same preference data path as DPO


@dataclass
class RewardArgs(RewardConfig):
    """``trl.RewardConfig`` (fields 1:1). Best checkpoint: ``load_best_model_at_end: true`` with
    ``metric_for_best_model: eval_accuracy``."""

    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "Loggers: tensorboard (default), wandb, mlflow (when installed), none, or a list."})


ARGS_CLASS = RewardArgs


def run(recipe, stage_dir, model_path=None) -> dict:
    """Train a scalar reward model on preference pairs; returns the stage result."""
    stage_dir = Path(stage_dir)
    set_seed(recipe.seed)
    # 1. a one-output classifier on the base model (the score head is new: trained in full under LoRA)
    model, tokenizer, source = common.load_for_training(
        recipe, model_path, model_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = common.lora_config(recipe.lora, task_type="SEQ_CLS")
    # 2. checked data; 3. trainer; 4. train and save (no merge: the next user loads the classifier)
    train_pairs, val_pairs = common.load_split(recipe.data, preference_loader(recipe, tokenizer, stage_dir),
                                               recipe.seed)
    train_ds = to_trl_pairs(train_pairs, recipe.data.template)
    eval_ds = to_trl_pairs(val_pairs, recipe.data.template) if val_pairs else None
    trainer = RewardTrainer(model=model, args=recipe.train, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=common.stage_callbacks(stage_dir))
    return common.train_and_save(trainer, recipe, stage_dir, tokenizer, source)
