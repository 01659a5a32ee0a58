"""Cost as the work grows, for the RL and eval paths (issue #16 item 6; SFT's sequence length and batch are
``suite_sft.bench_sft_scaling``, dataset rows ``suite_rl_data``): log-log plots with the fitted exponent.

* GRPO step time vs group size G: alignkit's loop (``alignkit.rl.loop.GRPOLoop``, the quickstart recipe's
  settings and LoRA, as ``suite_grpo`` runs it) at a fixed number of prompts per step and fixed response
  lengths (``min_new_tokens = max_new_tokens``, no stop string: every rollout has the same number of
  tokens whatever the sampled text), so only G changes. The loop's own phase timer splits each step into
  generation, log-probs (on-policy with ``beta: 0``: tokenization only, no no-grad forward) and train;
  one untimed warm-up step, then the G's steps interleaved, the fastest of each G's steps reported.
  One micro-batch per group (``gradient_accumulation_steps`` = prompts per step): each group's shared
  prompt runs once per micro-batch, so train time grows slower than the G-fold tokens.
* Eval generation time vs number of examples: GSM8K chat prompts, greedy, batch 8, through alignkit's
  ``HFGenerator`` (continuous batching, the default) and through the static batched ``model.generate``
  of ``suite_generation.static_generate``; the texts of both are compared one by one.

Rows report the fitted exponent (unit ``exponent``, no baseline: 1 is linear); ``details`` hold the points.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from peft import get_peft_model

from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.generation.base import SamplingParams
from alignkit.generation.hf import HFGenerator
from alignkit.rl.rewards import get_reward
from alignkit.train.common import lora_config
from alignkit.train.grpo import format_prompts, load_examples, prompt_template

from .common import Context, Plot, Row, fit_exponent, timed
from .suite_generation import PLAIN_CHAT_TEMPLATE, _text_agreement, chat_texts, static_generate
from .suite_grpo import SMOKE_PROMPT, _alignkit_stepper, _settings

logger = logging.getLogger("benchmarks")
PHASES = ("generation", "log_probs", "train")


def bench_rl_scaling(ctx: Context) -> list[Row]:
    """GRPO step time vs group size, then eval generation time vs number of examples."""
    return bench_grpo_group_scaling(ctx) + bench_eval_examples_scaling(ctx)


# ---------------------------------------------------------------------------------------------- GRPO
def _grpo_steppers(ctx: Context, groups: list[int], prompts_per_step: int, max_new: int):
    """One ``(step, record)`` of ``suite_grpo._alignkit_stepper`` per group size, all on one LoRA policy
    (each with its own optimizer and generator), and the recipe stage with the base settings they share."""
    stage = _settings(ctx)
    base = dataclasses.replace(stage.train, prompt=SMOKE_PROMPT) if ctx.smoke else stage.train
    base = dataclasses.replace(base, stop=[], min_new_tokens=max_new, max_new_tokens=max_new,
                               rollout_table_every=0)
    preset = get_reward(base.reward)
    rows, _ = load_examples(base, stage.data)
    prompts, answers = format_prompts(rows, prompt_template(base, preset))
    model, tok = ctx.load()
    model.config.use_cache = True
    torch.manual_seed(base.seed)
    policy = get_peft_model(model, lora_config(stage.lora))
    steppers = {}
    for g in groups:
        n = prompts_per_step * g  # rollouts per step; on-policy: one optimizer step over all of them
        args = dataclasses.replace(base, group_size=g, rollout_batch_size=n, train_batch_size=n,
                                   gradient_accumulation_steps=prompts_per_step)
        steppers[g] = _alignkit_stepper(policy, tok, args, preset, prompts, answers)
    return steppers, dataclasses.replace(stage, train=base)


def _grpo_seconds(steppers: dict, groups: list[int], rounds: int) -> tuple[dict, list, list]:
    """(seconds[name] per G, response lengths per G, timed walls per G): one untimed step at the smallest G
    (kernels, allocator), then ``rounds`` steps per G, interleaved (ascending, then descending: a drift in
    the machine's load hits every G alike); per G the fastest timed step (the least disturbed by other
    load) gives the wall time and the phases of the loop's own timer."""
    steppers[groups[0]][0]()
    skip = {g: len(rec["steps"]) for g, (_, rec) in steppers.items()}
    for r in range(rounds):
        for g in groups if r % 2 == 0 else groups[::-1]:
            steppers[g][0]()
        logger.info("scaling_rl: GRPO round %d/%d done", r + 1, rounds)
    seconds: dict[str, list[float]] = {"step": [], **{p: [] for p in PHASES}}
    lengths, walls_all = [], []
    for g in groups:
        record = steppers[g][1]
        steps, walls = record["steps"][skip[g]:], record["walls"][skip[g]:]
        best = min(range(len(walls)), key=walls.__getitem__)
        seconds["step"].append(walls[best])
        for p in PHASES:
            seconds[p].append(steps[best][p])
        lengths.append([s["response_length"] for s in steps])
        walls_all.append(walls)
    return seconds, lengths, walls_all


