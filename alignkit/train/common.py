"""Pieces every TRL stage shares: model loading, LoRA config, data split + check, train-and-save.

Stages get runtime objects (a :class:`alignkit.config.StageRecipe`-like object with ``model``,
``data``, ``lora``, ``train``, ``seed``, ``resume``); nothing here reads YAML. Resume (attempts, complete
checkpoints, metrics cut back to the checkpoint): :func:`resume_training`, described in docs/resume.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import time
import uuid
from pathlib import Path

from alignkit.attention import VARLEN_SDPA, register_varlen_sdpa
from alignkit.data import masks
from alignkit.data.check import render, resolve_template, run_check
from alignkit.data.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from alignkit.models import load_model, merge_adapter, prepare_kbit
from alignkit.train.callbacks import (
    CHECKPOINT_MARKER,
    CheckpointMarkerCallback,
    GracefulInterruptCallback,
    MetricsJsonlCallback,
    plot_metrics,
    read_metrics,
)
from alignkit.train.task_eval import task_eval_callback

logger = logging.getLogger("alignkit.train")


def lora_config(lora, task_type: str = "CAUSAL_LM"):
    """A ``peft.LoraConfig`` from the recipe's ``lora`` section, or None when LoRA is off."""
    if lora is None or not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias=lora.bias,
                      modules_to_save=lora.modules_to_save, use_rslora=lora.use_rslora, task_type=task_type)


def load_for_training(recipe, model_path: str | None, *, model_class=None, **kwargs):
    """Load the stage's starting model with :func:`alignkit.models.load_model`.

    ``model_path`` (the previous stage's output) wins over ``recipe.model.name_or_path``. LoRA is
    applied by the TRL trainer (``peft_config``); a 4/8-bit model is prepared for k-bit training
    here (``peft.prepare_model_for_kbit_training``); padding-free batches on ``sdpa`` get
    ``sdpa_varlen`` (:func:`use_varlen_attention`). Returns ``(model, tokenizer, source)``.
    """
    m = recipe.model
    fresh = model_path is None
    model, tokenizer, source = load_model(
        model_path or m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
        quantization=m.quantization, revision=m.revision if fresh else None,
        gguf_file=m.gguf_file if fresh else None, model_class=model_class, **kwargs)
    if m.quantization:
        model = prepare_kbit(model, gradient_checkpointing=bool(getattr(recipe.train, "gradient_checkpointing",
                                                                        False)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_varlen_attention(model, recipe)
    logger.info("loaded %s (%s) for %s", source.path, source.kind, recipe.stage)
    return model, tokenizer, source


def per_document_attention(model, *, setting: str, pinned: str | None = None) -> str:
    """The one switch to per-document attention for padding-free rows (SFT and DPO): plain ``sdpa`` becomes
    ``sdpa_varlen`` (alignkit.attention: causal SDPA per document instead of a dense (N, N) block-diagonal
    mask; the pads saved are otherwise spent on attention, benchmarks/RESULTS.md) unless the recipe pinned it
    (``pinned``: its ``model.attn_implementation``); an implementation outside
    :data:`alignkit.data.masks.PER_DOCUMENT_ATTENTION` must pass :func:`masks.attends_per_document`, else a
    one-line ValueError naming ``setting``. Returns the implementation in use."""
    impl = model.config._attn_implementation
    if impl == "sdpa" and not pinned:
        model.set_attn_implementation(register_varlen_sdpa())
        logger.info("%s on sdpa: attention set to %s (per-document SDPA; set model.attn_implementation to "
                    "choose another)", setting, VARLEN_SDPA)
        return VARLEN_SDPA
    if impl not in masks.PER_DOCUMENT_ATTENTION and not masks.attends_per_document(model):
        raise ValueError(f"{setting}: model.attn_implementation {impl!r} attends across the documents of a "
                         "padding-free row; use sdpa_varlen, sdpa or flash_attention_2")
    return impl


def use_varlen_attention(model, recipe) -> bool:
    """SFT: padding-free batches (``train.padding_free`` or TRL's BFD packing) go through
    :func:`per_document_attention` (``sdpa`` -> ``sdpa_varlen`` unless the recipe names an attention).
    Other stages: False (DPO's trainer makes the same call for its padding-free pairs). Returns whether it
    switched."""
    if recipe.stage != "sft":
        return False
    args = recipe.train
    padding_free = getattr(args, "padding_free", False)
    packing_free = getattr(args, "packing", False) and getattr(args, "packing_strategy", None) in {"bfd", "bfd_split"}
    if not (padding_free or packing_free):
        return False
    setting = "train.padding_free" if padding_free else "train.packing"
    before = model.config._attn_implementation
    return per_document_attention(model, setting=setting, pinned=recipe.model.attn_implementation) != before


def holdout(rows: list, val_size: float, seed: int) -> tuple[list, list]:
    """Split ``rows`` into (train, validation): ``val_size`` < 1 is a fraction, >= 1 a count.
    The choice is a seeded shuffle of indices, so the same seed gives the same split."""
    if val_size <= 0:
        return list(rows), []
    n_val = round(val_size * len(rows)) if val_size < 1 else int(val_size)
    if not 0 < n_val < len(rows):
        raise ValueError(f"data.val_size={val_size} holds out {n_val} of {len(rows)} rows; "
                         f"it must leave at least one row on each side")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx])


