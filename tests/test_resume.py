"""Resume is the default and exact (docs/resume.md).

Slow: for SFT, DPO, reward and GRPO (engine trl), ``alignkit train`` runs a tiny recipe in a subprocess, is
killed (SIGINT or SIGKILL) after a checkpoint, and the SAME command is run again: the final weights equal an
uninterrupted run's, the LR at each logged step matches, and no step is logged twice.
Fast: which checkpoint counts (stale attempt, half-written save), metrics.jsonl cut back on resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from alignkit.cli import train as cli_train
from alignkit.train import common
from alignkit.train.callbacks import CHECKPOINT_MARKER, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRL_STAGES = {
    "sft": {"data": "sft", "train": {"max_length": 48}},
    "dpo": {"data": "pairs", "train": {"max_length": 48}},
    "reward": {"data": "pairs", "train": {"max_length": 48}},
    "kto": {"data": "pairs", "train": {"max_length": 48}},  # pairs unpaired on the fly: 16 rows
}


# ------------------------------------------------------------------------------------------------ helpers
def _data(tmp_path: Path, kind: str) -> Path:
    """8 rows: 4 steps per epoch at batch 2, so 8 steps cross an epoch (the sampler is reseeded)."""
    if kind == "sft":
        rows = [{"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."} for i in range(8)]
    else:
        rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"No idea {i}."}
                for i in range(8)]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, stage: str, model_dir: Path) -> Path:
    """A single-stage recipe: float32, 8 steps, warmup + linear decay (the LR differs at every step)."""
    raw = {"stage": stage, "seed": 0, "model": {"name_or_path": str(model_dir), "dtype": "float32"}}
    if stage == "grpo":
        raw["train"] = {"engine": "trl", "task": "arithmetic", "reward": "r1_zero", "n_grpo_steps": 6,
                        "rollout_batch_size": 4, "group_size": 2, "train_batch_size": 4,
                        "gradient_accumulation_steps": 1, "max_new_tokens": 6, "min_new_tokens": 1, "n_val": 2,
                        "n_train": 8, "use_cpu": True, "learning_rate": 1e-3, "log_every": 1, "save_every": 2}
    else:
        spec = TRL_STAGES[stage]
        raw["data"] = {"path": str(_data(tmp_path, spec["data"]))}
        if stage == "sft":
            raw["data"]["template"] = "alpaca_sft"
        raw["train"] = {"max_steps": 8, "per_device_train_batch_size": 2, "logging_steps": 1, "report_to": "none",
                        "gradient_checkpointing": False, "save_strategy": "steps", "save_steps": 2,
                        "learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 2,
                        "use_cpu": True, **spec["train"]}
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    return env


def _command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "alignkit", "train", str(recipe), f"output_dir={out}"]


def _run_and_kill(cmd: list[str], ready, sig: int, timeout: float = 120) -> tuple[int, str]:
    """Start ``cmd``; as soon as ``ready()`` holds send ``sig``; return (exit code, output)."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    else:
        proc.kill()
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "learning_rate" in r and "train_runtime" not in r]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _complete(out: Path, step: int) -> bool:
    return (out / f"checkpoint-{step}" / CHECKPOINT_MARKER).is_file()


def _logged_train_step(out: Path) -> bool:
    path = out / "metrics.jsonl"
    return path.exists() and '"learning_rate"' in path.read_text()