def bench_grpo_group_scaling(ctx: Context) -> list[Row]:
    """Seconds per GRPO step (and per phase) at G = 2, 4, 8 responses per prompt, prompts per step fixed."""
    groups = ctx.pick([2, 4], [2, 4, 8])
    prompts_per_step, max_new, rounds = ctx.pick(2, 2), ctx.pick(4, 16), ctx.pick(1, 2)
    steppers, stage = _grpo_steppers(ctx, groups, prompts_per_step, max_new)
    seconds, lengths, walls = _grpo_seconds(steppers, groups, rounds)
    k = {name: fit_exponent(groups, ys) for name, ys in seconds.items()}
    ctx.plots.append(Plot("grpo_step_seconds_vs_group_size",
                          f"GRPO step time vs group size ({prompts_per_step} prompts/step, {max_new} tokens each)",
                          "group size G (responses per prompt)", "seconds per step",
                          {name: (groups, ys) for name, ys in seconds.items()}, loglog=True))
    base = stage.train
    details = {"group_sizes": groups, "prompts_per_step": prompts_per_step, "max_new_tokens": max_new,
               "rollouts_per_step": [prompts_per_step * g for g in groups], "seconds": seconds,
               "exponents": k, "response_length": lengths, "timed_steps_per_g": rounds, "walls_per_g": walls,
               "settings": {"loss_type": base.loss_type, "beta": base.beta, "temperature": base.temperature,
                            "gradient_accumulation_steps": prompts_per_step, "lora": dataclasses.asdict(stage.lora)}}
    span = f"G={groups[0]}..{groups[-1]} at {prompts_per_step} prompts/step, {max_new} new tokens per rollout"
    label = {"step": "whole step", "generation": "generation phase",
             "log_probs": "log-probs phase", "train": "train phase"}
    notes = {"step": f"log-log fit over {span} (1: linear in rollouts); fastest of {rounds} steps per G; phases: "
                     + ", ".join(f"{p} {k[p]:.2f}" for p in PHASES),
             "generation": f"HFGenerator, all rollouts of a step in one batch; {span}",
             "log_probs": f"on-policy, beta {base.beta}: tokenizing the micro-batches only (no no-grad "
                          f"forward); {span}",
             "train": f"one micro-batch per group (its prompt run once, KV repeated for the G responses); {span}"}
    return [Row(f"scaling: GRPO {label[name]} time vs group size (fitted exponent)", k[name], None, "exponent",
                details=details, notes=notes[name]) for name in ("step", *PHASES)]


# ---------------------------------------------------------------------------------------------- eval
def bench_eval_examples_scaling(ctx: Context) -> list[Row]:
    """Seconds to generate for n GSM8K chat prompts (greedy, batch 8): HFGenerator vs static batched generate."""
    sizes, max_new = ctx.pick([4, 8, 16], [8, 16, 32]), ctx.pick(8, 32)
    model, tok = ctx.load()
    model.eval()
    if not tok.chat_template:  # the tiny smoke model's GPT-2 tokenizer
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    task = GSM8K()
    texts, params = chat_texts(tok, task, sizes[-1]), task.sampling_params("chat", max_new)
    gen = HFGenerator(model, tok, batch_size=8)
    warm = SamplingParams(max_new_tokens=2, stop=params.stop)
    static_generate(model, tok, texts[:2], warm, 8)
    gen.generate(texts[:2], warm)
    seconds: dict[str, list[float]] = {"alignkit HFGenerator": [], "static batched generate": []}
    agreements = []
    for i, n in enumerate(sizes):
        # alternate which path runs first (load changes on a shared machine hit both alike)
        runs = {"alignkit HFGenerator": lambda n=n: [c.text for c in gen.generate(texts[:n], params)],
                "static batched generate": lambda n=n: static_generate(model, tok, texts[:n], params, 8)}
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        out = {}
        for name in order:
            secs, out[name] = timed(runs[name])
            seconds[name].append(secs)
        agreements.append(_text_agreement(out["alignkit HFGenerator"], out["static batched generate"]))
        logger.info("scaling_rl: eval generation n=%d: %s", n, ", ".join(f"{k} {v[-1]:.2f}s" for k, v in
                                                                          seconds.items()))
    agreement = {"identical_texts": sum(a["identical_texts"] for a in agreements),
                 "n": sum(a["n"] for a in agreements), "per_size": agreements,
                 "ok": all(a["ok"] for a in agreements)}
    ctx.plots.append(Plot("eval_generation_seconds_vs_examples",
                          f"Eval generation time vs examples (GSM8K chat, greedy, batch 8, <= {max_new} tokens)",
                          "examples", "seconds", {name: (sizes, ys) for name, ys in seconds.items()}, loglog=True))
    details = {"examples": sizes, "max_new_tokens": max_new, "batch_size": 8, "seconds": seconds}
    span = f"log-log fit over n={sizes[0]}..{sizes[-1]} GSM8K chat prompts, greedy, batch 8, <= {max_new} tokens"
    return [
        Row("scaling: eval generation time vs examples, alignkit HFGenerator (fitted exponent)",
            fit_exponent(sizes, seconds["alignkit HFGenerator"]), None, "exponent", agreement=agreement,
            details=details, notes=f"{span}; continuous batching (1: linear; below 1 while n fills fewer "
                                   "than the 8 slots)"),
        Row("scaling: eval generation time vs examples, static batched generate (fitted exponent)",
            fit_exponent(sizes, seconds["static batched generate"]), None, "exponent", agreement=agreement,
            details=details, notes=f"{span}; model.generate in dataset order, left-padded, stop_strings; "
                                   "texts compared one by one with alignkit's"),
    ]
