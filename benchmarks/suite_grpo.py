"""GRPO: alignkit's loop (``alignkit.rl.loop.GRPOLoop``) vs TRL's ``GRPOTrainer`` on the GRPO quickstart task.

Both sides get the same starting weights (one LoRA-wrapped model, deep-copied), the same prompts (the
quickstart's r1-zero arithmetic prompt; the train set is one rollout batch of questions, so every step
of both sees the same questions), the same reward (``r1_zero``; TRL's completions cut at the stop string
as ``engine: trl`` does), group size, completion cap, learning rate, steps and seed, and the same generation
backend (transformers ``generate``: TRL with ``use_vllm=False``; alignkit through ``HFGenerator``).
TRL's settings are the ones ``engine: trl`` derives (``alignkit.train.grpo.trl_config``).

Measured: steps/s of each (steps after the first, which both spend warming up), and where each step's
time goes. alignkit: the loop's own split (generation, no-grad log-probs, train). TRL: timers wrapped
around the trainer's own methods on the instance (``_generate``; ``_calculate_rewards``;
``_get_per_token_logps_and_entropies`` when called without grad = old/ref log-probs); train = the rest
of the optimizer step (``on_step_begin`` .. ``on_step_end`` callback).

alignkit's levers (each tested equal to the per-row path in tests/test_rl_core.py and tests/test_rl_loop.py):
HF generation with the reward's stop string (``</answer>``: every row stops there, ``generate`` exits when
all have; TRL's transformers path has no stop strings and runs to EOS or the cap, and trains on those
tokens); on-policy no old-log-prob pass (TRL: the same); the LM head, log-softmax and entropy only from
the first response column on (TRL: ``logits_to_keep``); and each group's shared prompt run once per
micro-batch with its KV cache repeated for the group's responses (``shared_prompt_log_probs``: with the
quickstart's ~150-token prompt and <= 48-token responses, a group of 4 trains on ~350 instead of ~800 tokens).

Agreement: (1) strict: per-token log-probs of the response tokens of one fixed batch, computed by
alignkit (``get_response_log_probs``, right-padded) and by TRL (its ``_get_per_token_logps_and_entropies``,
left-padded prompts, ``logits_to_keep``) at the shared starting weights, within 1e-4; (2) reward curves:
the mean per-sample reward, and the mean format reward, over all steps of both within 3 standard errors
(Welch) of each other (sampling noise: the two sample with different random streams), plus each side's
per-step means; ``*_informative`` says whether a comparison could have failed (False when neither side varies,
e.g. no sample rewarded at all).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from .common import Context, Row

logger = logging.getLogger("benchmarks")

SMOKE_PROMPT = "User: {question}\nAssistant: <think>"
QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "grpo_quickstart.yaml"
REWARD_KEYS = ("reward", "format_reward")  # compared between the two (trl_reward_funcs' first two functions)


def _settings(ctx: Context):
    """The quickstart recipe's ``train:`` section (GRPOArgs) and ``lora:``, cut to benchmark size."""
    from alignkit.config import load_recipe

    over = {"n_grpo_steps": ctx.pick(2, 3), "rollout_batch_size": ctx.pick(4, 8), "group_size": ctx.pick(2, 4),
            "train_batch_size": ctx.pick(4, 8), "gradient_accumulation_steps": 2,
            "max_new_tokens": ctx.pick(6, 48), "min_new_tokens": 1, "n_train": ctx.pick(2, 2),
            "rollout_table_every": 0, "log_every": 1, "use_cpu": True}
    recipe = load_recipe(QUICKSTART, [f"train.{k}={v}" for k, v in over.items()])
    return recipe.stages["grpo"]


def _models(ctx: Context, lora_args, seed: int):
    """Two identical LoRA-wrapped copies of the benchmark model (same adapter init) and the tokenizer."""
    from peft import get_peft_model

    from alignkit.train.common import lora_config

    model, tok = ctx.load()
    model.config.use_cache = True
    torch.manual_seed(seed)
    policy = get_peft_model(model, lora_config(lora_args))
    return policy, copy.deepcopy(policy), tok


