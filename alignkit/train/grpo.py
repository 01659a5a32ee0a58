"""GRPO stage: RL with verifiable rewards (stage-module contract: ``ARGS_CLASS`` + ``run`` + ``ignored_keys``).

``engine: alignkit`` runs :class:`alignkit.rl.loop.GRPOLoop` (the from-scratch CS336 loop on
:mod:`alignkit.rl.core`, rollouts from an alignkit Generator: ``hf``, ``vllm`` or ``http``);
``engine: trl`` runs TRL's ``GRPOTrainer`` with the same reward functions wrapped in TRL's
reward-function signature. See docs/rl.md for when to choose which.

The recipe's ``train:`` section (:class:`GRPOArgs`) is the loop's :class:`~alignkit.rl.loop.GRPOConfig`
(same fields, defaults and help) plus the stage's own fields. :func:`ignored_keys` names every key the
recipe's engine/backend/task does not read, so that the recipe loader refuses it when a user sets it.

Data (``task``): ``gsm8k`` (bundled GSM8K train/test, or ``data.path`` / ``data.eval_path`` rows with
``question`` and ``answer``; ``data.columns`` maps other column names onto them), or ``arithmetic``
(``a + b`` questions generated from the seed: the quickstart's task, easy enough for a 135M model to move
in minutes on a CPU). ``data.template: chat`` sends each prompt (``train.prompt`` filled with the question)
as a user message through the policy tokenizer's chat template; unset, prompts are the plain text.

Run with ``alignkit train RECIPE.yaml [key=value ...]``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from alignkit import resources
from alignkit.data.io import LoadedRows, RowProblem, apply_columns, each_field, get_text, parsed_rows
from alignkit.generation.base import SamplingParams, truncate_at_stop
from alignkit.generation.factory import make_generator
from alignkit.models import load_model
from alignkit.rl.loop import GRPOConfig, GRPOLoop
from alignkit.rl.rewards import RewardPreset, get_reward
from alignkit.train.callbacks import plot_metrics
from alignkit.train.common import load_for_training, lora_config, resume_training, stage_callbacks
from alignkit.train.task_eval import KEYS as TASK_EVAL_KEYS
from alignkit.train.task_eval import TaskEvalArgs, score_tasks, settings_of
from alignkit.train.task_eval import ignored_keys as task_eval_ignored

logger = logging.getLogger("alignkit.train.grpo")

ENGINES = ("alignkit", "trl")
BACKENDS = ("hf", "vllm", "http")
TASKS = ("gsm8k", "arithmetic")


def _arg(default, help: str, **meta):
    """A stage field: ``help`` plus, where it matters, ``engines`` (the engines that read it; absent:
    all), ``backends`` ({engine: the rollout backends under which that engine reads it}) and ``tasks``."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RLStageArgs(TaskEvalArgs):
    """The stage-level fields the RL stages share (``grpo`` and ``ppo``): data task, prompt, optimizer, checks,
    rollout backend, device, eval tasks scored during training (``task_eval``). Each stage's ``train:`` class
    inherits them with its loop's config."""

    # --- data and prompt
    task: str = _arg("gsm8k", "gsm8k (bundled or data.path rows with question/answer; data.columns maps other "
                              "names), arithmetic (generated a + b questions) or, stage ppo, prompts (data.path "
                              "rows' prompt).")
    prompt: str | None = _arg(None, "Bundled prompt name or a template with {question}; default: the reward's.")
    n_train: int | None = _arg(None, "Use the first N training questions (None: all).")
    n_val: int = _arg(64, "Held-out questions scored greedily before/after training and every eval_every steps.")
    arithmetic_max: int = _arg(9, "arithmetic task: operands drawn from 1..arithmetic_max.", tasks=("arithmetic",))
    # --- optimizer (AdamW; the loop takes the optimizer object)
    learning_rate: float = _arg(1e-5, "AdamW learning rate.")
    weight_decay: float = _arg(0.0, "AdamW weight decay.")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.95, "AdamW beta2.")
    # --- checks
    improvement_sigmas: float = _arg(2.0, "require_improvement with val_samples: the sampled held-out reward "
                                          "must rise by more than this many standard errors of the paired "
                                          "per-prompt difference.", engines=("alignkit",))
    require_improvement: bool = _arg(False, "Fail the stage (checks_failed) unless validation reward rose.")
    # --- rollout backend
    rollout_backend: str = _arg("hf", "hf (transformers generate on the policy itself), vllm (in-process vLLM, "
                                      "weights synced each step) or http (an OpenAI-compatible server; engine "
                                      "alignkit only).")
    generation_batch_size: int = _arg(64, "Prompts per transformers generate call (engine alignkit: hf "
                                          "rollouts and validation; engine trl: validation).",
                                      backends={"alignkit": ("hf",)})
    vllm_gpu_memory_utilization: float = _arg(0.85, "vllm backend: fraction of GPU memory for vLLM.",
                                              backends={"alignkit": ("vllm",), "trl": ("vllm",)})
    http_base_url: str | None = _arg(None, "http backend: e.g. http://localhost:8000/v1 (weights not synced).",
                                     engines=("alignkit",), backends={"alignkit": ("http",)})
    http_model: str | None = _arg(None, "http backend: the served model name.",
                                  engines=("alignkit",), backends={"alignkit": ("http",)})
    # --- device
    use_cpu: bool = _arg(False, "Run on CPU even if a GPU is present.")

    def loop_config(self, preset: RewardPreset, *, resume: bool = False,
                    output_dir: str | None = None):
        """This section as the loop's config (a GRPOArgs is a GRPOConfig, a PPOArgs a PPOConfig) with the
        values the stage derives: the reward's stop strings (unless ``train.stop`` is set), whether to re-append one, weight
        sync (off for http servers), ``resume`` (the recipe's top-level key) and the stage folder."""
        stop = list(self.stop if self.stop is not None else preset.stop)
        return dataclasses.replace(self, stop=stop, append_stop=preset.append_stop and bool(stop),
                                   sync_weights=self.rollout_backend != "http", resume=resume,
                                   output_dir=self.output_dir if output_dir is None else output_dir)