def load_split(data, load_fn, seed: int) -> tuple[list, list]:
    """Training and validation rows for a ``data`` section.

    ``load_fn(path, split, limit, name)`` reads, checks and returns the kept rows of one split (``name``
    is "train" or "eval", for the report file). Validation comes from ``eval_path``, else ``eval_split``
    of ``path``, else ``val_size`` held out of the (``max_rows``-capped) training rows.
    """
    if not data.path:
        raise ValueError("data.path is not set: give the training data (file, folder or hub name)")
    train = list(load_fn(data.path, data.split, data.max_rows, "train"))
    if data.eval_path or data.eval_split:
        val = list(load_fn(data.eval_path or data.path, data.eval_split or data.split, data.max_eval_rows, "eval"))
    else:
        train, val = holdout(train, data.val_size, seed)
        val = val[: data.max_eval_rows] if data.max_eval_rows else val
    return train, val


def text_template(template: str | None) -> str | None:
    """The text template for ``data.template``: None for "chat"/None, else a bundled prompt's text
    (e.g. "alpaca_sft") or the string itself when it has ``{instruction}``/``{prompt}`` slots
    (:func:`alignkit.data.check.resolve_template`, which the data check measures with)."""
    return None if template == "chat" else resolve_template(template)


def fill_template(template: str, prompt: str) -> str:
    """The prompt text of a template up to its response slot: :func:`alignkit.data.check.render`, the same
    rendering the data check measures, so the check and training see one text."""
    return render(template, prompt)


def templated(row, template: str | None, replies: tuple[str, ...]):
    """``row`` (a dataclass with ``prompt`` and the ``replies`` fields) with ``data.template`` applied: "chat"
    turns a plain-text prompt and replies into user/assistant messages; a text template renders the prompt
    (:func:`fill_template`); conversational rows and ``None`` leave the row as it is."""
    if not isinstance(row.prompt, str):
        return row
    if template == "chat":
        if not all(isinstance(getattr(row, name), str) for name in replies):
            return row
        return dataclasses.replace(row, prompt=[{"role": "user", "content": row.prompt}],
                                   **{name: [{"role": "assistant", "content": getattr(row, name)}] for name in replies})
    text = text_template(template)
    return row if text is None else dataclasses.replace(row, prompt=fill_template(text, row.prompt))


def stage_loader(recipe, kind: str, tokenizer, stage_dir: Path):
    """:func:`checked_loader` for a preference-style stage (DPO, reward, KTO): ``data.max_length``, else the
    trainer's ``train.max_length``."""
    max_length = recipe.data.max_length or getattr(recipe.train, "max_length", None)
    return checked_loader(recipe.data, kind, tokenizer, max_length, stage_dir)


def policy_and_reference(recipe, model_path: str | None, *, needs_reference: bool):
    """``(model, tokenizer, source, peft_config, ref_model)`` of a preference stage: the policy, its LoRA config
    and, for full fine-tuning when ``needs_reference``, an explicit frozen reference loaded like the policy
    (with LoRA the trainer uses the policy with its adapter disabled)."""
    model, tokenizer, source = load_for_training(recipe, model_path)
    peft_config = lora_config(recipe.lora)
    ref_model = None
    if peft_config is None and needs_reference:
        ref_model, _, _ = load_for_training(recipe, model_path)
        ref_model.eval().requires_grad_(False)
    return model, tokenizer, source, peft_config, ref_model


def checked_loader(data, kind: str, tokenizer, max_length: int | None, stage_dir: Path):
    """``load_fn`` for :func:`load_split`: the data check's own loader (:func:`alignkit.data.check.run_check`,
    ``limit`` read as ``max_rows``), its report saved, then its verdict under ``data.on_error``; returns the
    kept rows. ``alignkit data check`` runs the same function, so the two agree on every row."""

    def load(path, split, limit, name):
        opts = {"data": path, "split": split, "kind": kind, "format": getattr(data, "format", None),
                "columns": data.columns, "template": data.template, "max_length": max_length, "max_rows": limit,
                "decontaminate": data.decontaminate}
        report = run_check(opts, tokenizer=tokenizer)
        save_data_report(report, stage_dir, f"data_check_{name}")
        report.verdict(data.on_error, report_path=str(stage_dir / f"data_check_{name}.md"))
        return report.kept

    return load


