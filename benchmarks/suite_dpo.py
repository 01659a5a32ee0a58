"""DPO step (Rafailov et al. 2023, eq. 7).

1. precomputed reference log-probs vs a live reference forward, both through ``trl.DPOTrainer`` on the same
   model, pairs, seed and batch size; the only difference is ``precompute_ref_log_probs``. The precompute
   pass (one reference forward per pair, in ``__init__``) is timed separately: it is paid once per dataset,
   the per-step saving every step of every epoch.
2. alignkit's DPO step (``AlignkitDPOTrainer``, ``padding_free: true``: chosen and rejected of every pair end
   to end in one row without pads, per-sequence attention on ``sdpa_varlen``; precomputed reference) vs TRL's
   best DPOTrainer configuration (precomputed reference; TRL 1.16 turns ``padding_free`` off), at a batch a
   TRL user would pick on CPU, both without gradient checkpointing. Three savings: the pads (at most
   ``1 / (1 - pad share)`` of the token-proportional compute), each pair's prompt run once (the rejected
   sequence reads the chosen one's prompt through ``sdpa_varlen``'s shared prefix), and the LM head, which
   alignkit runs on the completion positions only inside ``alignkit.losses.lm_head_log_probs`` (TRL's fused
   head scores every position, prompt and pads included, off CUDA).

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
            lora: bool = False, alignkit: bool = False, checkpointing: bool = True) -> dict:
    """``steps`` DPO steps; returns per-step losses, the timed steps/s and the precompute seconds.
    ``lora``: a LoRA policy (r 16, all linear layers); the live reference is the base model with the
    adapter disabled (TRL), so it holds no second copy. ``alignkit``: ``AlignkitDPOTrainer`` with loss dpo
    and padding-free pairs (the reference cache off, so the precompute pass is timed). ``checkpointing``:
    TRL's default gradient checkpointing (off is faster where the activations fit, as on CPU here)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignkit.train.dpo import AlignkitDPOTrainer, DPOArgs

    model, tok = ctx.load()
    ref = None if precompute or lora else ctx.load()[0]
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    clock = ForwardClock()
    ends: list[tuple[float, float, float]] = []  # (time, no-grad forward s, grad forward s) at each step end

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append((time.perf_counter(), clock.seconds[False], clock.seconds[True]))

    extra = {"loss": "dpo", "padding_free": True, "ref_cache_dir": "off"} if alignkit else {}
    args = (DPOArgs if alignkit else DPOConfig)(
        output_dir=str(ctx.workdir / f"dpo-{precompute}-{lora}-{alignkit}"), per_device_train_batch_size=batch,
        max_steps=steps, **extra,
        learning_rate=1e-4 if lora else 1e-6, beta=0.1, precompute_ref_log_probs=precompute,
        max_length=ctx.pick(96, 256),
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        gradient_checkpointing=checkpointing,
        bf16=False,  # TRL's configs default to bf16 autocast, on CPU too; alignkit's recipes use fp32 there
        dataloader_num_workers=0, disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer = (AlignkitDPOTrainer if alignkit else DPOTrainer)(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
        callbacks=[Clock()], peft_config=peft_config)
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
    timed = clock.tokens[len(clock.tokens) - n:]  # (tokens, real tokens, head positions) of the timed policy forwards
    return {"losses": losses, "steps_per_s": 1 / per_step["step_s"], "init_s": init_s, "per_step": per_step,
            "ref_model_bytes": tensor_bytes(held_ref.parameters()) if held_ref is not None else 0,
            "tokens_per_step": sum(t[0] for t in timed) / max(len(timed), 1),
            "head_positions_per_step": sum(t[2] for t in timed) / max(len(timed), 1),
            "pad_fraction": 1 - sum(t[1] for t in timed) / max(sum(t[0] for t in timed), 1),
            "prompt_shared": bool(getattr(trainer.data_collator, "share_prompt", False))}


class ForwardClock:
    """Seconds spent in a model's forward, split by grad mode: no-grad forwards during training are the
    reference's (a separate ref model, or the policy with its LoRA adapter disabled)."""

    def __init__(self):
        self.seconds = {False: 0.0, True: 0.0}
        self.calls = {False: 0, True: 0}
        self.tokens: list[tuple[int, int, int]] = []  # (batch tokens, real tokens, LM-head positions) per grad forward
        self._starts: list[float] = []
        self._hooks: list = []

    def attach(self, module) -> None:
        self._hooks += [module.register_forward_pre_hook(self._start, with_kwargs=True),
                        module.register_forward_hook(self._stop)]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _start(self, _module, args, kwargs):
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if torch.is_grad_enabled() and ids is not None:
            labels = kwargs.get("shift_labels")  # alignkit's compact head scores these; TRL's every position off CUDA
            head = int((labels != -100).sum()) if kwargs.get("compact_lm_head") and labels is not None else ids.numel()
            self.tokens.append((ids.numel(), int(mask.sum()) if mask is not None else ids.numel(), head))
        self._starts.append(time.perf_counter())

    def _stop(self, *_):
        self.seconds[torch.is_grad_enabled()] += time.perf_counter() - self._starts.pop()
        self.calls[torch.is_grad_enabled()] += 1


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


def bench_alignkit_vs_trl(ctx: Context) -> Row:
    """alignkit (padding-free pairs + precomputed reference) vs TRL DPOTrainer's best (precomputed reference, no
    gradient checkpointing), same pairs, seed and batch; the per-step losses must agree."""
    batch, steps = ctx.pick((2, 3), (4, 4))  # full: 3 timed steps of 4 pairs per path (smoke: small, fast)
    pairs = gsm8k_preference_pairs(batch * steps)
    logger.info("dpo: TRL DPOTrainer, precomputed reference, %d steps of %d pairs", steps, batch)
    trl = run_dpo(ctx, pairs, precompute=True, batch=batch, steps=steps, checkpointing=False)
    logger.info("dpo: alignkit padding-free, precomputed reference")
    ours = run_dpo(ctx, pairs, precompute=True, batch=batch, steps=steps, alignkit=True, checkpointing=False)
    n = min(len(trl["losses"]), len(ours["losses"]))
    diff = max(abs(a - b) for a, b in zip(trl["losses"][:n], ours["losses"][:n]))
    agreement = {"losses_trl": trl["losses"], "losses_alignkit": ours["losses"], "max_abs_diff": diff,
                 "tol": 1e-4, "ok": n == steps and diff <= 1e-4}
    pad = trl["pad_fraction"]
    bound = 1 / (1 - pad)  # token-proportional compute without TRL's pads
    return Row("DPO step: alignkit (padding-free + precomputed ref) vs TRL DPOTrainer best (precomputed ref)",
               ours["steps_per_s"], trl["steps_per_s"], "steps/s", target=1.6, agreement=agreement,
               details={"batch_pairs": batch, "steps_timed": steps - 1, "trl_pad_fraction": pad,
                        "tokens_per_step_trl": trl["tokens_per_step"],
                        "tokens_per_step_alignkit": ours["tokens_per_step"], "bound_from_padding": bound,
                        "lm_head_positions_trl": trl["head_positions_per_step"],
                        "lm_head_positions_alignkit": ours["head_positions_per_step"],
                        "prompt_shared_alignkit": ours["prompt_shared"],
                        "per_step_trl": trl["per_step"], "per_step_alignkit": ours["per_step"],
                        "precompute_s_trl": trl["init_s"], "precompute_s_alignkit": ours["init_s"]},
               notes=f"TRL pads {pad:.0%} of its batch (~{bound:.2f}x of the token-proportional work) and alignkit "
                     f"runs each prompt {'once' if ours['prompt_shared'] else 'per sequence'}: "
                     f"{trl['tokens_per_step']:.0f} vs {ours['tokens_per_step']:.0f} tokens a step; "
                     f"the LM head runs on {ours['head_positions_per_step']:.0f} completion positions vs TRL's "
                     f"{trl['head_positions_per_step']:.0f} (its fused head scores every position off CUDA); init "
                     f"(precompute pass) {trl['init_s']:.1f} s TRL vs {ours['init_s']:.1f} s alignkit")


def bench_dpo(ctx: Context) -> list[Row]:
    batch, steps = ctx.pick((2, 3), (2, 7))  # full: 6 timed steps per path (the paths run one after the other)
    pairs = gsm8k_preference_pairs(batch * steps)
    rows = [bench_alignkit_vs_trl(ctx)]
    for lora in (False,):  # the LoRA variant of this TRL-vs-TRL row (1.22x last measured) is left out for time
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