def _kill_and_resume(tmp_path, tiny_model_dir, stage: str, sig: int, final: str):
    recipe = _recipe(tmp_path, stage, tiny_model_dir)
    # 1. the uninterrupted reference (in process: the same code and float32 CPU kernels)
    ref = tmp_path / "ref"
    assert cli_train.main([str(recipe), f"output_dir={ref}"]) == 0
    # 2. the same recipe in a subprocess, stopped after a checkpoint
    out = tmp_path / "run"
    cmd = _command(recipe, out)
    if sig == signal.SIGKILL:
        code, log = _run_and_kill(cmd, lambda: _complete(out, 2), sig)
        assert code == -signal.SIGKILL, log
    else:
        code, log = _run_and_kill(cmd, lambda: _logged_train_step(out), sig)
        assert code == 130, log
        assert "continue with: alignkit train" in log and f"output_dir={out}" in log, log
        named = log.split("; checkpoint ", 1)[1].split()[0] if "; checkpoint " in log else None
        assert named and (Path(named) / CHECKPOINT_MARKER).is_file(), log
    assert not (out / "DONE").exists(), "the run finished before it was stopped"
    before = _train_rows(out)
    # 3. the SAME command again continues it from its newest complete checkpoint
    done = subprocess.run(cmd, check=False, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stderr and "checkpoint-" in done.stderr, done.stderr
    resumed_from = int(done.stderr.split("checkpoint-", 1)[1].split()[0])
    assert resumed_from >= 2
    # 4. weights, LR per step, each step once
    want, got = _weights(ref / final), _weights(out / final)
    assert want.keys() == got.keys()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, f"max abs weight difference {worst}"
    ref_rows, rows = _train_rows(ref), _train_rows(out)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    assert steps == [r["step"] for r in ref_rows]
    for r, w in zip(rows, ref_rows):
        assert r["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-9, abs=1e-15), r["step"]
    # the rows logged before the kill, up to the checkpoint, are kept as they were
    assert [r for r in rows if r["step"] <= resumed_from] == [r for r in before if r["step"] <= resumed_from]
    return rows, ref_rows


# ------------------------------------------------------------------------------------------------ slow: kill
@pytest.mark.slow
def test_sft_sigint_then_same_command_resumes_exactly(tmp_path, tiny_model_dir):
    rows, ref_rows = _kill_and_resume(tmp_path, tiny_model_dir, "sft", signal.SIGINT, "final")
    for r, w in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-6)  # the same batches in the same order


@pytest.mark.slow
def test_dpo_sigkill_after_checkpoint_then_same_command_resumes_exactly(tmp_path, tiny_model_dir):
    _kill_and_resume(tmp_path, tiny_model_dir, "dpo", signal.SIGKILL, "final")


@pytest.mark.slow
def test_reward_sigint_then_same_command_resumes_exactly(tmp_path, tiny_model_dir):
    _kill_and_resume(tmp_path, tiny_model_dir, "reward", signal.SIGINT, "final")


@pytest.mark.slow
def test_kto_sigkill_after_checkpoint_then_same_command_resumes_exactly(tmp_path, tiny_model_dir):
    _kill_and_resume(tmp_path, tiny_model_dir, "kto", signal.SIGKILL, "final")


@pytest.mark.slow
def test_grpo_trl_sigkill_after_checkpoint_then_same_command_resumes_exactly(tmp_path, tiny_model_dir):
    _kill_and_resume(tmp_path, tiny_model_dir, "grpo", signal.SIGKILL, "model")


# ------------------------------------------------------------------------------------------------ fast
def _checkpoint(stage_dir: Path, step: int, attempt: str | None, *, state: bool = True) -> Path:
    """A checkpoint folder as HF Trainer leaves it; the marker only when ``attempt`` is given."""
    folder = stage_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if attempt is not None:
        (folder / CHECKPOINT_MARKER).write_text(json.dumps({"attempt": attempt, "step": step}))
    return folder


def test_stale_checkpoint_of_an_earlier_attempt_is_ignored(tmp_path):
    old = common.start_attempt(tmp_path)
    _checkpoint(tmp_path, 8, old)  # the earlier attempt got further
    new = common.start_attempt(tmp_path)
    assert new != old and common.current_attempt(tmp_path) == new
    assert common.resume_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 3, new)
    assert common.resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")  # not checkpoint-8
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-8")  # what "highest wins" picks


def test_incomplete_checkpoint_is_ignored_and_removed(tmp_path):
    attempt = common.start_attempt(tmp_path)
    _checkpoint(tmp_path, 2, attempt)
    _checkpoint(tmp_path, 4, None)  # killed before the marker (written last)
    _checkpoint(tmp_path, 6, attempt, state=False)  # marker but no trainer_state.json
    bad = _checkpoint(tmp_path, 8, None)
    (bad / CHECKPOINT_MARKER).write_text('{"attempt": "')  # torn marker
    assert common.resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert common.drop_unusable_checkpoints(tmp_path, attempt) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt.json", "checkpoint-2"]


def test_marker_names_its_step(tmp_path):
    attempt = common.start_attempt(tmp_path)
    folder = _checkpoint(tmp_path, 4, attempt)
    (folder / CHECKPOINT_MARKER).write_text(json.dumps({"attempt": attempt, "step": 2}))  # copied folder
    assert common.resume_checkpoint(tmp_path) is None


def test_metrics_cut_back_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.4},
            {"step": 3, "loss": 2.0}, {"step": 3, "train_runtime": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn by a kill
    assert common.truncate_metrics(path, 2) == 3
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    # an earlier segment's end-of-training summary goes too (the resumed run writes its own)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common.truncate_metrics(path, 3)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:4]
    assert common.truncate_metrics(tmp_path / "absent.jsonl", 5) == 0
