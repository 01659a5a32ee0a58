"""Eval tasks scored while a stage trains: ``train.task_eval: [safety]`` every ``train.task_eval_steps``.

A DPO (or SFT, KTO) run then shows the safety see-saw beside its loss: the ``safety`` task's attack success
rate and over-refusal rate, measured on the policy as it is at that step, in ``metrics.jsonl`` (one row per
measurement, keys ``<task>/<metric>``), the curves PNG, TensorBoard and MLflow (through the Trainer's own
``log``). The policy is scored before the first step (step 0) and every N optimizer steps; a resumed run
does not redo the steps its checkpoint already covers, and a measurement cut by a crash continues from its
saved predictions (the eval runner's resume). Files: ``<stage_dir>/task_eval/step-<N>/<task>/``.

Generation runs on the main process with the unwrapped model (the other ranks wait). A sharded model
(FSDP, DeepSpeed ZeRO-3) cannot generate that way: :meth:`TaskEvalCallback.attach` refuses such a launch
(evaluate the saved checkpoints with ``alignkit eval`` instead).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from alignkit.eval.runner import run_task
from alignkit.eval.tasks import TASKS, get_task
from alignkit.eval.tasks.base import STYLES
from alignkit.generation.hf import HFGenerator
from alignkit.train.tracking import numeric

logger = logging.getLogger("alignkit.train")
KEYS = ("task_eval", "task_eval_steps", "task_eval_limit", "task_eval_max_new_tokens", "task_eval_batch_size",
        "task_eval_prompt")


@dataclass
class TaskEvalArgs:
    """Mixin of the stage configs that can score eval tasks during training (SFT, DPO, KTO)."""

    task_eval: list[str] = field(default_factory=list, metadata={
        "help": f"Eval tasks scored on the policy during training, e.g. [safety] (attack success and "
                f"over-refusal curves beside the loss); any of {', '.join(TASKS)}. Empty: none."})
    task_eval_steps: int = field(default=0, metadata={
        "help": "Score train.task_eval every N optimizer steps (and before the first step); 0: never."})
    task_eval_limit: int | None = field(default=8, metadata={
        "help": "Examples per task and measurement (safety: the first N SimpleSafetyTests prompts, each "
                "with every jailbreak template, and N over-refusal prompts). None: all."})
    task_eval_max_new_tokens: int = field(default=64, metadata={
        "help": "New tokens per answer of a task-eval measurement (greedy)."})
    task_eval_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    task_eval_prompt: str = field(default="zero_shot", metadata={
        "help": f"Prompt style of the task-eval prompts: {', '.join(STYLES)}.", "choices": list(STYLES)})

    def check_task_eval(self) -> None:
        """ValueError naming the key for settings that cannot work together."""
        unknown = [t for t in self.task_eval if t not in TASKS]
        if unknown:
            raise ValueError(f"task_eval: unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
        if self.task_eval_steps < 0:
            raise ValueError(f"task_eval_steps must be >= 0, got {self.task_eval_steps}")
        if self.task_eval_steps and not self.task_eval:
            raise ValueError("task_eval_steps is set but task_eval names no task (e.g. task_eval: [safety])")
        if self.task_eval and not self.task_eval_steps:
            raise ValueError("task_eval is set but task_eval_steps is 0: set how often to score it")


def ignored_keys(args) -> dict[str, str]:
    """The task-eval settings a recipe sets but that nothing reads (no task scored during training)."""
    if args.task_eval:
        return {}
    why = "nothing is scored during training (train.task_eval is empty)"
    return {f"train.{k}": f"train.{k} is read by the task-eval callback; {why}" for k in KEYS[2:]}


class TaskEvalCallback(TrainerCallback):
    """Score ``tasks`` on the current policy at step 0 and every ``every`` steps; log ``<task>/<metric>``.

    ``attach(trainer)`` must be called once the Trainer exists (the callback logs through
    ``transformers.Trainer.log``, bypassing TRL's override so TRL's averaged metrics are not flushed)."""

    def __init__(self, args: TaskEvalArgs, out_dir: Path, tokenizer, *, seed: int = 0):
        self.tasks = list(args.task_eval)
        self.every = int(args.task_eval_steps)
        self.settings = settings_of(args)
        self.out_dir, self.tokenizer, self.seed = Path(out_dir), tokenizer, seed
        self.trainer = None

    def attach(self, trainer) -> TaskEvalCallback:
        """Register with ``trainer``; ValueError for a sharded launch (:func:`sharded_launch`)."""
        launch = sharded_launch(trainer)
        if launch:
            raise ValueError(f"train.task_eval cannot run under {launch}: the main process cannot generate alone "
                             "with sharded weights; drop train.task_eval and evaluate the saved checkpoints with "
                             "`alignkit eval`")
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a resumed run already measured its step 0
            self.measure(state.global_step, control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.measure(state.global_step, control)
        return control

    def measure(self, step: int, control=None) -> dict:
        """Score every task at ``step`` (main process) and log the numeric metrics; returns them.

        Logging resets ``control.should_log``, which the Trainer's flow callback may have just set for this
        step's own log line (loss, rewards): it is put back, so that line is still written."""
        trainer = self.trainer
        metrics = {}
        if trainer.is_world_process_zero():
            metrics = self._score(trainer.accelerator.unwrap_model(trainer.model), step)
            should_log = control.should_log if control is not None else False
            Trainer.log(trainer, dict(metrics))
            if control is not None:
                control.should_log = should_log
        trainer.accelerator.wait_for_everyone()
        return metrics

    def _score(self, model, step: int) -> dict:
        return score_tasks(model, self.tokenizer, self.tasks, self.out_dir, self.settings, step=step, seed=self.seed)


