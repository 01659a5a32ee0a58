"""KTO stage: TRL 1.16's ``KTOTrainer`` (``from trl import KTOTrainer``, stable API; ``trl.experimental.kto``
only re-exports it with a deprecation warning) on unpaired thumbs-up/down data.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7), as TRL
computes it per batch: with ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` and the KL estimate
``z = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x))`` on mismatched completions ``y'``
(the batch's completions rotated by one),

    loss = mean( desirable_weight * (1 - sigmoid(r_d - beta z))  for desirable rows,
                 undesirable_weight * (1 - sigmoid(beta z - r_u)) for undesirable rows ).

``loss_type: apo_zero_unpaired`` is TRL's unpaired APO-zero (no KL term). Logged like TRL: loss, kl,
rewards/chosen|rejected|margins, logps/chosen|rejected, logits/chosen|rejected.

Data (:mod:`alignkit.data.unpaired`, checked by :func:`alignkit.data.check.check_unpaired`, the same check
``alignkit data check`` runs): ``prompt``/``completion``/``label`` rows, or preference pairs unpaired on the
fly. TRL reads KTO batches in order (``train_sampling_strategy: sequential``, so that the KL completions
are fixed); ``train.shuffle_rows`` shuffles the training rows once with the recipe's seed first, so that a
batch mixes desirable and undesirable rows from different prompts. The reference model is as in DPO: the
policy with its LoRA adapter disabled, an explicit frozen copy for full fine-tuning, or none with
``precompute_ref_log_probs``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from trl import KTOConfig, KTOTrainer

from alignkit.data.unpaired import to_trl_dataset
from alignkit.train import common, task_eval

logger = logging.getLogger("alignkit.train")

#: the data.* keys this stage reads (common.load_split + the unpaired check); others are refused
DATA_KEYS = frozenset({"path", "split", "format", "columns", "eval_path", "eval_split", "val_size", "max_rows",
                       "max_eval_rows", "max_length", "template", "on_error"})
#: TRL's loss types that estimate the KL term (and so need ordered batches of more than one row)
KL_LOSSES = ("kto",)


@dataclass
class KTOArgs(KTOConfig, task_eval.TaskEvalArgs):
    """``trl.KTOConfig`` (fields 1:1) plus alignkit's row shuffle.

    Defaults are TRL's (beta 0.1, lr 1e-6, desirable/undesirable weights 1.0). With unequal numbers of
    desirable (D) and undesirable (U) rows, the KTO paper (eq. 8) suggests
    ``desirable_weight * D / (undesirable_weight * U)`` in [1, 4/3]; TRL warns when it is out of range.
    """

    shuffle_rows: bool = field(default=True, metadata={
        "help": "Shuffle the training rows once (seeded by the recipe's seed) before TRL's sequential sampler, "
                "so a batch mixes desirable and undesirable rows of different prompts (paired data is "
                "unpaired as all chosen rows, then all rejected rows). false: file order."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "Loggers: tensorboard (default), wandb, mlflow (when installed), none, or a list."})

    def __post_init__(self):
        super().__post_init__()
        self.check_task_eval()
        if self.loss_type in KL_LOSSES and self.train_sampling_strategy != "sequential":
            raise ValueError(f"train.train_sampling_strategy={self.train_sampling_strategy!r}: loss_type "
                             f"{self.loss_type} estimates the KL term from a fixed batch order and needs "
                             "'sequential' (set train.shuffle_rows for a seeded shuffle of the rows)")
        if self.loss_type in KL_LOSSES and self.per_device_train_batch_size < 2:
            raise ValueError(f"train.per_device_train_batch_size={self.per_device_train_batch_size}: loss_type "
                             f"{self.loss_type} estimates the KL term from the other rows of a batch and needs "
                             "at least 2 (loss_type apo_zero_unpaired has no KL term)")


ARGS_CLASS = KTOArgs


def ignored_keys(stage) -> dict[str, str]:
    """Stage-module strictness hook (contract in alignkit/train/__init__.py): TRL's reference-sync and
    precompute settings are read only when their switch is on; task-eval settings with train.task_eval."""
    args, out = stage.train, task_eval.ignored_keys(stage.train)
    if not args.sync_ref_model:
        for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            out[f"train.{name}"] = (f"train.{name} is read with train.sync_ref_model: true (TR-DPO reference "
                                    "sync); this recipe's sync_ref_model is false")
    if not args.precompute_ref_log_probs:
        out["train.precompute_ref_batch_size"] = ("train.precompute_ref_batch_size is read with "
                                                  "train.precompute_ref_log_probs: true; this recipe's "
                                                  "precompute_ref_log_probs is false")
    return out


def to_trl_examples(examples: list, template: str | None):
    """Unpaired examples -> a TRL dataset, with ``data.template`` applied ("chat": user/assistant messages)."""
    return to_trl_dataset([common.templated(ex, template, ("completion",)) for ex in examples], metadata=False)


def unpaired_loader(recipe, tokenizer, stage_dir: Path):
    """``load_fn`` for :func:`common.load_split`: read, check (report saved), keep the clean examples."""
    return common.stage_loader(recipe, "unpaired", tokenizer, stage_dir)


def run(recipe, stage_dir, model_path=None) -> dict:
    """KTO on unpaired data; returns the stage result (model_dir, metrics, model_source)."""
    stage_dir = Path(stage_dir)
    args = recipe.train
    set_seed(recipe.seed)
    # 1. policy (+ explicit frozen reference for full fine-tuning, loaded from a path like the policy)
    model, tokenizer, source, peft_config, ref_model = common.policy_and_reference(
        recipe, model_path, needs_reference=not args.precompute_ref_log_probs)
    # 2. checked data (shuffled once when asked); 3. trainer; 4. train and save
    train_rows, val_rows = common.load_split(recipe.data, unpaired_loader(recipe, tokenizer, stage_dir),
                                             recipe.seed)
    if args.shuffle_rows:
        random.Random(recipe.seed).shuffle(train_rows)
    train_ds = to_trl_examples(train_rows, recipe.data.template)
    eval_ds = to_trl_examples(val_rows, recipe.data.template) if val_rows else None
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=common.stage_callbacks(stage_dir))
    desirable = sum(ex.label for ex in train_rows)
    logger.info("KTO loss %s (beta=%g), %d desirable / %d undesirable rows, reference: %s", args.loss_type,
                args.beta, desirable, len(train_rows) - desirable,
                "precomputed" if args.precompute_ref_log_probs else
                "policy with adapter disabled" if peft_config else "explicit copy")
    return common.train_and_save(trainer, recipe, stage_dir, tokenizer, source)