def save_data_report(report, stage_dir: Path, name: str) -> None:
    """Write the data check's markdown and JSON next to the outputs and log the headline."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stage_dir / f"{name}.md", report.to_markdown())
    write_json_atomic(stage_dir / f"{name}.json", report.to_dict())
    logger.info("data check (%s): %d read, %d kept, %d dropped, %d malformed -> %s", name, report.rows_read,
                report.rows_kept, report.rows_dropped, len(report.malformed), stage_dir / f"{name}.md")


def stage_callbacks(stage_dir: Path, *, interrupt_boundary: int = 1) -> list:
    """The callbacks every stage uses: metrics.jsonl writer and the Ctrl-C checkpoint saver
    (:func:`resume_training` adds the checkpoint completion marker with the attempt's id)."""
    return [MetricsJsonlCallback(stage_dir / "metrics.jsonl"), GracefulInterruptCallback(interrupt_boundary)]


# ------------------------------------------------------------------------------------------------
# Attempts and checkpoints
# ------------------------------------------------------------------------------------------------
ATTEMPT_FILE = "attempt.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def current_attempt(stage_dir: Path) -> str | None:
    """The id of the attempt recorded in ``stage_dir/attempt.json`` (None: no attempt started here)."""
    path = Path(stage_dir) / ATTEMPT_FILE
    return json.loads(path.read_text()).get("attempt") if path.exists() else None


def start_attempt(stage_dir: Path) -> str:
    """Record a new attempt in ``stage_dir/attempt.json`` (atomic) and return its id."""
    attempt = uuid.uuid4().hex[:12]
    write_json_atomic(Path(stage_dir) / ATTEMPT_FILE, {"attempt": attempt, "started": time.time()})
    return attempt


def checkpoint_complete(folder: Path, attempt: str | None) -> bool:
    """A checkpoint counts only when its marker (written last, see ``CheckpointMarkerCallback``) names
    ``attempt`` and its step, and the Trainer's ``trainer_state.json`` is there."""
    folder = Path(folder)
    marker = folder / CHECKPOINT_MARKER
    match = _CHECKPOINT_RE.match(folder.name)
    if attempt is None or match is None or not marker.is_file() or not (folder / "trainer_state.json").is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("attempt") == attempt and info.get("step") == int(match.group(1))


def checkpoint_dirs(stage_dir: Path) -> list[Path]:
    """``stage_dir/checkpoint-N`` folders, oldest step first."""
    stage_dir = Path(stage_dir)
    found = [p for p in stage_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)] if stage_dir.is_dir() \
        else []
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def resume_checkpoint(stage_dir: Path, attempt: str | None = None) -> str | None:
    """The newest complete checkpoint of ``attempt`` (default: the attempt recorded in ``stage_dir``), or
    None: what a rerun continues from. Unlike transformers' ``get_last_checkpoint`` (highest number wins),
    a half-written save or a checkpoint left by an earlier attempt is never returned."""
    attempt = attempt if attempt is not None else current_attempt(stage_dir)
    complete = [p for p in checkpoint_dirs(stage_dir) if checkpoint_complete(p, attempt)]
    return str(complete[-1]) if complete else None


