"""Trainer callbacks (metrics.jsonl, Ctrl-C checkpoint, checkpoint completion marker) and the curves PNG."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from alignkit.data.io import read_jsonl, save_figure_atomic, write_json_atomic

logger = logging.getLogger("alignkit.train")


class MetricsJsonlCallback(TrainerCallback):
    """Append every log line (train and eval) to a JSONL file: ``{"step", "epoch", **logs}``.

    Written on the main process only, one flushed line per ``on_log``, so a crash keeps what was logged.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")


class GracefulInterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a full checkpoint (weights, optimizer, scheduler,
    RNG, trainer state) and stop, so rerunning the same command continues from it. A second Ctrl-C aborts
    at once. ``boundary``: stop only at a step divisible by it (GRPO with TRL: the end of a rollout batch,
    where a checkpoint resumes exactly).

    ``installed()`` swaps in the SIGINT handler for the duration of ``trainer.train`` (main thread only);
    ``request()`` is what the handler calls (tests call it directly).
    """

    def __init__(self, boundary: int = 1):
        self.requested = False
        self.boundary = max(1, int(boundary))  # stop only at a global step divisible by this (GRPO rollouts)

    def request(self, *_args) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: saving a checkpoint at the end of this step (press again to abort now)")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self.request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and state.global_step % self.boundary == 0:
            control.should_save = True
            control.should_training_stop = True
        return control


CHECKPOINT_MARKER = "alignkit_checkpoint.json"


class CheckpointMarkerCallback(TrainerCallback):
    """Write ``checkpoint-N/alignkit_checkpoint.json`` ({"attempt", "step"}) once the Trainer has saved
    everything of checkpoint N (``on_save`` runs after ``_save_checkpoint``: weights, optimizer, scheduler,
    RNG, trainer_state.json). Only a checkpoint with this marker, naming the current attempt, is resumed
    from: a save killed halfway, or a checkpoint of an earlier attempt, never is.

    ``attempt`` is set by :func:`alignkit.train.common.train_and_save` before training starts."""

    def __init__(self, attempt: str | None = None):
        self.attempt = attempt

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.attempt is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / CHECKPOINT_MARKER,
                                  {"attempt": self.attempt, "step": state.global_step, "written": time.time()})
        return control


# ------------------------------------------------------------------------------------------------
# Curves
# ------------------------------------------------------------------------------------------------
_PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("learning_rate",)),
    ("grad norm", ("grad_norm",)),
    ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies", "accuracy", "eval_accuracy")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins", "eval_rewards/margins",
                 "margin", "eval_margin")),
    ("safety (task eval)", ("safety/attack_success_rate", "safety/attack_success_rate_jailbreak",
                            "safety/over_refusal_rate")),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return list(read_jsonl(path, drop_torn_tail=True))


def plot_metrics(jsonl: str | Path, png: str | Path) -> Path | None:
    """One panel per metric group found in ``jsonl`` (loss, lr, grad norm, rewards), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)
    panels = []
    for title, keys in _PANELS:
        # 1. collect (step, value) series of each key present in this panel
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))
                      and math.isfinite(r[k])] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append((title, series))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for key, points in series.items():
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, png, dpi=100)
    plt.close(fig)
    return Path(png)