@dataclass
class GRPOArgs(GRPOConfig, RLStageArgs):
    """The recipe's ``train:`` section for ``stage: grpo``: every :class:`GRPOConfig` field (the loop's
    settings, inherited, never restated), the RL stages' shared :class:`RLStageArgs` and GRPO's own.
    Batch sizes are global (all processes)."""

    engine: str = _arg("alignkit", "alignkit (the from-scratch GRPO loop) or trl (TRL's GRPOTrainer).")
    reward: str = _arg("r1_zero", "gsm8k, r1_zero or module.path:function (response, ground_truth) -> dict.")
    bf16: bool = _arg(False, "bf16 mixed precision in TRL's trainer (set from the hardware by the recipe "
                             "loader); engine alignkit trains in model.dtype.", engines=("trl",))

    def __post_init__(self) -> None:
        for name, valid in (("engine", ENGINES), ("rollout_backend", BACKENDS), ("task", TASKS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: valid values are {', '.join(valid)}")
        self.check_task_eval()
        if self.engine == "trl":
            trl_check(self)


ARGS_CLASS = GRPOArgs
# The data.* fields GRPO reads: path, eval_path, columns (task gsm8k: question/answer rows) and template (any task).
DATA_KEYS = frozenset({"path", "eval_path", "columns", "template"})
QA_FIELDS = ("question", "answer")  # the canonical names data.columns maps onto (task gsm8k)
TEMPLATES = (None, "chat")  # data.template values the RL stages take

# Loop fields the stage sets itself (GRPOArgs.loop_config): a recipe that sets one is refused.
DERIVED = {
    "append_stop": "set by the stage from the reward (whether its format re-appends the stop string)",
    "sync_weights": "set by the stage from rollout_backend (off for http: the server's weights stay)",
    "resume": "set from the recipe's top-level resume key",
}
# What engine trl reads, and where it goes: our field -> TRL GRPOConfig field (computed in trl_config).
TRL_NAMES = {
    "learning_rate": "learning_rate", "weight_decay": "weight_decay", "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2", "n_grpo_steps": "max_steps", "rollout_batch_size": "generation_batch_size",
    "train_batch_size": "per_device_train_batch_size", "gradient_accumulation_steps": "gradient_accumulation_steps",
    "group_size": "num_generations", "epochs_per_rollout_batch": "num_iterations",
    "max_new_tokens": "max_completion_length", "min_new_tokens": "generation_kwargs",
    "temperature": "temperature", "top_p": "top_p", "beta": "beta", "cliprange": "epsilon",
    "use_std_normalization": "scale_rewards", "length_normalization": "loss_type",
    "max_grad_norm": "max_grad_norm", "seed": "seed", "log_every": "logging_steps", "save_every": "save_steps",
    "rollout_backend": "use_vllm", "vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "use_cpu": "use_cpu", "bf16": "bf16",
}
# Fields engine trl reads outside TRL's config (run_trl): data, prompt and reward, the greedy held-out score,
# and loss_type, which trl_check holds to the objective TRL runs (grpo_clip; reinforce_with_baseline on-policy).
TRL_STAGE_READS = ("engine", "task", "n_train", "n_val", "arithmetic_max", "reward", "prompt", "stop",
                   "eval_max_new_tokens", "generation_batch_size", "require_improvement", "loss_type")
# Loop fields TRL's GRPOTrainer has no counterpart for: unread under engine trl.
TRL_UNREAD = {
    "advantage_eps": "TRL divides by the group std + 1e-4",
    "normalize_constant": "TRL's dr_grpo divides by max_new_tokens",
    "val_samples": "engine trl scores the held-out set greedily only",
    "eval_every": "engine trl scores the held-out set before and after training only",
    "rollout_table_every": "engine trl writes no rollout table",
    "rollout_table_size": "engine trl writes no rollout table",
    **{key: "the task-eval hook of alignkit's loop" for key in TASK_EVAL_KEYS},
}
DATA_READ = ("path", "eval_path", "columns")  # task gsm8k only (data.template: every task)


def _alternatives(values) -> str:
    return " or ".join(str(v) for v in values)


def unread_reason(args: GRPOArgs, f: dataclasses.Field) -> str | None:
    """Why the path ``args`` selects (engine, task, rollout_backend, and the loop's ``when`` conditions) does
    not read field ``f``; None when it does."""
    name, meta = f.name, f.metadata
    if name in DERIVED:
        return f"{DERIVED[name]}; not a recipe key"
    engines = meta.get("engines", ENGINES)
    if args.engine not in engines:
        return f"read by engine {_alternatives(engines)}; this recipe's engine is {args.engine}"
    tasks = meta.get("tasks", TASKS)
    if args.task not in tasks:
        return f"read by task {_alternatives(tasks)}; this recipe's task is {args.task}"
    if args.engine == "trl" and name in TRL_UNREAD:
        return f"read by engine alignkit ({TRL_UNREAD[name]}); this recipe's engine is trl"
    backends = meta.get("backends", {}).get(args.engine, BACKENDS)
    if args.rollout_backend not in backends:
        return (f"read by engine {args.engine} with rollout_backend {_alternatives(backends)}; this recipe's "
                f"rollout_backend is {args.rollout_backend}")
    if args.engine == "alignkit":  # GRPOConfig's `when`: the loop reads the field under these values only
        for other, values in meta.get("when", {}).items():
            if getattr(args, other) not in values:
                return (f"read by engine alignkit with {other} {_alternatives(values)}; this recipe's {other} "
                        f"is {getattr(args, other)}")
    return None


def ignored_keys(stage) -> dict[str, str]:
    """``{dotted_key: reason}`` for every key of ``stage`` (a StageRecipe: ``.train`` a GRPOArgs, ``.data``,
    ``.lora``) that the selected path does not read. The recipe loader refuses those the user set."""
    return rl_ignored_keys(stage, "grpo", ("gsm8k",), unread_reason)


def rl_ignored_keys(stage, name: str, data_tasks: tuple[str, ...], unread) -> dict[str, str]:
    """The RL stages' ``ignored_keys``: train fields by ``unread(args, field)`` (the stage's reason, or None);
    ``data.template`` read by every task; the other data keys (:data:`DATA_READ`) only by ``data_tasks``;
    ``lora.*`` only with LoRA on. Each message starts with ``<key> is`` (alignkit/train/__init__.py)."""
    args = stage.train
    tasks = " or ".join(data_tasks)
    out = {f"train.{f.name}": why for f in fields(args) if (why := unread(args, f)) is not None}
    out.update({k: v for k, v in task_eval_ignored(args).items() if k not in out})
    for f in fields(stage.data):
        if f.name == "template":
            continue  # the prompt's rendering: read by every task
        if f.name not in DATA_READ:
            out[f"data.{f.name}"] = (f"not read by stage {name} (it reads data.template, and data.path, "
                                     f"data.eval_path and data.columns with task {tasks})")
        elif args.task not in data_tasks:
            out[f"data.{f.name}"] = f"read by task {tasks}; this recipe's task is {args.task}"
    if not stage.lora.enabled:
        out.update({f"lora.{f.name}": "read with lora.enabled true; this recipe's lora.enabled is false"
                    for f in fields(stage.lora) if f.name != "enabled"})
    return {key: f"{key} is {why}" for key, why in out.items()}


def _on_policy(args: GRPOConfig) -> bool:
    return args.epochs_per_rollout_batch == 1 and args.train_batch_size == args.rollout_batch_size


def trl_check(args: GRPOArgs) -> None:
    """Values engine trl cannot honour, refused (the objective TRL runs must be the one the recipe names)."""
    if args.rollout_backend == "http":
        raise ValueError("train.rollout_backend=http is read by engine alignkit only (TRL's GRPOTrainer "
                         "generates with transformers or its own vLLM); engine trl takes hf or vllm")
    if args.loss_type == "no_baseline":
        raise ValueError("train.loss_type=no_baseline is read by engine alignkit only (TRL's GRPOTrainer "
                         "always subtracts the group mean); engine trl takes grpo_clip or reinforce_with_baseline")
    if args.loss_type == "reinforce_with_baseline" and not _on_policy(args):
        raise ValueError("train.loss_type=reinforce_with_baseline with off-policy steps (epochs_per_rollout_batch "
                         "> 1 or train_batch_size < rollout_batch_size) is read by engine alignkit only: TRL's "
                         "GRPOTrainer then runs the clipped objective; set train.loss_type=grpo_clip")


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
    if args.task == "arithmetic":
        val = arithmetic_examples(args.n_val, args.seed + 10_007, args.arithmetic_max)
        held = {r["question"] for r in val}
        pool = arithmetic_examples(4 * (args.n_train or 256), args.seed, args.arithmetic_max)
        train = [r for r in pool if r["question"] not in held][: args.n_train or 256] or pool
        return train, val
    columns = getattr(data, "columns", None)
    check_columns(columns, QA_FIELDS)
    train_path, val_path = getattr(data, "path", None), getattr(data, "eval_path", None)
    # data.columns maps the recipe's own files; the bundled GSM8K files have question/answer
    train = read_fields(train_path, columns, QA_FIELDS) if train_path else read_fields(
        resources.data_path("gsm8k", "train.jsonl"), None, QA_FIELDS)
    val = read_fields(val_path, columns, QA_FIELDS) if val_path else read_fields(
        resources.data_path("gsm8k", "test.jsonl"), None, QA_FIELDS)
    return train[: args.n_train] if args.n_train else train, val[: args.n_val]


def check_columns(columns: dict | None, allowed: tuple[str, ...]) -> None:
    """Refuse ``data.columns`` targets outside ``allowed`` (the fields the task reads), in one line."""
    unknown = sorted(set(columns or {}) - set(allowed))
    if unknown:
        raise ValueError(f"data.columns: unknown target(s) {', '.join(map(str, unknown))}; this task maps "
                         f"onto {', '.join(allowed)} ({{{allowed[0]}: your_column, ...}})")


def read_fields(path, columns: dict | None, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """Rows of ``path`` (any format :func:`alignkit.data.io.read_rows` reads) as ``{name: text}`` for the
    ``required`` fields (non-empty strings) and the ``optional`` ones ("" when absent), after ``columns``
    ({canonical: source column}) is applied. A bad row raises a DataError naming file, line and field."""
    columns = columns or {}

    def parse(data: dict) -> dict:
        data = apply_columns(data, columns, required + optional)

        def text(name: str) -> str:
            label = columns.get(name, name)
            value = get_text(data, name, label)
            if not value.strip():
                raise RowProblem(label, "empty text")
            return value

        row = dict(zip(required, each_field(required, text)))
        row.update({name: "" if data.get(name) is None else str(data[name]) for name in optional})
        return row

    return [parsed for _, parsed in parsed_rows(path, parse, LoadedRows())]


def prompt_template(args: GRPOArgs, preset: RewardPreset) -> str:
    """The prompt template (``train.prompt`` or the reward's): a bundled name or a text with {question}."""
    text = args.prompt or preset.prompt
    template = text if "{question}" in text else resources.prompt(text)
    if "{question}" not in template:
        raise ValueError(f"train.prompt={text!r}: the template has no {{question}} field")
    return template


def format_prompts(rows: list[dict], template: str, tokenizer=None, data_template: str | None = None
                   ) -> tuple[list[str], list[str]]:
    """(prompts, answers): each row's question put into ``template``; with ``data_template`` "chat" each
    prompt then goes through ``tokenizer``'s chat template (:func:`chat_prompts`)."""
    prompts = [template.replace("{question}", r["question"]) for r in rows]
    if data_template is not None:
        check_template(data_template)
        prompts = chat_prompts(prompts, tokenizer)
    return prompts, [r["answer"] for r in rows]


def check_template(value: str | None, stage: str = "grpo") -> None:
    """Refuse a ``data.template`` value the RL stages do not take (checked before any model is loaded)."""
    if value not in TEMPLATES:
        raise ValueError(f"data.template={value!r}: stage {stage} takes chat (each prompt as a user message "
                         "through the policy's chat template) or no value (plain-text prompts); the prompt text "
                         "itself is train.prompt")


def chat_prompts(prompts: list[str], tokenizer) -> list[str]:
    """Each prompt as one user message through the tokenizer's chat template, with the generation prompt.

    The rollout generators and TRL encode prompt text with the tokenizer's special tokens, so a leading BOS
    the template writes is dropped when the tokenizer adds it itself (else the policy would see it twice)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the policy"
        raise ValueError(f"data.template=chat: the tokenizer of {name} has no chat template; unset data.template "
                         "(plain-text prompts) or start from a model whose tokenizer has one")
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    adds_bos = bool(bos) and bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(text[len(bos):] if adds_bos and text.startswith(bos) else text)
    return out


# ----------------------------------------------------------------------------------------------------------
# Runtime objects
# ----------------------------------------------------------------------------------------------------------
def rollout_generator(args: GRPOArgs, policy, tokenizer, model_path: str | None = None):
    """The rollout Generator for ``rollout_backend``, from the one factory: hf shares the policy module;
    vllm loads ``model_path`` (the resolved model folder) and receives the weights after every step;
    http is a running server (its weights are not updated)."""
    if args.rollout_backend == "hf":
        name = model_path or getattr(policy, "name_or_path", "") or "policy"
        return make_generator(f"hf:{name}", model=policy, tokenizer=tokenizer, batch_size=args.generation_batch_size)
    if args.rollout_backend == "vllm":
        return make_generator(f"vllm:{model_path}", gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                              seed=args.seed)
    if not args.http_base_url or not args.http_model:
        raise ValueError("rollout_backend=http needs train.http_base_url and train.http_model")
    logger.warning("rollout_backend=http: the server's weights are not updated; rollouts stay on its model")
    return make_generator(args.http_base_url, model=args.http_model)


def _accelerator(use_cpu: bool):
    """An Accelerator when launched with several processes (CPU-only: gloo, ``cpu=True``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=use_cpu or not torch.cuda.is_available())


def _load(recipe, model_path, device):
    """(policy, tokenizer, source) on ``device``, with the recipe's LoRA adapter when enabled."""
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
def extra_eval_hook(args, tokenizer, stage_dir: Path) -> dict:
    """The loop's ``extra_eval``/``extra_eval_every`` for ``train.task_eval`` (e.g. the safety see-saw every N
    steps; files in ``<stage_dir>/task_eval/step-N/``), or nothing when no task is scored during training."""
    if not args.task_eval:
        return {}
    settings = settings_of(args)

    def hook(model, step: int) -> dict:
        return score_tasks(model, tokenizer, args.task_eval, stage_dir / "task_eval", settings, step=step,
                           seed=args.seed)

    return {"extra_eval": hook, "extra_eval_every": args.task_eval_steps}


def run(recipe, stage_dir, model_path=None) -> dict:
    """Train with GRPO; returns ``{"model_dir", "metrics", "model_source", ...}``."""
    args: GRPOArgs = recipe.train
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if args.engine == "trl":
        return run_trl(recipe, stage_dir, model_path)
    torch.manual_seed(args.seed)
    check_template(getattr(recipe.data, "template", None))
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
    chat = getattr(recipe.data, "template", None)
    train_p, train_a = format_prompts(train_rows, template, tokenizer, chat)
    val_p, val_a = format_prompts(val_rows, template, tokenizer, chat)
    prompt_name = args.prompt or preset.prompt
    logger.info("grpo: %d train / %d val questions, reward %s, prompt %s", len(train_p), len(val_p),
                args.reward, "(template from the recipe)" if "{question}" in prompt_name else prompt_name)
    # 3. generator, optimizer, loop
    generator = rollout_generator(args, policy, tokenizer, source.path)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2))
    config = args.loop_config(preset, resume=bool(recipe.resume), output_dir=str(stage_dir))
    loop = GRPOLoop(policy, tokenizer, generator, preset.fn, train_p, train_a, optimizer,
                    config, val_prompts=val_p, val_answers=val_a, ref_model=ref, accelerator=acc,
                    **extra_eval_hook(args, tokenizer, stage_dir))
    history = loop.train()
    # 4. save, summarise, check
    result = {"model_source": source.to_dict(), **_summary(history, args.improvement_sigmas)}
    if acc is None or acc.is_main_process:
        result.update(_save(policy, tokenizer, stage_dir, bool(recipe.lora.enabled)))
        (stage_dir / "grpo_summary.json").write_text(json.dumps(result, indent=2, default=str))
        _plot(stage_dir)
    return finish(result, args, acc, stage_dir)


def finish(result: dict, args, acc, stage_dir: Path) -> dict:
    """The RL stages' last step: every process waits for the main one's save and knows the model folder;
    ``require_improvement`` turns a validation reward that did not rise into a failed check."""
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


def steps_per_rollout(args: GRPOArgs) -> int:
    """TRL optimizer steps per GRPO step (one rollout batch): where a TRL checkpoint resumes exactly."""
    return (args.rollout_batch_size // args.train_batch_size) * args.epochs_per_rollout_batch


def trl_config(args: GRPOArgs, stage_dir: Path):
    """TRL's ``GRPOConfig`` from ours (same meaning, TRL's names; see TRL_NAMES). Step counts are TRL
    optimizer steps: ``steps_per_grpo_step`` of them per GRPO step (rollout batch)."""
    from trl import GRPOConfig as TRLGRPOConfig

    trl_check(args)
    micro = args.train_batch_size // args.gradient_accumulation_steps
    per_step = steps_per_rollout(args)
    opt_steps = args.n_grpo_steps * per_step
    min_tokens = "min_tokens" if args.rollout_backend == "vllm" else "min_new_tokens"  # vLLM / transformers
    return TRLGRPOConfig(
        output_dir=str(stage_dir), learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, max_steps=opt_steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.gradient_accumulation_steps,
        generation_batch_size=args.rollout_batch_size, num_generations=args.group_size,
        num_iterations=args.epochs_per_rollout_batch, max_completion_length=args.max_new_tokens,
        generation_kwargs={min_tokens: args.min_new_tokens},
        temperature=args.temperature, top_p=args.top_p, beta=args.beta, epsilon=args.cliprange,
        scale_rewards="group" if args.use_std_normalization else "none",
        loss_type="grpo" if args.length_normalization == "mean" else "dr_grpo",
        max_grad_norm=args.max_grad_norm or 0.0, reward_weights=[1.0, 0.0, 0.0], seed=args.seed,
        logging_steps=args.log_every * per_step, save_steps=args.save_every * per_step or opt_steps,
        report_to="none", use_vllm=args.rollout_backend == "vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, use_cpu=args.use_cpu, bf16=args.bf16)


def greedy_val(model, tokenizer, prompts, answers, preset: RewardPreset, stop, max_new_tokens, batch_size) -> dict:
    """Mean greedy reward/format/answer on held-out prompts (the alignkit loop's ``evaluate``)."""
    if not prompts:
        return {}
    name = getattr(model, "name_or_path", "") or "policy"
    gen = make_generator(f"hf:{name}", model=model, tokenizer=tokenizer, batch_size=batch_size)
    done = gen.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop))
    tail = stop[0] if preset.append_stop and stop else ""
    scores = [preset.fn(c.text + (tail if c.finish_reason == "stop" else ""), a) for c, a in zip(done, answers)]
    return {f"val_{k}": sum(s[k] for s in scores) / len(scores) for k in ("reward", "format_reward", "answer_reward")}


def run_trl(recipe, stage_dir: Path, model_path=None) -> dict:
    """``engine: trl``: TRL's GRPOTrainer (its vLLM integration as is) with our rewards and data; a rerun
    continues the current attempt from its newest complete checkpoint (:func:`common.resume_training`;
    a Ctrl-C stops at the end of the rollout batch, where the checkpoint resumes exactly)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    args: GRPOArgs = recipe.train
    check_template(getattr(recipe.data, "template", None))
    model, tokenizer, source = load_for_training(recipe, model_path)
    tokenizer.padding_side = "left"
    preset = get_reward(args.reward)
    stop = args.loop_config(preset).stop
    template = prompt_template(args, preset)
    train_rows, val_rows = load_examples(args, recipe.data)
    chat = getattr(recipe.data, "template", None)
    train_p, train_a = format_prompts(train_rows, template, tokenizer, chat)
    val_p, val_a = format_prompts(val_rows, template, tokenizer, chat)
    val_kw = {"preset": preset, "stop": stop, "max_new_tokens": args.eval_max_new_tokens or args.max_new_tokens,
              "batch_size": args.generation_batch_size}
    before = greedy_val(model, tokenizer, val_p, val_a, **val_kw)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward_funcs(preset, stop), args=trl_config(args, stage_dir),
                          train_dataset=Dataset.from_list([{"prompt": p, "answer": a}
                                                           for p, a in zip(train_p, train_a)]),
                          processing_class=tokenizer, peft_config=lora_config(recipe.lora),
                          callbacks=stage_callbacks(stage_dir, interrupt_boundary=steps_per_rollout(args)))
    _, info = resume_training(trainer, recipe, stage_dir)
    if info.get("interrupted"):
        return {"model_source": source.to_dict(), "model_dir": None, "global_step": trainer.state.global_step,
                **info}
    after = greedy_val(trainer.model, tokenizer, val_p, val_a, **val_kw)
    last = {k: v for k, v in (trainer.state.log_history or [{}])[-1].items() if isinstance(v, (int, float))}
    result = {"model_source": source.to_dict(), "resumed_from": info["resumed_from"],
              **_summary({"val_before": before, "val_after": after, "last_step": last})}
    if trainer.accelerator.is_main_process:
        result.update(_save(trainer.accelerator.unwrap_model(trainer.model), tokenizer, stage_dir,
                            bool(recipe.lora.enabled)))
    if args.require_improvement and not result["improved"]:
        result["checks_failed"] = ["validation reward did not rise"]
    return result