def _recording(fn, sink: list):
    """``fn`` that also appends every reward it returns to ``sink`` (per call: one list per step)."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        sink.append([float(x["reward"]) if isinstance(x, dict) else float(x)
                     for x in (out if isinstance(out, list) else [out])])
        return out

    wrapped.__name__ = getattr(fn, "__name__", "reward")
    return wrapped


def _alignkit_stepper(policy, tok, args, preset, prompts, answers):
    """``(step, record)``: ``step()`` runs one timed ``GRPOLoop.train_step`` and appends to ``record``."""
    from alignkit.generation.hf import HFGenerator
    from alignkit.rl.loop import GRPOLoop

    record: dict = {"walls": [], "steps": [], "rewards": {key: [] for key in REWARD_KEYS}}
    per_call: dict[str, list[float]] = {key: [] for key in REWARD_KEYS}

    def reward_fn(response, truth):
        out = preset.fn(response, truth)
        for key, values in per_call.items():
            values.append(float(out[key]))
        return out

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate,
                            weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2))
    gen = HFGenerator(policy, tok, batch_size=args.rollout_batch_size)
    loop = GRPOLoop(policy, tok, gen, reward_fn, prompts, answers, opt, args.loop_config(preset))

    def step() -> None:
        t0 = time.perf_counter()
        m = loop.train_step()
        wall = time.perf_counter() - t0
        split = {"generation": m["time_generation_s"], "log_probs": m["time_log_probs_s"], "train": m["time_train_s"]}
        record["walls"].append(wall)
        for key, values in per_call.items():
            record["rewards"][key].append(values[:])
            values.clear()
        record["steps"].append({**split, "other": wall - sum(split.values()), "reward": m["reward"],
                                "loss": m["loss"], "response_length": m["response_length"]})
        logger.info("grpo: alignkit step %d: %.2fs (%s), reward %.3f", len(record["walls"]), wall,
                    ", ".join(f"{k} {v:.2f}s" for k, v in split.items()), m["reward"])

    return step, record


class _PhaseTimer:
    """Seconds spent in named trainer methods during the current optimizer step (wrapped on the instance)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, obj, name: str, phase: str, only_no_grad: bool = False) -> None:
        real = getattr(obj, name)

        def timed(*args, **kwargs):
            if only_no_grad and torch.is_grad_enabled():
                return real(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)


def _trl_trainer(policy, tok, args, preset, prompts, answers, workdir: Path, sinks: dict[str, list]):
    from datasets import Dataset
    from transformers.trainer_utils import SaveStrategy
    from trl import GRPOTrainer

    from alignkit.train.grpo import trl_config, trl_reward_funcs

    stop = args.loop_config(preset).stop
    funcs = trl_reward_funcs(preset, stop)
    for i, key in enumerate(REWARD_KEYS):
        funcs[i] = _recording(funcs[i], sinks[key])
    cfg = trl_config(args, workdir / "trl")
    cfg.save_strategy, cfg.disable_tqdm = SaveStrategy.NO, True  # no checkpoint inside the timed run
    cfg.activation_checkpointing = cfg.gradient_checkpointing = False  # TRL's default is on (memory for time): its fastest setting is off
    tok.padding_side = "left"
    return GRPOTrainer(model=policy, reward_funcs=funcs, args=cfg, processing_class=tok,
                       train_dataset=Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]))


def _run_trl(trainer, sinks: dict[str, list], between) -> dict:
    """TRL's ``train()`` with its phases timed; ``between()`` runs after each optimizer step, outside the
    timed window (alignkit's step: the two paths interleave, so load changes hit both alike)."""
    from transformers import TrainerCallback

    timer = _PhaseTimer()
    timer.wrap(trainer, "_generate", "generation")
    timer.wrap(trainer, "_calculate_rewards", "rewards")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", "log_probs", only_no_grad=True)
    walls, steps = [], []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.current.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            walls.append(time.perf_counter() - self.t0)
            steps.append(dict(timer.current))
            logger.info("grpo: TRL step %d: %.2fs (%s)", len(walls), walls[-1],
                        ", ".join(f"{k} {v:.2f}s" for k, v in timer.current.items()))
            between()

    trainer.add_callback(Steps())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    for s, w, h in zip(steps, walls, logs):
        s.setdefault("log_probs", 0.0)
        s["train"] = w - s.get("generation", 0.0) - s.get("rewards", 0.0) - s["log_probs"]
        s["other"], s["reward"] = s.pop("rewards", 0.0), h["reward"]
        s["response_length"] = h.get("completions/mean_length")
    return {"walls": walls, "steps": steps, "rewards": sinks}


def _log_prob_check(policy, trainer, tok, prompts: list[str], responses: list[str]) -> float:
    """Max |alignkit - TRL| per-token log-prob over the response tokens of one batch (same weights)."""
    from alignkit.rl.core import get_response_log_probs, tokenize_prompt_and_output

    batch = tokenize_prompt_and_output(prompts, responses, tok)
    with torch.no_grad():
        ours = get_response_log_probs(policy.eval(), batch["input_ids"], batch["labels"])["log_probs"]
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    o_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    width_p, width_o = max(map(len, p_ids)), max(map(len, o_ids))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width_p - len(p)) + p + o + [pad] * (width_o - len(o)) for p, o in zip(p_ids, o_ids)])
    mask = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(o)) + [0] * (width_o - len(o))
                         for p, o in zip(p_ids, o_ids)])
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width_o)
    diff = 0.0
    for row, (p, o) in enumerate(zip(p_ids, o_ids)):
        a = ours[row][batch["response_mask"][row]]
        b = theirs[row, :len(o)]
        diff = max(diff, float((a - b).abs().max()))
    return diff


