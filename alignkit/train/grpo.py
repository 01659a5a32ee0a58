"""GRPO stage: RL with verifiable rewards (stage-module contract: ``ARGS_CLASS`` + ``run``).

``engine: alignkit`` runs :class:`alignkit.rl.loop.GRPOLoop` (the from-scratch CS336 loop on
:mod:`alignkit.rl.core`, rollouts from an alignkit Generator: ``hf``, ``vllm`` or ``http``);
``engine: trl`` runs TRL's ``GRPOTrainer`` with the same reward functions wrapped in TRL's
reward-function signature. See docs/rl.md for when to choose which.

Data (``task``): ``gsm8k`` (bundled GSM8K train/test, or ``data.path`` / ``data.eval_path`` JSONL
with ``question`` and ``answer``), or ``arithmetic`` (``a + b`` questions generated from the seed:
the quickstart's task, easy enough for a 135M model to move in minutes on a CPU).

Standalone: ``python -m alignkit.train.grpo RECIPE.yaml [key=value ...]`` (same as ``alignkit train``).
"""
from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from alignkit.generation.base import truncate_at_stop
from alignkit.rl.loop import GRPOLoop, GRPOSettings
from alignkit.rl.rewards import RewardPreset, get_reward

logger = logging.getLogger("alignkit.train.grpo")

ENGINES = ("alignkit", "trl")
BACKENDS = ("hf", "vllm", "http")
TASKS = ("gsm8k", "arithmetic")