def sharded_launch(trainer) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when ``trainer``'s accelerator shards the weights, else None
    (read from ``trainer.is_fsdp_enabled``, ``trainer.is_deepspeed_enabled`` and the DeepSpeed plugin's
    ``zero_stage``; ZeRO-1/2 keep whole weights on every rank)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if getattr(trainer, "is_deepspeed_enabled", False):
        state = getattr(getattr(trainer, "accelerator", None), "state", None)
        plugin = getattr(state, "deepspeed_plugin", None)
        if getattr(plugin, "zero_stage", None) == 3:
            return "DeepSpeed ZeRO-3"
    return None


def settings_of(args: TaskEvalArgs) -> dict:
    return {"limit": args.task_eval_limit, "max_new_tokens": args.task_eval_max_new_tokens,
            "batch_size": args.task_eval_batch_size, "style": args.task_eval_prompt}


def score_tasks(model, tokenizer, tasks: list[str], out_dir: Path, settings: dict, *, step: int, seed: int = 0
                ) -> dict[str, float]:
    """Greedy generation with ``model`` as it is now on each task; ``{"<task>/<metric>": value}`` (numbers only).

    Files go to ``out_dir/step-<step>/<task>/``; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    generator = HFGenerator(model, tokenizer, batch_size=settings["batch_size"], name=f"policy@step{step}")
    metrics = {}
    try:
        with torch.no_grad():
            for name in tasks:
                # 1. generate and grade (predictions saved: a crash mid-task resumes from them)
                values, *_ = run_task(get_task(name), generator, Path(out_dir) / f"step-{step}" / name,
                                      limit=settings["limit"], seed=seed, style=settings["style"],
                                      max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                                      judge=None, settings={"step": step, **settings})
                # 2. the finite numbers (rates over no example are None: not measured, not logged); nested
                # tables (mmlu's per_subject) stay in the task's files
                metrics.update(numeric({k: v for k, v in values.items() if not isinstance(v, dict)}, f"{name}/"))
    finally:
        model.train(was_training)
    logger.info("task eval at step %d: %s", step,
                ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("_rate")) or metrics)
    return metrics


def task_eval_callback(args, stage_dir: Path, tokenizer, *, seed: int = 0) -> TaskEvalCallback | None:
    """The stage's task-eval callback, or None when ``args`` scores nothing during training."""
    if not getattr(args, "task_eval", None):
        return None
    return TaskEvalCallback(args, Path(stage_dir) / "task_eval", tokenizer, seed=seed)
