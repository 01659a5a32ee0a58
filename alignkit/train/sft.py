"""SFT stage: TRL's ``SFTTrainer`` on checked data, optional alignkit packing (stage-module contract:
see alignkit/train/__init__.py)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate.utils import is_peft_model
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from alignkit.attention import VARLEN_SDPA
from alignkit.data import PackedSFTDataset, masks
from alignkit.train import common, task_eval
from alignkit.train.compact_head import EXTRA_OUTPUTS, add_compact_lm_head

logger = logging.getLogger("alignkit.train")

#: the data.* keys this stage reads (common.load_split + _loader + build_datasets); others are refused
DATA_KEYS = frozenset({"path", "split", "columns", "eval_path", "eval_split", "val_size", "max_rows",
                       "max_eval_rows", "max_length", "packing", "template", "on_error", "decontaminate"})
#: SFTConfig fields of TRL's own data path (formatting, tokenization, packing, loss masks), unread when
#: data.packing=alignkit hands TRL already packed input_ids
TRL_DATA_FIELDS = ("packing", "packing_strategy", "eval_packing", "completion_only_loss", "assistant_only_loss",
                   "dataset_text_field", "eos_token")
#: the template alignkit packing applies (PackedSFTDataset)
PACKING_TEMPLATE = "alpaca_sft"


@dataclass
class SFTArgs(SFTConfig, task_eval.TaskEvalArgs):
    """``trl.SFTConfig`` (fields 1:1) with alignkit's defaults: TensorBoard logging.

    Reference settings (CS336 A5 supplement, section 4.1): lr 2e-5, cosine decay, 3% linear warmup,
    context 512, effective batch 32 (per_device_train_batch_size x gradient_accumulation_steps x GPUs).
    TRL's packing: ``packing: true``; alignkit's PackedSFTDataset: ``data.packing: alignkit``.
    """

    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "Loggers: tensorboard (default), wandb, mlflow (when installed), none, or a list."})

    def __post_init__(self):
        super().__post_init__()
        self.check_task_eval()


ARGS_CLASS = SFTArgs


def ignored_keys(stage) -> dict[str, str]:
    """Stage-module strictness hook (contract in alignkit/train/__init__.py): the keys this SFT
    configuration does not read, ``{dotted_key: one-line reason}``."""
    data, args = stage.data, stage.train
    out = task_eval.ignored_keys(args)
    if data.packing == "alignkit":
        why = "this recipe's data.packing is alignkit (PackedSFTDataset: packed input_ids, loss on every token)"
        for name in TRL_DATA_FIELDS:
            out[f"train.{name}"] = f"train.{name} is read by TRL's SFT data path; {why}"
        if data.template != PACKING_TEMPLATE:
            out["data.template"] = (f"data.template is not applied by data.packing: alignkit (PackedSFTDataset "
                                    f"formats rows with {PACKING_TEMPLATE}); set data.template: {PACKING_TEMPLATE}"
                                    f" or leave it out")
    elif not (args.packing or args.eval_packing):
        out["train.packing_strategy"] = ("train.packing_strategy is read with train.packing (or eval_packing): "
                                         "true; this recipe does not pack")
    if data.packing == "alignkit" or args.packing:
        out["data.max_length"] = ("data.max_length is read by the data check of unpacked SFT (it drops long "
                                  "rows); this recipe packs (rows are concatenated and cut to train.max_length)")
    elif unpacked_padding_free(args) and data.max_length is not None:
        out["train.max_length"] = ("train.max_length is read by TRL's truncation of padded rows and by the data "
                                   "check when data.max_length is unset; this recipe is padding-free without "
                                   "packing (rows kept whole) and its data check drops rows over data.max_length")
    return out


def to_trl_rows(rows: list[dict], template: str | None) -> list[dict]:
    """Rows in the shape TRL's SFTTrainer takes, with ``data.template`` applied.

    * ``"chat"``: string prompt/completion become user/assistant messages (the model's chat template).
    * a text template (``"alpaca_sft"``, or a string with ``{instruction}``): the prompt is rendered.
    * ``None``: rows as they are (message lists still get the chat template from TRL).
    """
    text = common.text_template(template)
    out = []
    for row in rows:
        # 1. messages rows pass through; 2. string rows are converted per template
        if "messages" in row or isinstance(row.get("prompt"), list):
            if text is not None:
                raise ValueError(f"data.template={template!r} needs plain-text rows, got a chat row: {row}")
            out.append(row)
        elif template == "chat":
            out.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                        "completion": [{"role": "assistant", "content": row["completion"]}]})
        elif text is not None:
            out.append({"prompt": common.fill_template(text, row["prompt"]), "completion": row["completion"]})
        else:
            out.append(row)
    if len({tuple(sorted(r)) for r in out}) > 1:
        raise ValueError("SFT data mixes row shapes (messages and prompt/completion); use one shape per dataset")
    return out


def check_max_length(recipe) -> int | None:
    """The max_length the data check drops rows at: data.max_length or train.max_length, None when packing
    (packed rows are concatenated then cut, so a long row is not dropped)."""
    packed = recipe.data.packing == "alignkit" or recipe.train.packing
    return None if packed else recipe.data.max_length or recipe.train.max_length


def _loader(recipe, tokenizer, stage_dir: Path):
    return common.checked_loader(recipe.data, "sft", tokenizer, check_max_length(recipe), stage_dir)


def packed_dataset(rows: list[dict], tokenizer, seq_length: int, path: Path, seed: int):
    """alignkit packing: rows -> JSONL -> ``alignkit.data.PackedSFTDataset`` -> a tokenized HF dataset.

    Each packed item (``input_ids`` + next-token ``labels``, both ``(m,)``) becomes one sequence of
    ``m + 1`` tokens, so the HF model's internal shift scores exactly the packed labels; loss on all tokens.
    """
    with path.open("w") as fh:
        for row in rows:
            if not isinstance(row.get("prompt"), str):
                raise TypeError("data.packing=alignkit needs plain-text prompt/completion rows")
            fh.write(json.dumps({"prompt": row["prompt"], "response": row["completion"]}) + "\n")
    packed = PackedSFTDataset(tokenizer, str(path), seq_length - 1, True, seed=seed)
    if len(packed) == 0:
        raise ValueError(f"packing produced no sequence of {seq_length} tokens from {len(rows)} rows")
    ids = [torch.cat([item["input_ids"], item["labels"][-1:]]).tolist() for item in packed]
    logger.info("alignkit packing: %d rows -> %d sequences of %d tokens", len(rows), len(ids), seq_length)
    return datasets.Dataset.from_dict({"input_ids": ids})


def build_datasets(recipe, tokenizer, stage_dir: Path):
    """(train, eval or None) HF datasets after the data check."""
    train_rows, val_rows = common.load_split(recipe.data, _loader(recipe, tokenizer, stage_dir), recipe.seed)
    if recipe.data.packing == "alignkit":
        seq = recipe.train.max_length or 512
        train = packed_dataset(train_rows, tokenizer, seq, stage_dir / "packed_train.jsonl", recipe.seed)
        val = packed_dataset(val_rows, tokenizer, seq, stage_dir / "packed_eval.jsonl", recipe.seed) \
            if val_rows else None
        return train, val
    train = _trl_dataset(recipe, tokenizer, train_rows, "training data")
    val = _trl_dataset(recipe, tokenizer, val_rows, "validation data") if val_rows else None
    return train, val


def assistant_only(args, rows: list[dict]) -> bool:
    """Whether the loss is on the assistant turns only: ``train.assistant_only_loss``, or
    ``train.completion_only_loss: true`` on ``messages`` rows (a transcript's completions are its assistant
    turns; TRL would otherwise train on every turn, the user's included)."""
    return bool(rows) and bool(args.assistant_only_loss or (args.completion_only_loss and "messages" in rows[0]))


def _conversational(row: dict) -> bool:
    return "messages" in row or isinstance(row.get("prompt"), list)


def _trl_dataset(recipe, tokenizer, rows: list[dict], name: str):
    """TRL rows as a dataset; for assistant-only loss on a template without ``{% generation %}`` tags, with
    alignkit's assistant masks (:func:`alignkit.data.masks.with_assistant_masks`) pre-tokenized in."""
    rows = to_trl_rows(rows, recipe.data.template)
    if rows and assistant_only(recipe.train, rows) and _conversational(rows[0]) \
            and not masks.has_generation_tags(tokenizer):
        rows = masks.with_assistant_masks(rows, tokenizer, name=name)
    return datasets.Dataset.from_list(rows)


def trl_args(args, dataset):
    """The SFTConfig handed to TRL for ``dataset`` (the recipe's own ``args`` when nothing changes):

    * rows carrying alignkit's ``assistant_masks`` (which TRL applies to pre-tokenized rows): TRL's own
      assistant_only_loss off (it would look for {% generation %} tags);
    * ``messages`` rows with completion_only_loss on a tagged template: TRL's assistant_only_loss on;
    * ``padding_free`` without packing: ``max_length`` None. TRL's padding-free collator cannot truncate (TRL
      refuses a max_length there); the data check has already dropped every row over
      :func:`check_max_length` (``data.max_length`` or ``train.max_length``), so the limit holds unchanged."""
    columns = dataset.column_names if dataset is not None else []
    changes = {}
    if "assistant_masks" in columns:
        changes["assistant_only_loss"] = False
    elif "messages" in columns and args.completion_only_loss and not args.assistant_only_loss:
        changes["assistant_only_loss"] = True
    if unpacked_padding_free(args) and args.max_length is not None:
        changes["max_length"] = None
    return masks.args_with(args, **changes) if changes else args


def unpacked_padding_free(args) -> bool:
    """``train.padding_free`` without TRL packing: rows are kept whole, so only the data check bounds them."""
    return bool(args.padding_free and not args.packing)


def _probe_attention(recipe) -> bool:
    """Load the stage's model as training would and run :func:`alignkit.data.masks.attends_per_document`."""
    model, _, _ = common.load_for_training(recipe, None)
    return masks.attends_per_document(model.eval())


def trainer_view(recipe, tokenizer, stage_dir: Path, *, limit: int | None = None):
    """``(rows, problems)``: the training rows exactly as this stage's SFTTrainer sees them (TRL's preparation
    and collator on :func:`build_datasets`' dataset; :func:`alignkit.data.masks.sft_view`), the first ``limit``
    of them, and the check's faults (loss masks all zero or all one, cross-document attention)."""
    train, _ = build_datasets(recipe, tokenizer, stage_dir)
    args = trl_args(recipe.train, train)
    packed = recipe.data.packing == "alignkit"
    per_document = bool(args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"}))
    attention = recipe.model.attn_implementation or VARLEN_SDPA  # common.use_varlen_attention's choice
    problem = masks.cross_document_problem(per_document=per_document, attn_implementation=attention,
                                           prepacked=packed, probe=lambda: _probe_attention(recipe))
    view = list(masks.sft_view(train, tokenizer, args))
    if packed:  # alignkit packing trains on every token: nothing is masked on purpose
        for row in view:
            row.masked = False
    problems = masks.mask_problems(view) + ([problem] if problem else [])
    return view[:limit] if limit is not None else view, problems


class AlignkitSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with alignkit's compact LM head (:mod:`alignkit.train.compact_head`) under TRL's
    ``fused_lm_head`` calls: the head runs on the completion (scored) positions only, entropy and token accuracy
    inside the same tiles; TRL's ``compute_loss`` (loss types, metrics, aux loss) is unchanged. Off CUDA TRL's own
    fused head scores every position. A sharded or device-mapped head stays on TRL's fused head; a wrapped one
    (LoRA on ``lm_head``) is scored from the model's own logits, adapter included."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # TRL wraps PEFT, then installs its fused head on the base model
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_compact_lm_head(base, keyword="fused_lm_head", outputs=EXTRA_OUTPUTS)


def run(recipe, stage_dir, model_path=None) -> dict:
    """Supervised fine-tuning; returns the stage result (model_dir, metrics, model_source)."""
    stage_dir = Path(stage_dir)
    set_seed(recipe.seed)
    # 1. model, tokenizer; 2. checked data; 3. TRL trainer (LoRA via peft_config); 4. train and save
    model, tokenizer, source = common.load_for_training(recipe, model_path)
    train_ds, eval_ds = build_datasets(recipe, tokenizer, stage_dir)
    trainer = AlignkitSFTTrainer(model=model, args=trl_args(recipe.train, train_ds), train_dataset=train_ds,
                                 eval_dataset=eval_ds, processing_class=tokenizer,
                                 peft_config=common.lora_config(recipe.lora), callbacks=common.stage_callbacks(stage_dir))
    return common.train_and_save(trainer, recipe, stage_dir, tokenizer, source)
