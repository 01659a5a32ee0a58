"""DPO step (Rafailov et al. 2023, eq. 7): precomputed reference log-probs vs a live reference forward.

Both through ``trl.DPOTrainer`` on the same model, pairs, seed and batch size; the only difference is
``precompute_ref_log_probs``. The precompute pass (one reference forward per pair, in ``__init__``)
is timed separately: it is paid once per dataset, the per-step saving every step of every epoch.
The per-step losses must agree (same data order, same reference log-probs up to float noise).
"""
from __future__ import annotations

import json
import logging
import time

import torch

from alignkit.resources import data_path

from .common import Context, Row, tensor_bytes

logger = logging.getLogger("benchmarks")


def gsm8k_preference_pairs(n: int) -> list[dict]:
    """``n`` pairs: a GSM8K question, its own answer (chosen), the next row's answer (rejected)."""
    rows = []
    with open(data_path("gsm8k", "train.jsonl")) as fh:
        for line_no, line in enumerate(fh, 1):
            if len(rows) > n:
                break
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(f"gsm8k/train.jsonl line {line_no}: needs 'question' and 'answer' fields")
            rows.append(row)
    return [{"prompt": rows[i]["question"] + "\n", "chosen": rows[i]["answer"], "rejected": rows[i + 1]["answer"]}
            for i in range(n)]


def run_dpo(ctx: Context, pairs: list[dict], *, precompute: bool, batch: int, steps: int,
            lora: bool = False) -> dict:
    """``steps`` DPO steps; returns per-step losses, the timed steps/s and the precompute seconds.
    ``lora``: a LoRA policy (r 16, all linear layers); the live reference is the base model with the
    adapter disabled (TRL), so it holds no second copy."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tok = ctx.load()
    ref = None if precompute or lora else ctx.load()[0]
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    clock = ForwardClock()
    ends: list[tuple[float, float, float]] = []  # (time, no-grad forward s, grad forward s) at each step end

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append((time.perf_counter(), clock.seconds[False], clock.seconds[True]))

    args = DPOConfig(
        output_dir=str(ctx.workdir / f"dpo-{precompute}-{lora}"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=1e-4 if lora else 1e-6, beta=0.1, precompute_ref_log_probs=precompute, max_length=ctx.pick(96, 256),
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        bf16=False,  # TRL's configs default to bf16 autocast, on CPU too; alignkit's recipes use fp32 there
        dataloader_num_workers=0, disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tok, callbacks=[Clock()], peft_config=peft_config)
    init_s = time.perf_counter() - t0
    for m in (trainer.model, trainer.ref_model):  # after __init__: the precompute pass is not counted
        if m is not None:
            clock.attach(m.get_base_model() if hasattr(m, "get_base_model") else m)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    held_ref = trainer.ref_model
    n = len(ends) - 1  # step 1 is warm-up
    per_step = {"step_s": (ends[-1][0] - ends[0][0]) / n, "ref_forward_s": (ends[-1][1] - ends[0][1]) / n,
                "policy_forward_s": (ends[-1][2] - ends[0][2]) / n}
    per_step["backward_optimizer_other_s"] = per_step["step_s"] - per_step["ref_forward_s"] - per_step["policy_forward_s"]
    return {"losses": losses, "steps_per_s": 1 / per_step["step_s"], "init_s": init_s, "per_step": per_step,
            "ref_model_bytes": tensor_bytes(held_ref.parameters()) if held_ref is not None else 0}


class ForwardClock:
    """Seconds spent in a model's forward, split by grad mode: no-grad forwards during training are the
    reference's (a separate ref model, or the policy with its LoRA adapter disabled)."""

    def __init__(self):
        self.seconds = {False: 0.0, True: 0.0}
        self._starts: list[float] = []

    def attach(self, module) -> None:
        module.register_forward_pre_hook(lambda *_: self._starts.append(time.perf_counter()))
        module.register_forward_hook(self._stop)

    def _stop(self, *_):
        self.seconds[torch.is_grad_enabled()] += time.perf_counter() - self._starts.pop()


def _compare(ctx: Context, pairs: list[dict], *, batch: int, steps: int, lora: bool) -> tuple[dict, dict, dict]:
    """Live reference, then precomputed, same pairs and seed; the per-step losses must agree."""
    kind = "LoRA" if lora else "full"
    logger.info("dpo (%s): live reference, %d steps of %d pairs", kind, steps, batch)
    live = run_dpo(ctx, pairs, precompute=False, batch=batch, steps=steps, lora=lora)
    logger.info("dpo (%s): precomputed reference log-probs", kind)
    pre = run_dpo(ctx, pairs, precompute=True, batch=batch, steps=steps, lora=lora)
    n = min(len(live["losses"]), len(pre["losses"]))
    diff = max(abs(a - b) for a, b in zip(live["losses"][:n], pre["losses"][:n]))
    agreement = {"losses_live_ref": live["losses"], "losses_precomputed": pre["losses"],
                 "max_abs_diff": diff, "tol": 1e-5, "ok": n == steps and diff <= 1e-5}
    return live, pre, agreement


def bench_dpo(ctx: Context) -> list[Row]:
    batch, steps = ctx.pick((2, 3), (2, 7))  # full: 6 timed steps per path (the paths run one after the other)
    pairs = gsm8k_preference_pairs(batch * steps)
    rows = []
    for lora in ctx.pick((False,), (False, True)):
        live, pre, agreement = _compare(ctx, pairs, batch=batch, steps=steps, lora=lora)
        ref_mib = live["ref_model_bytes"] / 2**20
        share = live["per_step"]["ref_forward_s"] / live["per_step"]["step_s"]
        bound = 1 / (1 - share)  # Amdahl: the live step without its reference forward
        held = (f"the live path holds a {ref_mib:.0f} MiB reference model, the precomputed path none" if not lora
                else "LoRA: the live reference is the base with the adapter disabled (no second copy)")
        rows.append(Row(f"DPO step: precomputed ref log-probs vs live ref forward (TRL{', LoRA' if lora else ''})",
                        pre["steps_per_s"], live["steps_per_s"], "steps/s", target=1.3, agreement=agreement,
                        details={"batch_pairs": batch, "steps_timed": steps - 1, "precompute_s": pre["init_s"],
                                 "per_step_live": live["per_step"], "per_step_precomputed": pre["per_step"],
                                 "bound_from_profile": bound,
                                 "init_s_live": live["init_s"], "ref_model_MiB_live": ref_mib,
                                 "ref_model_MiB_precomputed": pre["ref_model_bytes"] / 2**20, "lora": lora},
                        notes=f"reference forward = {share:.0%} of a live step, so dropping it gives at most "
                              f"{bound:.2f}x; precompute pass {pre['init_s']:.1f} s once; {held}"))
        if not lora:
            rows.append(Row("DPO memory: reference model held during training", pre["ref_model_bytes"] / 2**20,
                            ref_mib, "MiB", higher_is_better=False,
                            notes="parameter bytes of trainer.ref_model (0: not held)"))
    return rows
