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


def run_dpo(ctx: Context, pairs: list[dict], *, precompute: bool, batch: int, steps: int) -> dict:
    """``steps`` DPO steps; returns per-step losses, the timed steps/s and the precompute seconds."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tok = ctx.load()
    ref = None if precompute else ctx.load()[0]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = DPOConfig(
        output_dir=str(ctx.workdir / f"dpo-{precompute}"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=1e-6, beta=0.1, precompute_ref_log_probs=precompute, max_length=ctx.pick(96, 256),
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tok, callbacks=[Clock()])
    init_s = time.perf_counter() - t0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    held_ref = trainer.ref_model
    return {"losses": losses, "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "init_s": init_s,
            "ref_model_bytes": tensor_bytes(held_ref.parameters()) if held_ref is not None else 0}


def bench_dpo(ctx: Context) -> list[Row]:
    batch, steps = ctx.pick((2, 3), (1, 3))
    pairs = gsm8k_preference_pairs(batch * steps)
    logger.info("dpo: live reference, %d steps of %d pairs", steps, batch)
    live = run_dpo(ctx, pairs, precompute=False, batch=batch, steps=steps)
    logger.info("dpo: precomputed reference log-probs")
    pre = run_dpo(ctx, pairs, precompute=True, batch=batch, steps=steps)
    n = min(len(live["losses"]), len(pre["losses"]))
    diff = max(abs(a - b) for a, b in zip(live["losses"][:n], pre["losses"][:n]))
    agreement = {"losses_live_ref": live["losses"], "losses_precomputed": pre["losses"],
                 "max_abs_diff": diff, "tol": 1e-5, "ok": n == steps and diff <= 1e-5}
    ref_mib = live["ref_model_bytes"] / 2**20
    return [
        Row("DPO step: precomputed ref log-probs vs live ref forward (TRL)", pre["steps_per_s"],
            live["steps_per_s"], "steps/s", target=1.3, agreement=agreement,
            details={"batch_pairs": batch, "steps_timed": steps - 1, "precompute_s": pre["init_s"],
                     "init_s_live": live["init_s"], "ref_model_MiB_live": ref_mib,
                     "ref_model_MiB_precomputed": pre["ref_model_bytes"] / 2**20},
            notes=f"precompute pass {pre['init_s']:.1f} s once (vs {live['init_s']:.1f} s init live); "
                  f"the live path holds a {ref_mib:.0f} MiB reference model, the precomputed path none"),
        Row("DPO memory: reference model held during training", pre["ref_model_bytes"] / 2**20, ref_mib, "MiB",
            higher_is_better=False, notes="parameter bytes of trainer.ref_model (0: not held)"),
    ]
