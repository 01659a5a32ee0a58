"""PPO stage: RLHF with a learned reward (stage-module contract: ``ARGS_CLASS`` + ``run`` + ``ignored_keys``).

Runs :class:`alignkit.rl.ppo.PPOLoop`, the GRPO stage's loop (:mod:`alignkit.rl.loop`: the same rollout
backends, prompts, validation, checkpoints and resume) with the PPO estimator: GAE over a value model and
a per-token KL penalty to a frozen reference (Ouyang et al. 2022, InstructGPT; Ziegler et al. 2019).

Models (``train.reward``, ``train.policy``, ``train.value_model``; see :class:`PPOArgs`):

* reward: a sequence-classification folder with one label (the ``reward`` stage's output), ``stage:NAME``
  (that step of the chain's output model), or a verifiable reward (``gsm8k``, ``r1_zero``,
  ``module.path:function``). Default: the previous chain step's model when it is a reward model.
* policy: ``model.name_or_path``, or the previous step's model; in a chain ``sft -> reward -> ppo`` the
  previous step is the reward model, so ``policy: stage:sft`` names the policy to start from.
* value model: initialised from the reward model (InstructGPT), else from the policy with a new score head.
* reference: the starting policy, frozen (with LoRA: the policy with its adapter disabled).

LoRA (``lora.enabled``) adapts the policy and the value model (the value model's score head is trained in
full). Outputs as the GRPO stage: ``metrics.jsonl``, ``checkpoints/step-N`` (policy, value, optimizer, RNG),
``model/`` (the policy, LoRA merged), ``adapter/``, ``value/``, ``ppo_summary.json``, ``curves.png``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from alignkit.data.io import write_json_atomic
from alignkit.models import load_model
from alignkit.rl.ppo import PPOConfig, PPOLoop
from alignkit.rl.rewards import RewardModelScorer, RewardPreset, get_reward
from alignkit.train import grpo
from alignkit.train.common import lora_config

logger = logging.getLogger("alignkit.train.ppo")

TASKS = (*grpo.TASKS, "prompts")
STAGE_PREFIX = "stage:"


def _arg(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PPOArgs(PPOConfig, grpo.RLStageArgs):
    """The recipe's ``train:`` section for ``stage: ppo``: every :class:`~alignkit.rl.ppo.PPOConfig` field
    (the loop's shared settings + PPO's, inherited), the RL stages' shared
    :class:`~alignkit.train.grpo.RLStageArgs` (task, prompt, optimizer, backend, device) and PPO's models."""

    reward: str | None = _arg(None, "Reward model folder (sequence classification, 1 label), stage:NAME (that "
                                    "chain step's model), or a verifiable reward (gsm8k, r1_zero, module:function "
                                    "(response, ground_truth) -> dict). None: the previous step's model, when it "
                                    "is a reward model.")
    policy: str | None = _arg(None, "Policy to start from: a model folder or stage:NAME (None: the previous step's "
                                    "model, or model.name_or_path). A chain sft -> reward -> ppo sets stage:sft.")
    value_model: str | None = _arg(None, "Folder the value model starts from (None: the reward model, as "
                                         "InstructGPT; with a verifiable reward: the policy with a new score head).")
    value_learning_rate: float | None = _arg(None, "AdamW learning rate of the value model (None: learning_rate).")

    def __post_init__(self) -> None:
        for name, valid in (("rollout_backend", grpo.BACKENDS), ("task", TASKS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: valid values are {', '.join(valid)}")
        self.check_task_eval()


ARGS_CLASS = PPOArgs
# task gsm8k (question/answer) or prompts (prompt, optional answer): path, eval_path, columns; template: every task
DATA_KEYS = frozenset({"path", "eval_path", "columns", "template"})
PROMPT_FIELDS = ("prompt",)  # task prompts: required; "answer" optional ("" when absent)


def unread_reason(args: PPOArgs, f: dataclasses.Field) -> str | None:
    """Why the path ``args`` selects (task, rollout_backend) does not read field ``f``; None when it does.
    The loop's ``when`` conditions name GRPO fields (loss_type): PPO always reads those fields."""
    name, meta = f.name, f.metadata
    if name in grpo.DERIVED:
        return f"{grpo.DERIVED[name]}; not a recipe key"
    if "alignkit" not in meta.get("engines", ("alignkit",)):
        return "read by stage grpo with engine trl only"
    tasks = meta.get("tasks", TASKS)
    if args.task not in tasks:
        return f"read by task {' or '.join(tasks)}; this recipe's task is {args.task}"
    backends = meta.get("backends", {}).get("alignkit", grpo.BACKENDS)
    if args.rollout_backend not in backends:
        return (f"read with rollout_backend {' or '.join(backends)}; this recipe's rollout_backend is "
                f"{args.rollout_backend}")
    return None


def ignored_keys(stage) -> dict[str, str]:
    """``{dotted_key: message}`` for every key of ``stage`` the selected path does not read (the contract of
    alignkit/train/__init__.py: each message starts with ``<key> is``)."""
    return grpo.rl_ignored_keys(stage, "ppo", ("gsm8k", "prompts"), unread_reason)


# ----------------------------------------------------------------------------------------------------------
# Data and model sources
# ----------------------------------------------------------------------------------------------------------
def load_prompt_rows(args: PPOArgs, data) -> tuple[list[dict], list[dict]]:
    """(train, val) rows with ``question`` and ``answer``. Task ``prompts``: each ``data.path`` row's ``prompt``
    (and ``answer``, "" when absent; ``data.columns`` maps other names onto them), validation from
    ``data.eval_path`` or the last ``n_val`` rows (held out); else the GRPO tasks."""
    if args.task != "prompts":
        return grpo.load_examples(args, data)
    if not getattr(data, "path", None):
        raise ValueError("train.task=prompts needs data.path (rows with a prompt field)")
    columns = getattr(data, "columns", None)
    grpo.check_columns(columns, (*PROMPT_FIELDS, "answer"))

    def read(path) -> list[dict]:
        rows = grpo.read_fields(path, columns, PROMPT_FIELDS, optional=("answer",))
        return [{"question": r["prompt"], "answer": r["answer"]} for r in rows]

    train = read(data.path)
    if getattr(data, "eval_path", None):
        val = read(data.eval_path)[: args.n_val]
    else:
        n_val = min(args.n_val, len(train) // 2)
        train, val = (train[:-n_val], train[-n_val:]) if n_val else (train, [])
    return (train[: args.n_train] if args.n_train else train), val


def resolve_stage(spec: str, stage_dir: Path) -> str:
    """``stage:NAME`` -> the output model of the chain step NAME (``<output_dir>/<i>_NAME/state.json``)."""
    name = spec[len(STAGE_PREFIX):]
    for folder in sorted(Path(stage_dir).parent.glob(f"*_{name}")):
        state = folder / "state.json"
        if state.exists():
            model_dir = (json.loads(state.read_text()).get("result") or {}).get("model_dir")
            if model_dir:
                return model_dir
    raise ValueError(f"train: {spec!r}: no finished chain step {name!r} with a model_dir next to {stage_dir} "
                     f"(stage: names a step of the same chain that ran before ppo)")


def is_reward_model(path: str | None) -> bool:
    """A model folder whose config names a ``*ForSequenceClassification`` architecture."""
    config = Path(path or "", "config.json")
    if not path or not config.is_file():
        return False
    return any(a.endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures") or [])


def model_sources(args: PPOArgs, stage_dir: Path, model_path: str | None) -> tuple[str | None, str]:
    """(policy folder or None for model.name_or_path, reward spec: a folder or a verifiable reward name)."""
    def resolve(spec):
        return resolve_stage(spec, stage_dir) if spec and spec.startswith(STAGE_PREFIX) else spec

    reward = resolve(args.reward)
    if reward is None:
        if not is_reward_model(model_path):
            raise ValueError("train.reward is not set and the previous step's model is no reward model: set "
                             "train.reward to a reward-model folder, stage:NAME or a verifiable reward")
        reward = model_path
    policy = resolve(args.policy)
    if policy is None and model_path is not None and model_path != reward:
        policy = model_path
    if policy is not None and is_reward_model(policy):
        raise ValueError(f"the policy would start from {policy}, a reward model: set train.policy (e.g. stage:sft)")
    return policy, reward


# ----------------------------------------------------------------------------------------------------------
# Runtime objects
# ----------------------------------------------------------------------------------------------------------
def _load_seq_cls(recipe, path: str | None, device, lora: bool):
    """A one-label sequence-classification model from ``path`` (None: ``model.name_or_path``)."""
    m, fresh = recipe.model, path is None
    model, tok, _ = load_model(path or m.name_or_path, dtype=m.dtype, device=device,
                               attn_implementation=m.attn_implementation,
                               lora=lora_config(recipe.lora, task_type="SEQ_CLS") if lora else None,
                               revision=m.revision if fresh else None, gguf_file=m.gguf_file if fresh else None,
                               model_class=AutoModelForSequenceClassification, num_labels=1)
    return model, tok


def reward_preset(args: PPOArgs, reward: str, recipe, device) -> RewardPreset:
    """The reward as a preset: a reward-model folder becomes a :class:`RewardModelScorer` (frozen)."""
    if Path(reward).is_dir():
        model, tok = _load_seq_cls(recipe, reward, device, lora=False)
        model.requires_grad_(False)
        scorer = RewardModelScorer(model, tok, batch_size=args.generation_batch_size)
        return RewardPreset(scorer, prompt="{question}" if args.task == "prompts" else "question_only")
    preset = get_reward(reward)
    return dataclasses.replace(preset, prompt="{question}") if args.task == "prompts" and not args.prompt else preset


def value_model(args: PPOArgs, recipe, reward: str, policy_path: str | None, tokenizer, device):
    """The value model: ``train.value_model``, else the reward model's weights, else the policy's."""
    source = args.value_model or (reward if Path(reward).is_dir() else policy_path)
    model, _ = _load_seq_cls(recipe, source, device, lora=bool(recipe.lora.enabled))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"value model {source or recipe.model.name_or_path}: its vocabulary is smaller than the "
                         "policy tokenizer's; the value model must share the policy's tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _optimizer(args: PPOArgs, policy, value):
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.learning_rate},
              {"params": [p for p in value.parameters() if p.requires_grad],
               "lr": args.value_learning_rate or args.learning_rate}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2))


# ----------------------------------------------------------------------------------------------------------
# Stage entry point
# ----------------------------------------------------------------------------------------------------------
def run(recipe, stage_dir, model_path=None) -> dict:
    """Train with PPO; returns ``{"model_dir", "metrics", "model_source", ...}``."""
    args: PPOArgs = recipe.train
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    grpo.check_template(getattr(recipe.data, "template", None), "ppo")
    torch.manual_seed(args.seed)
    acc = grpo._accelerator(args.use_cpu)
    device = str(acc.device) if acc is not None else ("cpu" if args.use_cpu else None)
    # 1. policy (+ LoRA), frozen reference, reward, value model
    policy_path, reward = model_sources(args, stage_dir, model_path)
    policy, tokenizer, source = grpo._load(recipe, policy_path, device)
    ref = None
    if args.kl_coef > 0:
        ref = grpo._lora_reference(policy) if recipe.lora.enabled else (
            grpo._load(recipe, policy_path, device)[0].eval().requires_grad_(False))
    preset = reward_preset(args, reward, recipe, device)
    value = value_model(args, recipe, reward, policy_path, tokenizer, device)
    # 2. prompts
    train_rows, val_rows = load_prompt_rows(args, recipe.data)
    template = grpo.prompt_template(args, preset)
    chat = getattr(recipe.data, "template", None)
    train_p, train_a = grpo.format_prompts(train_rows, template, tokenizer, chat)
    val_p, val_a = grpo.format_prompts(val_rows, template, tokenizer, chat)
    logger.info("ppo: %d train / %d val prompts, reward %s, policy %s", len(train_p), len(val_p), reward,
                source.path)
    # 3. generator, optimizer (policy + value), loop
    generator = grpo.rollout_generator(args, policy, tokenizer, source.path)
    config = args.loop_config(preset, resume=bool(recipe.resume), output_dir=str(stage_dir))
    loop = PPOLoop(policy, tokenizer, generator, preset.fn, train_p, train_a, _optimizer(args, policy, value),
                   config, value_model=value, ref_model=ref, val_prompts=val_p, val_answers=val_a,
                   accelerator=acc, **grpo.extra_eval_hook(args, tokenizer, stage_dir))
    history = loop.train()
    # 4. save, summarise, check
    result = {"model_source": source.to_dict(), **grpo._summary(history, args.improvement_sigmas)}
    if acc is None or acc.is_main_process:
        value.save_pretrained(stage_dir / "value")
        result.update(grpo._save(policy, tokenizer, stage_dir, bool(recipe.lora.enabled)), value_dir=str(
            stage_dir / "value"))
        write_json_atomic(stage_dir / "ppo_summary.json", result)
        grpo._plot(stage_dir)
    return grpo.finish(result, args, acc, stage_dir)