def drop_unusable_checkpoints(stage_dir: Path, attempt: str) -> list[str]:
    """Delete the checkpoint folders that are not complete checkpoints of ``attempt`` (cut short by a kill,
    or left by another attempt), so the Trainer never writes into or rotates them; returns their names."""
    dropped = []
    for folder in checkpoint_dirs(stage_dir):
        if not checkpoint_complete(folder, attempt):
            shutil.rmtree(folder, ignore_errors=True)
            dropped.append(folder.name)
    if dropped:
        logger.warning("removed checkpoint folder(s) that are not complete saves of this attempt: %s",
                       ", ".join(dropped))
    return dropped


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` logged up to ``step`` (the checkpoint resumed from; 0: none), less
    an earlier segment's end-of-training summary, so a resumed run logs every step once. Returns rows kept."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step and "train_runtime" not in r]
    write_jsonl_atomic(path, rows)
    return len(rows)


def _callback(trainer, cls):
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, cls)]
    if found:
        return found[0]
    trainer.add_callback(cls())
    return _callback(trainer, cls)


def resume_training(trainer, recipe, stage_dir: Path) -> tuple[object, dict]:
    """Run ``trainer.train``, continuing the current attempt from its newest complete checkpoint.

    ``recipe.resume`` False (or no attempt recorded in ``stage_dir``) starts a new attempt at step 1.
    Before training: unusable checkpoint folders are removed and metrics.jsonl is cut back to the
    checkpoint's step. A first Ctrl-C saves a checkpoint at the end of the step and stops. Returns
    ``(train_output, info)``; ``info`` has ``resumed_from`` and, after a Ctrl-C, ``interrupted`` + the
    ``checkpoint`` written."""
    stage_dir = Path(stage_dir)
    main = trainer.is_world_process_zero()
    if main and (not getattr(recipe, "resume", True) or current_attempt(stage_dir) is None):
        start_attempt(stage_dir)
    trainer.accelerator.wait_for_everyone()
    attempt = current_attempt(stage_dir)
    resume_from = resume_checkpoint(stage_dir, attempt)
    if main:
        drop_unusable_checkpoints(stage_dir, attempt)
        truncate_metrics(stage_dir / "metrics.jsonl", int(resume_from.rsplit("-", 1)[1]) if resume_from else 0)
    trainer.accelerator.wait_for_everyone()
    if resume_from:
        logger.info("resuming %s from %s (attempt %s)", recipe.stage, resume_from, attempt)
    _callback(trainer, CheckpointMarkerCallback).attempt = attempt
    interrupt = _callback(trainer, GracefulInterruptCallback)
    with interrupt.installed():
        output = trainer.train(resume_from_checkpoint=resume_from)
    info = {"resumed_from": resume_from}
    if interrupt.requested:
        checkpoint = resume_checkpoint(stage_dir, attempt)
        logger.warning("interrupted at step %d: checkpoint saved in %s", trainer.state.global_step, checkpoint)
        info.update(interrupted=True, checkpoint=checkpoint)
    return output, info


def train_and_save(trainer, recipe, stage_dir: Path, tokenizer, source, *, merge_lora: bool = True) -> dict:
    """Train (continuing the current attempt from its newest complete checkpoint, see
    :func:`resume_training`), then save model/adapter + tokenizer, metrics and the curves PNG.

    Returns the stage result dict of the stage-module contract (see alignkit/train/__init__.py).
    """
    stage_dir = Path(stage_dir)
    start = time.time()
    # 1. train (scoring train.task_eval every N steps when set); a first Ctrl-C saves a checkpoint at the
    #    end of the current step and stops
    task_eval = task_eval_callback(recipe.train, stage_dir, tokenizer, seed=recipe.seed)
    if task_eval is not None:
        task_eval.attach(trainer)
    output, info = resume_training(trainer, recipe, stage_dir)
    result = {"metrics": dict(output.metrics), "model_source": source.to_dict(), "model_dir": None,
              "global_step": trainer.state.global_step, "train_seconds": round(time.time() - start, 1),
              "resumed_from": info["resumed_from"]}
    if info.get("interrupted"):
        return {**result, "interrupted": True, "checkpoint": info["checkpoint"]}
    # 2. final validation metrics
    if trainer.eval_dataset is not None:
        result["metrics"].update(trainer.evaluate())
    # 3. save model (or adapter) and tokenizer; merged copy for the next stage when LoRA
    final = stage_dir / "final"
    trainer.save_model(str(final))
    result["model_dir"] = str(final)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
    if _is_peft(trainer.model):
        result["adapter_dir"] = str(final)
        result["model_dir"] = (_save_merged(trainer, tokenizer, final, stage_dir / "final_merged")
                               if merge_lora else None)
    trainer.accelerator.wait_for_everyone()
    # 4. curves and summary
    if trainer.is_world_process_zero():
        plot_metrics(stage_dir / "metrics.jsonl", stage_dir / "curves.png")
        _log_summary(recipe.stage, result)
    return result


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _save_merged(trainer, tokenizer, adapter_dir: Path, out: Path) -> str:
    """A full model folder for the next stage: the LoRA adapter merged into the base weights. A 4/8-bit
    (QLoRA) base is not merged onto its quantized weights: the saved adapter is merged onto a full-precision
    (float32) copy of the base instead (:func:`alignkit.models.merge_adapter`), and the log says so."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model()
    quantized = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    if trainer.is_world_process_zero():
        if quantized:
            merge_adapter(adapter_dir, out, dtype="float32", device="cpu")
            logger.info("quantized base: the adapter %s is merged onto a full-precision copy of the base -> %s "
                        "(the next stage starts from it)", adapter_dir, out)
        else:
            model.merge_and_unload().save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
    return str(out)


def _log_summary(stage: str, result: dict) -> None:
    keys = [k for k in result["metrics"] if any(s in k for s in ("loss", "accurac", "margin", "runtime"))]
    shown = ", ".join(f"{k}={result['metrics'][k]:.4g}" for k in sorted(keys)
                      if isinstance(result["metrics"][k], (int, float)))
    logger.info("%s done: %d steps in %.0f s; %s; model: %s", stage, result["global_step"],
                result["train_seconds"], shown, result["model_dir"])