@dataclass
class GRPOArgs:
    """The recipe's ``train:`` section for ``stage: grpo``. Batch sizes are global (all processes)."""

    # --- what to run
    engine: str = field(default="alignkit",
        metadata={"help": "alignkit (the from-scratch GRPO loop) or trl (TRL's GRPOTrainer)."})
    task: str = field(default="gsm8k",
        metadata={"help": "gsm8k (bundled or data.path JSONL with question/answer) or arithmetic "
                   "(generated a + b questions)."})
    reward: str = field(default="r1_zero",
        metadata={"help": "gsm8k, r1_zero or module.path:function (response, ground_truth) -> dict."})
    prompt: str | None = field(default=None,
        metadata={"help": "Bundled prompt name or a template with {question}; default: the reward's."})
    stop: list[str] | None = field(default=None,
        metadata={"help": "Stop strings; default: the reward's (r1_zero: </answer>)."})
    n_train: int | None = field(default=None,
        metadata={"help": "Use the first N training questions (None: all)."})
    n_val: int = field(default=64,
        metadata={"help": "Held-out questions scored greedily before/after training and every eval_every steps."})
    arithmetic_max: int = field(default=9,
        metadata={"help": "arithmetic task: operands drawn from 1..arithmetic_max."})
    # --- GRPO (CS336 A5 names)
    n_grpo_steps: int = field(default=200,
        metadata={"help": "Number of GRPO steps (rollout batch + its updates)."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    rollout_batch_size: int = field(default=256,
        metadata={"help": "Responses sampled per step (prompts x group_size)."})
    group_size: int = field(default=8,
        metadata={"help": "Responses per prompt (the group of the group-normalised advantage)."})
    train_batch_size: int = field(default=256,
        metadata={"help": "Responses per optimizer step; < rollout_batch_size means several steps "
                               "per rollout batch (off-policy)."})
    gradient_accumulation_steps: int = field(default=128,
        metadata={"help": "Micro-batches per optimizer step."})
    epochs_per_rollout_batch: int = field(default=1,
        metadata={"help": "Passes over each rollout batch (> 1: off-policy, use grpo_clip)."})
    loss_type: str = field(default="reinforce_with_baseline",
        metadata={"help": "no_baseline, reinforce_with_baseline or grpo_clip."})
    use_std_normalization: bool = field(default=True,
        metadata={"help": "Divide advantages by the group std (False: Dr. GRPO)."})
    advantage_eps: float = field(default=1e-6, metadata={"help": "Added to the group std."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO/GRPO clip epsilon (grpo_clip)."})
    length_normalization: str = field(default="mean",
        metadata={"help": "mean (per-sequence masked mean, GRPO) or constant "
                                   "(masked sum / normalize_constant, Dr. GRPO)."})
    normalize_constant: float | None = field(default=None,
        metadata={"help": "Constant for length_normalization=constant (None: max_new_tokens)."})
    beta: float = field(default=0.0,
        metadata={"help": "k3 KL penalty coefficient against the starting model (0: no reference model)."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    # --- sampling
    temperature: float = field(default=1.0, metadata={"help": "Rollout sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Rollout nucleus sampling."})
    min_new_tokens: int = field(default=4, metadata={"help": "Minimum generated tokens per rollout."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Maximum generated tokens per rollout."})
    eval_max_new_tokens: int | None = field(default=None,
        metadata={"help": "Validation generation cap (None: max_new_tokens); greedy."})
    val_samples: int = field(default=0,
        metadata={"help": "> 0: also score this many samples per held-out prompt at the training temperature "
                  "(fixed seed; the expected reward GRPO maximises). require_improvement then checks it."})
    improvement_sigmas: float = field(default=2.0,
        metadata={"help": "require_improvement with val_samples: the sampled held-out reward must rise by more "
                  "than this many standard errors of the paired per-prompt difference."})
    # --- rollout backend
    rollout_backend: str = field(default="hf",
        metadata={"help": "hf (transformers generate on the policy itself), vllm (in-process "
                              "vLLM, weights synced each step) or http (an OpenAI-compatible server)."})
    generation_batch_size: int = field(default=64,
        metadata={"help": "hf backend: prompts per generate call."})
    vllm_gpu_memory_utilization: float = field(default=0.85,
        metadata={"help": "vllm backend: fraction of GPU memory for vLLM."})
    http_base_url: str | None = field(default=None,
        metadata={"help": "http backend: e.g. http://localhost:8000/v1 (weights not synced)."})
    http_model: str | None = field(default=None, metadata={"help": "http backend: the served model name."})
    # --- bookkeeping
    seed: int = field(default=0, metadata={"help": "Seed for prompt sampling, generation and data."})
    output_dir: str = field(default="runs/grpo",
        metadata={"help": "Set by the recipe loader to the stage folder."})
    log_every: int = field(default=1, metadata={"help": "Log a metrics line every N steps."})
    rollout_table_every: int = field(default=10,
        metadata={"help": "Log a table of sample rollouts every N steps (0: never)."})
    rollout_table_size: int = field(default=4, metadata={"help": "Rows of the rollout table."})
    eval_every: int = field(default=0,
        metadata={"help": "Validation every N steps (0: only before and after)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at the end only)."})
    require_improvement: bool = field(default=False,
        metadata={"help": "Fail the stage (checks_failed) unless validation reward rose."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even if a GPU is present."})
    bf16: bool = field(default=False,
        metadata={"help": "Set from the hardware by the recipe loader (TRL engine)."})

    def __post_init__(self) -> None:
        for name, valid in (("engine", ENGINES), ("rollout_backend", BACKENDS), ("task", TASKS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: valid values are {', '.join(valid)}")

    def settings(self, preset: RewardPreset) -> GRPOSettings:
        """The loop's plain settings (shared field names) with the reward's stop strings."""
        names = {f.name for f in fields(GRPOSettings)}
        values = {k: v for k, v in asdict(self).items() if k in names}
        values["stop"] = list(self.stop if self.stop is not None else preset.stop)
        values["append_stop"] = preset.append_stop and bool(values["stop"])
        values["sync_weights"] = self.rollout_backend != "http"
        return GRPOSettings(**values)


ARGS_CLASS = GRPOArgs


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def arithmetic_examples(n: int, seed: int, max_operand: int = 9) -> list[dict]:
    """``n`` questions ``What is a + b?`` with a, b in 1..max_operand, from ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        out.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


def load_examples(args: GRPOArgs, data) -> tuple[list[dict], list[dict]]:
    """(train, val) rows with ``question`` and ``answer``; val disjoint from train for arithmetic."""
    from alignkit import resources
    from alignkit.eval.tasks.base import read_jsonl

    if args.task == "arithmetic":
        val = arithmetic_examples(args.n_val, args.seed + 10_007, args.arithmetic_max)
        held = {r["question"] for r in val}
        pool = arithmetic_examples(4 * (args.n_train or 256), args.seed, args.arithmetic_max)
        train = [r for r in pool if r["question"] not in held][: args.n_train or 256] or pool
        return train, val
    train_path = getattr(data, "path", None) or resources.data_path("gsm8k", "train.jsonl")
    val_path = getattr(data, "eval_path", None) or resources.data_path("gsm8k", "test.jsonl")
    train = read_jsonl(Path(train_path), ("question", "answer"))
    val = read_jsonl(Path(val_path), ("question", "answer"))
    return train[: args.n_train] if args.n_train else train, val[: args.n_val]


def prompt_template(args: GRPOArgs, preset: RewardPreset) -> str:
    from alignkit import resources

    text = args.prompt or preset.prompt
    template = text if "{question}" in text else resources.prompt(text)
    if "{question}" not in template:
        raise ValueError(f"train.prompt={text!r}: the template has no {{question}} field")
    return template


def format_prompts(rows: list[dict], template: str) -> tuple[list[str], list[str]]:
    return [template.replace("{question}", r["question"]) for r in rows], [r["answer"] for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Runtime objects
# ----------------------------------------------------------------------------------------------------------
def make_generator(args: GRPOArgs, policy, tokenizer, model_path: str | None = None):
    """The rollout Generator for ``rollout_backend``: hf shares the policy module; vllm loads
    ``model_path`` (the resolved model folder) and receives the weights after every step."""
    if args.rollout_backend == "hf":
        from alignkit.generation.hf import HFGenerator

        return HFGenerator(policy, tokenizer, batch_size=args.generation_batch_size)
    if args.rollout_backend == "vllm":
        from alignkit.generation.vllm import VLLMGenerator

        return VLLMGenerator(model_path, gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed)
    if not args.http_base_url or not args.http_model:
        raise ValueError("rollout_backend=http needs train.http_base_url and train.http_model")
    from alignkit.generation.openai_http import OpenAIHTTPGenerator

    logger.warning("rollout_backend=http: the server's weights are not updated; rollouts stay on its model")
    return OpenAIHTTPGenerator(args.http_base_url, args.http_model)


def _accelerator(use_cpu: bool):
    """An Accelerator when launched with several processes (CPU-only: gloo, ``cpu=True``), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=use_cpu or not torch.cuda.is_available())


def _load(recipe, model_path, device):
    from alignkit.models import load_model
    from alignkit.train.common import lora_config

    m = recipe.model
    fresh = model_path is None
    return load_model(model_path or m.name_or_path, dtype=m.dtype, device=device,
                      attn_implementation=m.attn_implementation, quantization=m.quantization,
                      lora=lora_config(recipe.lora), revision=m.revision if fresh else None,
                      gguf_file=m.gguf_file if fresh else None)


def _save(policy, tokenizer, stage_dir: Path, lora: bool) -> dict:
    """Full model in stage_dir/model (LoRA merged); the adapter too in stage_dir/adapter."""
    out: dict = {}
    if lora:
        policy.save_pretrained(stage_dir / "adapter")
        tokenizer.save_pretrained(stage_dir / "adapter")
        out["adapter_dir"] = str(stage_dir / "adapter")
        policy = policy.merge_and_unload()
    policy.save_pretrained(stage_dir / "model")
    tokenizer.save_pretrained(stage_dir / "model")
    out["model_dir"] = str(stage_dir / "model")
    return out


# ----------------------------------------------------------------------------------------------------------
# Stage entry point
# ----------------------------------------------------------------------------------------------------------
def run(recipe, stage_dir, model_path=None) -> dict:
    """Train with GRPO; returns ``{"model_dir", "metrics", "model_source", ...}``."""
    args: GRPOArgs = recipe.train
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if args.engine == "trl":
        return run_trl(recipe, stage_dir, model_path)
    torch.manual_seed(args.seed)
    acc = _accelerator(args.use_cpu)
    device = str(acc.device) if acc is not None else ("cpu" if args.use_cpu else None)
    # 1. policy (+ LoRA), tokenizer; a frozen reference copy only for the KL penalty
    policy, tokenizer, source = _load(recipe, model_path, device)
    ref = None
    if args.beta > 0:
        ref = _load(recipe, model_path, device)[0] if not recipe.lora.enabled else None
        ref = ref.eval().requires_grad_(False) if ref is not None else _lora_reference(policy)
    # 2. reward, prompts, data
    preset = get_reward(args.reward)
    template = prompt_template(args, preset)
    train_rows, val_rows = load_examples(args, recipe.data)
    train_p, train_a = format_prompts(train_rows, template)
    val_p, val_a = format_prompts(val_rows, template)
    prompt_name = args.prompt or preset.prompt
    logger.info("grpo: %d train / %d val questions, reward %s, prompt %s", len(train_p), len(val_p),
                args.reward, "(template from the recipe)" if "{question}" in prompt_name else prompt_name)
    # 3. generator, optimizer, loop
    generator = make_generator(args, policy, tokenizer, source.path)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2))
    settings = args.settings(preset)
    settings.resume = bool(getattr(recipe, "resume", False))  # continue from stage_dir/checkpoints
    loop = GRPOLoop(policy, tokenizer, generator, preset.fn, train_p, train_a, optimizer,
                    settings, val_prompts=val_p, val_answers=val_a, ref_model=ref, accelerator=acc)
    history = loop.train()
    # 4. save, summarise, check
    result = {"model_source": source.to_dict(), **_summary(history, args.improvement_sigmas)}
    if acc is None or acc.is_main_process:
        result.update(_save(policy, tokenizer, stage_dir, bool(recipe.lora.enabled)))
        (stage_dir / "grpo_summary.json").write_text(json.dumps(result, indent=2, default=str))
        _plot(stage_dir)
    if acc is not None:
        acc.wait_for_everyone()
        result.setdefault("model_dir", str(stage_dir / "model"))
    if args.require_improvement and not result["improved"]:
        result["checks_failed"] = ["validation reward did not rise"]
    return result


class _AdapterDisabled:
    """With LoRA the reference is the base model: the PEFT policy called with its adapter disabled."""

    def __init__(self, peft_model) -> None:
        self.model = peft_model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


def _lora_reference(policy):
    return _AdapterDisabled(policy)


VAL_KEYS = ("reward", "format_reward", "answer_reward")


def _summary(history: dict, sigmas: float = 2.0) -> dict:
    """Before/after table (greedy, and sampled when present) and the improvement check: the sampled
    held-out reward rose by more than ``sigmas`` paired standard errors, else (greedy only) it rose."""
    before, after = history.get("val_before") or {}, history.get("val_after") or {}
    table = {f"val{m}_{k}": {"before": before.get(f"val{m}_{k}"), "after": after.get(f"val{m}_{k}")}
             for m in ("", "_sampled") for k in VAL_KEYS}
    table = {k: v for k, v in table.items() if v["before"] is not None or v["after"] is not None}
    rows = [("greedy", k) for k in VAL_KEYS] + [("sampled", k) for k in VAL_KEYS]
    lines = [f"{'held-out':<10}{'':<15}{'before':>10}{'after':>10}"]
    for mode, k in rows:
        v = table.get(f"val{'_sampled' if mode == 'sampled' else ''}_{k}")
        if v is not None:
            lines.append(f"{mode:<10}{k:<15}{_fmt(v['before']):>10}{_fmt(v['after']):>10}")
    check = paired_improvement(history.get("val_before_per_prompt"), history.get("val_after_per_prompt"), sigmas)
    if check is not None:
        lines.append(f"sampled reward change {check['diff']:+.3f} (paired SE {check['se']:.3f} over "
                     f"{check['n']} prompts; needs > {sigmas:g} SE): {'ROSE' if check['improved'] else 'NOT SHOWN'}")
        improved = check["improved"]
    else:
        improved = (before.get("val_reward") is not None and after.get("val_reward") is not None
                    and after["val_reward"] > before["val_reward"])
    print("\n".join(lines), flush=True)
    last = {k: v for k, v in (history.get("last_step") or {}).items() if isinstance(v, (int, float))}
    return {"metrics": {**last, **{f"{k}_{w}": v[w] for k, v in table.items() for w in v}},
            "before_after": table, "improvement_check": check, "improved": improved}


def paired_improvement(before: list[float] | None, after: list[float] | None, sigmas: float) -> dict | None:
    """Mean per-prompt change after - before, its standard error std(d)/sqrt(n) (paired: same prompts,
    same sampling seed), and whether the mean exceeds ``sigmas`` standard errors. None without data."""
    if not before or not after or len(before) != len(after) or len(before) < 2:
        return None
    d = [a - b for a, b in zip(after, before)]
    n, mean = len(d), sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5
    return {"n": n, "diff": mean, "se": se, "sigmas": sigmas, "improved": mean > 0 and mean > sigmas * se}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plot(stage_dir: Path) -> None:
    try:
        from alignkit.train.callbacks import plot_metrics

        plot_metrics(stage_dir / "metrics.jsonl", stage_dir / "curves.png")
    except (OSError, ValueError, RuntimeError, ImportError) as err:  # plotting must never fail a run
        logger.warning("grpo: could not plot metrics: %s", err)


# ----------------------------------------------------------------------------------------------------------
# engine: trl
# ----------------------------------------------------------------------------------------------------------
def trl_reward_funcs(preset: RewardPreset, stop: list[str]) -> list:
    """Our reward in TRL's signature ``f(prompts, completions, answer, **kw) -> list[float]``: three
    functions (reward, format, answer) so TRL logs all three; use weights [1, 0, 0]. TRL's HF
    generation does not stop at strings, so completions are cut at the first stop string (re-appended
    when the format needs it) before scoring."""
    def score(completions, answer) -> list[dict]:
        out = []
        for completion, truth in zip(completions, answer):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            text, hit = truncate_at_stop(text, stop)
            out.append(preset.fn(text + (stop[0] if hit and preset.append_stop else ""), truth))
        return out

    def make(key: str):
        def fn(prompts, completions, answer, **kwargs) -> list[float]:
            return [d[key] for d in score(completions, answer)]

        fn.__name__ = key
        return fn

    return [make("reward"), make("format_reward"), make("answer_reward")]


def trl_config(args: GRPOArgs, stage_dir: Path):
    """TRL ``GRPOConfig`` from our settings (same meaning, TRL's names)."""
    from trl import GRPOConfig

    micro = args.train_batch_size // args.gradient_accumulation_steps
    opt_steps = args.n_grpo_steps * (args.rollout_batch_size // args.train_batch_size) * args.epochs_per_rollout_batch
    return GRPOConfig(
        output_dir=str(stage_dir), learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, max_steps=opt_steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.gradient_accumulation_steps,
        generation_batch_size=args.rollout_batch_size, num_generations=args.group_size,
        num_iterations=args.epochs_per_rollout_batch, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, beta=args.beta, epsilon=args.cliprange,
        scale_rewards="group" if args.use_std_normalization else "none",
        loss_type="grpo" if args.length_normalization == "mean" else "dr_grpo",
        max_grad_norm=args.max_grad_norm or 0.0, reward_weights=[1.0, 0.0, 0.0], seed=args.seed,
        logging_steps=args.log_every, save_steps=args.save_every or opt_steps, report_to="none",
        use_vllm=args.rollout_backend == "vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, use_cpu=args.use_cpu, bf16=args.bf16)


def greedy_val(model, tokenizer, prompts, answers, preset: RewardPreset, stop, max_new_tokens, batch_size) -> dict:
    """Mean greedy reward/format/answer on held-out prompts (the alignkit loop's ``evaluate``)."""
    from alignkit.generation.base import SamplingParams
    from alignkit.generation.hf import HFGenerator

    if not prompts:
        return {}
    gen = HFGenerator(model, tokenizer, batch_size=batch_size)
    done = gen.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop))
    tail = stop[0] if preset.append_stop and stop else ""
    scores = [preset.fn(c.text + (tail if c.finish_reason == "stop" else ""), a) for c, a in zip(done, answers)]
    return {f"val_{k}": sum(s[k] for s in scores) / len(scores) for k in ("reward", "format_reward", "answer_reward")}


def run_trl(recipe, stage_dir: Path, model_path=None) -> dict:
    """``engine: trl``: TRL's GRPOTrainer (its vLLM integration as is) with our rewards and data."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from alignkit.train.callbacks import MetricsJsonlCallback
    from alignkit.train.common import load_for_training, lora_config

    args: GRPOArgs = recipe.train
    model, tokenizer, source = load_for_training(recipe, model_path)
    tokenizer.padding_side = "left"
    preset = get_reward(args.reward)
    stop = list(args.stop if args.stop is not None else preset.stop)
    template = prompt_template(args, preset)
    train_rows, val_rows = load_examples(args, recipe.data)
    train_p, train_a = format_prompts(train_rows, template)
    val_p, val_a = format_prompts(val_rows, template)
    val_kw = {"preset": preset, "stop": stop, "max_new_tokens": args.eval_max_new_tokens or args.max_new_tokens,
                  "batch_size": args.generation_batch_size}
    before = greedy_val(model, tokenizer, val_p, val_a, **val_kw)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward_funcs(preset, stop), args=trl_config(args, stage_dir),
                          train_dataset=Dataset.from_list([{"prompt": p, "answer": a}
                                                           for p, a in zip(train_p, train_a)]),
                          processing_class=tokenizer, peft_config=lora_config(recipe.lora),
                          callbacks=[MetricsJsonlCallback(stage_dir / "metrics.jsonl")])
    trainer.train()
    after = greedy_val(trainer.model, tokenizer, val_p, val_a, **val_kw)
    last = {k: v for k, v in (trainer.state.log_history or [{}])[-1].items() if isinstance(v, (int, float))}
    result = {"model_source": source.to_dict(), **_summary({"val_before": before, "val_after": after,
                                                             "last_step": last})}
    if trainer.accelerator.is_main_process:
        result.update(_save(trainer.accelerator.unwrap_model(trainer.model), tokenizer, stage_dir,
                            bool(recipe.lora.enabled)))
    if args.require_improvement and not result["improved"]:
        result["checks_failed"] = ["validation reward did not rise"]
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m alignkit.train.grpo RECIPE.yaml [key=value ...]``: run a ``stage: grpo`` recipe."""
    from alignkit.pipeline import main as pipeline_main

    return pipeline_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    raise SystemExit(main())