def _split(run: dict) -> dict:
    """Mean seconds per phase over the timed steps (after the first) and their shares of the wall time."""
    timed = run["steps"][1:] or run["steps"]
    walls = run["walls"][1:] or run["walls"]
    wall = sum(walls) / len(walls)
    phases = {k: sum(s.get(k, 0.0) for s in timed) / len(timed) for k in ("generation", "log_probs", "train",
                                                                         "other")}
    return {"step_s": wall, **{f"{k}_s": v for k, v in phases.items()},
            **{f"{k}_share": v / wall for k, v in phases.items()}}


def _reward_agreement(ours: list[list[float]], theirs: list[list[float]], name: str = "reward") -> dict:
    """Mean per-sample ``name`` of both within 3 Welch standard errors. ``{name}_informative`` is False when
    neither side varies (e.g. no sample rewarded on either side): the check then passes without saying anything."""
    a = [x for step in ours for x in step]
    b = [x for step in theirs for x in step]
    se = math.sqrt(statistics.pvariance(a) / len(a) + statistics.pvariance(b) / len(b))
    diff = statistics.fmean(a) - statistics.fmean(b)
    return {f"mean_{name}_alignkit": statistics.fmean(a), f"mean_{name}_trl": statistics.fmean(b),
            f"mean_{name}_diff": diff, f"mean_{name}_tolerance": max(3 * se, 1e-6),
            f"{name}s_ok": abs(diff) <= max(3 * se, 1e-6), f"{name}_informative": se > 0,
            "samples": [len(a), len(b)]}


def bench_grpo(ctx: Context) -> list[Row]:
    from alignkit.rl.rewards import get_reward
    from alignkit.train.grpo import format_prompts, load_examples, prompt_template

    stage = _settings(ctx)
    args = dataclasses.replace(stage.train, prompt=SMOKE_PROMPT) if ctx.smoke else stage.train  # smoke: seconds
    preset = get_reward(args.reward)
    rows, _ = load_examples(args, stage.data)
    prompts, answers = format_prompts(rows, prompt_template(args, preset))
    ours_model, trl_model, tok = _models(ctx, stage.lora, args.seed)
    sinks: dict[str, list] = {key: [] for key in REWARD_KEYS}
    trainer = _trl_trainer(trl_model, tok, args, preset, prompts, answers, ctx.workdir, sinks)
    # 1. strict check at the shared starting weights: two prompts, responses of different lengths
    responses = [" 2 + 5 = 7 </think> <answer>7</answer>", " I add them </think> <answer>12"]
    logp_diff = _log_prob_check(ours_model, trainer, tok, [prompts[0], prompts[-1]], responses)
    # 2. TRL's steps, each followed by one of alignkit's (interleaved; same starting weights)
    step, ours = _alignkit_stepper(ours_model, tok, args, preset, prompts, answers)
    torch.manual_seed(args.seed)
    trl = _run_trl(trainer, sinks, between=step)
    split_ours, split_trl = _split(ours), _split(trl)
    rewards = {k: v for key in REWARD_KEYS for k, v in
               _reward_agreement(ours["rewards"][key], trl["rewards"][key], key).items()}
    ok = (logp_diff <= 1e-4 and all(rewards[f"{key}s_ok"] for key in REWARD_KEYS)
          and len(trl["walls"]) == len(ours["walls"]))
    agreement = {"log_prob_max_abs_diff": logp_diff, "log_prob_tolerance": 1e-4, **rewards,
                 "reward_per_step_alignkit": [s["reward"] for s in ours["steps"]],
                 "reward_per_step_trl": [s["reward"] for s in trl["steps"]], "ok": ok}
    keys = ("n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size", "gradient_accumulation_steps",
            "max_new_tokens", "learning_rate", "loss_type", "temperature", "seed")
    details = {"alignkit": split_ours, "trl": split_trl, "settings": {k: getattr(args, k) for k in keys},
               "lora": dataclasses.asdict(stage.lora), "stop": args.loop_config(preset).stop,
               "steps_alignkit": ours["steps"], "steps_trl": trl["steps"],
               "walls_alignkit": ours["walls"], "walls_trl": trl["walls"]}

    def shares(s: dict) -> str:
        return ", ".join(f"{k} {100 * s[f'{k}_share']:.0f}%" for k in ("generation", "log_probs", "train", "other"))

    notes = (f"alignkit {split_ours['step_s']:.2f} s/step ({shares(split_ours)}); TRL {split_trl['step_s']:.2f} "
             f"s/step ({shares(split_trl)}); response tokens {ours['steps'][-1]['response_length']:.0f} vs "
             f"{trl['steps'][-1].get('response_length') or float('nan'):.0f}")
    return [Row("GRPO steps/s: alignkit loop vs TRL GRPOTrainer (HF generate, LoRA)", 1 / split_ours["step_s"],
                1 / split_trl["step_s"], "steps/s", target=1.5, agreement=agreement, details=details, notes=notes)]
