"""alignkit.train.callbacks: metrics.jsonl writer and reader (torn tail), the Ctrl-C checkpoint callback (and its
rollout boundary), the checkpoint completion marker, and the curves PNG, driven with transformers' own
TrainerState / TrainerControl."""
from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import types

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState

from alignkit.data.io import DataError
from alignkit.train.callbacks import (
    CHECKPOINT_MARKER,
    CheckpointMarkerCallback,
    GracefulInterruptCallback,
    MetricsJsonlCallback,
    plot_metrics,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path) -> list[dict]:
    """The file's JSON lines, parsed here without alignkit."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------------------- metrics.jsonl
def test_one_json_line_per_log_call(tmp_path):
    path = tmp_path / "nested" / "metrics.jsonl"  # parent folders are created
    cb, control = MetricsJsonlCallback(path), TrainerControl()
    state = TrainerState(global_step=1, epoch=0.25)
    cb.on_log(None, state, control, logs={"loss": 2.5, "learning_rate": 1e-4})
    assert _lines(path) == [{"step": 1, "epoch": 0.25, "loss": 2.5, "learning_rate": 1e-4}]  # flushed at once
    state.global_step, state.epoch = 4, 1.0
    cb.on_log(None, state, control, logs={"eval_loss": 2.0})
    assert _lines(path) == [{"step": 1, "epoch": 0.25, "loss": 2.5, "learning_rate": 1e-4},
                            {"step": 4, "epoch": 1.0, "eval_loss": 2.0}]


def test_numpy_and_torch_scalars_are_written_as_numbers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsJsonlCallback(path).on_log(None, TrainerState(global_step=2, epoch=0.5), TrainerControl(),
                                      logs={"grad_norm": np.float32(0.5), "loss": torch.tensor(1.25)})
    assert _lines(path) == [{"step": 2, "epoch": 0.5, "grad_norm": 0.5, "loss": 1.25}]


def test_nothing_written_without_logs_or_off_the_main_process(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cb = MetricsJsonlCallback(path)
    cb.on_log(None, TrainerState(global_step=1), TrainerControl(), logs=None)
    cb.on_log(None, TrainerState(global_step=1), TrainerControl(), logs={})
    other_rank = TrainerState(global_step=1, is_world_process_zero=False)
    cb.on_log(None, other_rank, TrainerControl(), logs={"loss": 1.0})
    assert not path.exists()


def test_appends_to_an_existing_file_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    MetricsJsonlCallback(path).on_log(None, TrainerState(global_step=2, epoch=1.0), TrainerControl(),
                                      logs={"loss": 2.0})
    assert _lines(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "epoch": 1.0, "loss": 2.0}]


def test_read_metrics(tmp_path):
    assert read_metrics(tmp_path / "absent.jsonl") == []
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "epoch": 0.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # blank lines are skipped
    assert read_metrics(path) == rows
    # what the writer produces, read back
    cb = MetricsJsonlCallback(tmp_path / "w.jsonl")
    for step in (1, 2, 3):
        state = TrainerState(global_step=step, epoch=step / 4)
        cb.on_log(None, state, TrainerControl(), logs={"loss": 1 / step})
    expected = [{"step": s, "epoch": s / 4, "loss": 1 / s} for s in (1, 2, 3)]
    assert read_metrics(tmp_path / "w.jsonl") == expected


def test_read_metrics_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_read_metrics_refuses_a_bad_line_before_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl line 2: invalid JSON"):
        read_metrics(path)


# ------------------------------------------------------------------------------------------- Ctrl-C
def test_interrupt_request_saves_and_stops_at_the_step_end():
    cb = GracefulInterruptCallback()
    control = TrainerControl()
    cb.on_step_end(None, TrainerState(), control)
    assert (control.should_save, control.should_training_stop) == (False, False)  # nothing asked yet
    cb.request()
    assert cb.requested
    returned = cb.on_step_end(None, TrainerState(), control)
    assert returned is control and (control.should_save, control.should_training_stop) == (True, True)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
        cb.request()


def test_interrupt_waits_for_the_boundary_step():
    cb, control = GracefulInterruptCallback(boundary=3), TrainerControl()
    cb.request()
    for step in (4, 5):  # mid rollout batch: keep going
        cb.on_step_end(None, TrainerState(global_step=step), control)
        assert (control.should_save, control.should_training_stop) == (False, False)
    cb.on_step_end(None, TrainerState(global_step=6), control)
    assert (control.should_save, control.should_training_stop) == (True, True)


# ------------------------------------------------------------------------------------------- checkpoint marker
def test_marker_written_after_the_save_names_attempt_and_step(tmp_path):
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    (tmp_path / "checkpoint-4").mkdir()
    cb = CheckpointMarkerCallback("abc")
    cb.on_save(args, TrainerState(global_step=4), TrainerControl())
    marker = json.loads((tmp_path / "checkpoint-4" / CHECKPOINT_MARKER).read_text())
    assert (marker["attempt"], marker["step"]) == ("abc", 4)


def test_no_marker_without_attempt_folder_or_off_the_main_process(tmp_path):
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    (tmp_path / "checkpoint-2").mkdir()
    CheckpointMarkerCallback(None).on_save(args, TrainerState(global_step=2), TrainerControl())
    CheckpointMarkerCallback("abc").on_save(args, TrainerState(global_step=2, is_world_process_zero=False),
                                            TrainerControl())
    CheckpointMarkerCallback("abc").on_save(args, TrainerState(global_step=3), TrainerControl())  # no folder
    assert not (tmp_path / "checkpoint-2" / CHECKPOINT_MARKER).exists() and not (tmp_path / "checkpoint-3").exists()


def test_installed_handles_a_real_sigint_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    cb = GracefulInterruptCallback()
    with cb.installed() as same:
        assert same is cb and signal.getsignal(signal.SIGINT) == cb.request
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread: the handler runs, no exception
        deadline = time.monotonic() + 5
        while not cb.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cb.requested
    assert signal.getsignal(signal.SIGINT) is before


def test_installed_off_the_main_thread_changes_nothing():
    before, seen = signal.getsignal(signal.SIGINT), []
    cb = GracefulInterruptCallback()

    def worker():
        with cb.installed() as same:
            seen.append((same is cb, signal.getsignal(signal.SIGINT) is before))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(True, True)]


# ------------------------------------------------------------------------------------------- curves
def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_metrics_one_panel_per_metric_group(tmp_path):
    rows = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4, "grad_norm": 1.0 + s} for s in range(1, 6)]
    rows.append({"step": 5, "eval_loss": 0.9})
    png = plot_metrics(_write_rows(tmp_path / "m.jsonl", rows), tmp_path / "curves.png")
    assert png == tmp_path / "curves.png"
    assert _png_size(png) == (3 * 400, 320)  # 3 panels (loss, lr, grad norm), 4 x 3.2 inches each at 100 dpi
    dpo = [{"step": s, "loss": 0.7, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
            "rewards/accuracies": 0.5} for s in range(1, 4)]
    png = plot_metrics(_write_rows(tmp_path / "dpo.jsonl", dpo), tmp_path / "dpo.png")
    assert _png_size(png) == (3 * 400, 320)  # loss, reward accuracy, rewards


def test_plot_metrics_skips_non_finite_and_non_numeric_values(tmp_path):
    rows = [{"step": 1, "loss": float("nan"), "grad_norm": "n/a"}, {"step": 2, "loss": float("inf")},
            {"step": 3, "learning_rate": 5e-5}]
    png = plot_metrics(_write_rows(tmp_path / "m.jsonl", rows), tmp_path / "c.png")
    assert _png_size(png) == (400, 320)  # only the learning-rate panel has a finite number


def test_plot_metrics_without_any_curve_writes_nothing(tmp_path):
    assert plot_metrics(tmp_path / "absent.jsonl", tmp_path / "a.png") is None
    rows = [{"step": 1, "train_runtime": 3.2}, {"step": 2, "loss": float("nan")}]
    assert plot_metrics(_write_rows(tmp_path / "m.jsonl", rows), tmp_path / "b.png") is None
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
