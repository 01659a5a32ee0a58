"""The RL loop (GRPO: Shao et al. 2024, DeepSeekMath; CS336 A5 ``grpo_train_loop``) as a component; PPO
(:mod:`alignkit.rl.ppo`) is this loop with the GAE estimator in place of the group-normalised one.

It takes runtime objects (policy, tokenizer, a :class:`~alignkit.generation.base.Generator`, a
reward function ``(response, ground_truth) -> {"reward", "format_reward", "answer_reward"}``,
formatted prompts + answers, an optimizer, :class:`GRPOConfig`, an optional reference model and
an optional ``accelerate.Accelerator``) and knows nothing of YAML. The maths lives in
:mod:`alignkit.rl.core`; this module schedules it.

Batch sizes are global (all processes together), as in CS336: a rollout batch of
``rollout_batch_size`` responses = ``rollout_batch_size // group_size`` prompts x ``group_size``
samples; it is cut into train batches of ``train_batch_size`` (one optimizer step each), each made
of ``gradient_accumulation_steps`` micro-batches. With ``N`` processes every process takes its own
``1/N`` of the prompts (whole groups) and micro-batches of ``train_batch_size // (N * grad_acc)``.
Gradients are averaged across processes with one all-reduce per optimizer step (no DDP wrapper).
Dropout is off during training (the policy is kept in eval mode) so that old and new
log-probs agree for the same weights.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignkit.data.io import write_json_atomic, write_text_atomic
from alignkit.eval.metrics import pass_at_k_mean
from alignkit.eval.tasks.base import pass_at_k_ks
from alignkit.generation.base import Completion, SamplingParams
from alignkit.rl.core import (
    POLICY_GRADIENT_LOSSES,
    compute_group_normalized_rewards,
    get_response_log_probs,
    grpo_microbatch_train_step,
    masked_mean,
    shared_prompt_log_probs,
    tokenize_prompt_and_output,
)

logger = logging.getLogger(__name__)

LENGTH_NORMALIZATIONS = ("mean", "constant")


def setting(default, help: str, **meta):
    """A config field with its ``help`` (and extra metadata such as ``when``)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RLLoopConfig:
    """The settings every RL loop here shares (GRPO's and PPO's: one rollout/update loop, two advantage
    estimators). Batch sizes are global (all processes). ``metadata["when"]`` = ``{other_field: values}``:
    the loop reads the field only while the other field has one of those values (e.g. ``cliprange`` only
    with ``loss_type: grpo_clip`` in GRPO)."""

    n_grpo_steps: int = setting(200, "Number of RL steps (GRPO or PPO: one rollout batch + its updates each).")
    rollout_batch_size: int = setting(256, "Responses sampled per step (prompts x group_size).")
    group_size: int = setting(8, "Responses per prompt (GRPO: the group of the group-normalised advantage).")
    train_batch_size: int = setting(256, "Responses per optimizer step; < rollout_batch_size means several "
                                    "steps per rollout batch (off-policy).")
    gradient_accumulation_steps: int = setting(128, "Micro-batches per optimizer step.")
    epochs_per_rollout_batch: int = setting(1, "Passes over each rollout batch (> 1: off-policy; GRPO: use "
                                          "grpo_clip; PPO: its epochs per rollout batch).")
    cliprange: float = setting(0.2, "PPO/GRPO clip epsilon of the policy ratio (GRPO: grpo_clip only).",
                          when={"loss_type": ("grpo_clip",)})
    max_grad_norm: float | None = setting(1.0, "Gradient clipping norm (None: off).")
    temperature: float = setting(1.0, "Rollout sampling temperature.")
    top_p: float = setting(1.0, "Rollout nucleus sampling.")
    min_new_tokens: int = setting(4, "Minimum generated tokens per rollout.")
    max_new_tokens: int = setting(1024, "Maximum generated tokens per rollout.")
    stop: list[str] | None = field(default=None, metadata={
        "help": "Stop strings for rollouts and validation (None: none; the GRPO stage uses its reward's, "
                "r1_zero: </answer>)."})
    append_stop: bool = setting(False, "Re-append the first stop string to completions that stopped (a format "
                                  "that ends with it, e.g. r1_zero's </answer>).")
    sync_weights: bool = setting(True, "generator.update_weights(policy) after each step (False: a server "
                                  "whose weights cannot be updated).")
    eval_max_new_tokens: int | None = setting(None, "Validation generation cap (None: max_new_tokens); greedy.")
    val_samples: int = setting(0, "> 0: also score this many samples per held-out prompt at the training "
                             "temperature (fixed seed; the expected reward GRPO maximises) and report "
                             "val_sampled_pass@k (k = 1, 2, 4, ... up to val_samples, and val_samples; a sample "
                             "passes when its answer_reward is 1).")
    seed: int = setting(0, "Seed for prompt sampling, rollout generation and micro-batch shuffling.")
    log_every: int = setting(1, "Log a metrics line every N steps.")
    rollout_table_every: int = setting(10, "Log a table of sample rollouts every N steps (0: never).")
    rollout_table_size: int = setting(4, "Rows of the rollout table.")
    eval_every: int = setting(0, "Validation every N steps (0: only before and after).")
    save_every: int = setting(0, "Checkpoint every N steps (0: at the end only).")
    output_dir: str | None = setting(None, "metrics.jsonl, rollouts.rank*.jsonl and checkpoints/ go here "
                                      "(None: nothing written).")
    resume: bool = setting(False, "Continue exactly from the newest complete output_dir/checkpoints/step-N "
                             "(weights, optimizer, RNG, step; False: start fresh, old checkpoints moved to "
                             "checkpoints.prev, old logs cleared).")


@dataclass
class GRPOConfig(RLLoopConfig):
    """Every setting of :class:`GRPOLoop` (defaults: CS336 A5 reference run, on-policy): the shared
    :class:`RLLoopConfig` plus GRPO's group-normalised advantage and its loss variants."""

    loss_type: str = setting("reinforce_with_baseline", "no_baseline, reinforce_with_baseline or grpo_clip.")
    use_std_normalization: bool = setting(True, "Divide advantages by the group std (False: Dr. GRPO).")
    advantage_eps: float = setting(1e-6, "Added to the group std.", when={"use_std_normalization": (True,)})
    length_normalization: str = setting("mean", "mean (per-sequence masked mean, GRPO) or constant "
                                           "(masked sum / normalize_constant, Dr. GRPO).")
    normalize_constant: float | None = setting(None, "Constant for length_normalization=constant "
                                                "(None: max_new_tokens).",
                                          when={"length_normalization": ("constant",)})
    beta: float = setting(0.0, "k3 KL penalty coefficient against a reference model (0: no reference model).")


#: settings that may change between a run and its resume (they do not change the trajectory's weights)
RESUME_MAY_CHANGE = ("n_grpo_steps", "log_every", "rollout_table_every", "rollout_table_size", "eval_every",
                     "save_every", "output_dir", "resume")


@dataclass
class Microbatch:
    """One micro-batch of a rollout batch, tokenized; old/ref log-probs filled once if needed."""

    input_ids: torch.Tensor  # (b, T)
    labels: torch.Tensor  # (b, T)
    response_mask: torch.Tensor  # (b, T) bool
    advantages: torch.Tensor  # (b, 1)
    raw_rewards: torch.Tensor  # (b, 1)
    old_log_probs: torch.Tensor | None = None  # (b, T), no grad
    ref_log_probs: torch.Tensor | None = None  # (b, T), no grad
    # PPO (alignkit.rl.ppo): per-token values of the rollout, GAE advantages and returns, no grad
    old_values: torch.Tensor | None = None  # (b, T)
    token_advantages: torch.Tensor | None = None  # (b, T)
    returns: torch.Tensor | None = None  # (b, T)


def check_batch_sizes(s: RLLoopConfig, num_processes: int = 1, label: str = "GRPO") -> int:
    """CS336's consistency checks (GRPO's loss settings too when ``s`` is a :class:`GRPOConfig`); returns the
    per-process micro-batch size. Errors start with ``"<label> settings:"`` and name the setting."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"{label} settings: {msg}")

    if isinstance(s, GRPOConfig):
        need(s.loss_type in POLICY_GRADIENT_LOSSES,
             f"loss_type={s.loss_type!r} is not one of {', '.join(POLICY_GRADIENT_LOSSES)}")
        need(s.length_normalization in LENGTH_NORMALIZATIONS,
             f"length_normalization={s.length_normalization!r} is not one of {', '.join(LENGTH_NORMALIZATIONS)}")
    for name in ("n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size",
                 "gradient_accumulation_steps", "epochs_per_rollout_batch"):
        need(getattr(s, name) >= 1, f"{name} must be >= 1, got {getattr(s, name)}")
    need(s.rollout_batch_size % s.group_size == 0,
         f"rollout_batch_size ({s.rollout_batch_size}) must be divisible by group_size ({s.group_size}); "
         "change rollout_batch_size or group_size")
    n_prompts = s.rollout_batch_size // s.group_size
    need(n_prompts % num_processes == 0,
         f"the {n_prompts} prompts per rollout batch (rollout_batch_size / group_size) must split evenly "
         f"over {num_processes} processes; change rollout_batch_size or the number of processes")
    need(s.train_batch_size >= s.group_size,
         f"train_batch_size ({s.train_batch_size}) must be >= group_size ({s.group_size}); raise train_batch_size")
    need(s.rollout_batch_size % s.train_batch_size == 0,
         f"rollout_batch_size ({s.rollout_batch_size}) must be a multiple of train_batch_size "
         f"({s.train_batch_size}); change train_batch_size")
    need(s.train_batch_size % (s.gradient_accumulation_steps * num_processes) == 0,
         f"train_batch_size ({s.train_batch_size}) must be divisible by gradient_accumulation_steps "
         f"({s.gradient_accumulation_steps}) x processes ({num_processes}); change gradient_accumulation_steps")
    if isinstance(s, GRPOConfig):
        need(s.beta >= 0, f"beta must be >= 0, got {s.beta}")
        need(s.loss_type != "grpo_clip" or s.cliprange > 0,
             f"cliprange must be > 0 for grpo_clip, got {s.cliprange}")
    return s.train_batch_size // (s.gradient_accumulation_steps * num_processes)


class GRPOLoop:
    """Runs :meth:`train`; see the module docstring. ``reward_fn(response, ground_truth) -> dict``, or an
    object with ``score_batch(prompts, responses, ground_truths) -> list[dict]`` (a reward model, see
    :class:`alignkit.rl.rewards.RewardModelScorer`): rewards are computed through :meth:`_score` either way.

    This is the one rollout/update loop: :class:`alignkit.rl.ppo.PPOLoop` subclasses it and replaces only the
    advantage estimator (GAE with a value model instead of group normalisation) and the per-micro-batch loss
    (hooks ``_sequence_advantages``, ``_make_microbatches``, ``_train_on_rollouts``, ``_modules``)."""

    label = "GRPO"

    def __init__(self, policy, tokenizer, generator, reward_fn: Callable[[str, str], dict],
                 train_prompts: Sequence[str], train_answers: Sequence[str], optimizer,
                 settings: RLLoopConfig, *, val_prompts: Sequence[str] = (), val_answers: Sequence[str] = (),
                 ref_model=None, accelerator=None, extra_eval: Callable[[object, int], dict] | None = None,
                 extra_eval_every: int = 0) -> None:
        """``extra_eval(policy, step) -> {name: number}``: more measurements of the policy (e.g. eval tasks such
        as the safety see-saw), run on process 0 before the first step and every ``extra_eval_every`` steps,
        logged on that step's metrics line."""
        if len(train_prompts) != len(train_answers) or not train_prompts:
            raise ValueError(f"{type(self).__name__}: {len(train_prompts)} train prompts but "
                             f"{len(train_answers)} answers (need the same number, at least one)")
        if len(val_prompts) != len(val_answers):
            raise ValueError(f"{type(self).__name__}: {len(val_prompts)} val prompts but {len(val_answers)} answers")
        if getattr(settings, "beta", 0) > 0 and ref_model is None:
            raise ValueError("GRPOLoop: settings.beta > 0 needs a ref_model (or set beta: 0)")
        self.acc = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.micro_batch_size = check_batch_sizes(settings, self.world, self.label)
        self.policy, self.tokenizer, self.generator = policy, tokenizer, generator
        self.reward_fn, self.optimizer, self.s, self.ref_model = reward_fn, optimizer, settings, ref_model
        self.train_prompts, self.train_answers = list(train_prompts), list(train_answers)
        self.val_prompts, self.val_answers = list(val_prompts), list(val_answers)
        self.out = Path(settings.output_dir) if settings.output_dir else None
        self.extra_eval, self.extra_eval_every = extra_eval, int(extra_eval_every)
        self.step = 0
        self.history: dict = {}
        self.n_old_log_prob_passes = 0  # forward passes for old log-probs (tests check "computed once")
        self.device = next(policy.parameters()).device
        if self.world > 1:
            self._broadcast_parameters()

    def _modules(self) -> dict:
        """The trained modules, by checkpoint file name (PPO adds its value model)."""
        return {"trainable.pt": self._unwrapped()}

    def _trainable_params(self) -> list:
        return [p for m in self._modules().values() for p in m.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ driver
    def train(self) -> dict:
        """All steps (with ``resume``: from the newest complete checkpoint, exactly); returns before/after
        validation + last metrics."""
        if self.s.resume and self.out is not None:
            self.load_checkpoint()
        elif self.out is not None and self.rank == 0:
            self._start_fresh()
        self.val_per_prompt: list[float] | None = None
        history: dict = self.history
        extra = {}
        if self.step == 0:
            history["val_before"] = self.evaluate()
            history["val_before_per_prompt"] = self.val_per_prompt
            extra = self._extra_eval()
        self._log_metrics({"step": self.step, **(history.get("val_before") or {}), **extra}, if_new=True)
        metrics: dict = {}
        while self.step < self.s.n_grpo_steps:
            # 1. one step (rollout, rewards, update, weight sync)
            metrics = self.train_step()
            # 2. validation at its interval
            if self.s.eval_every and self.step % self.s.eval_every == 0 and self.step < self.s.n_grpo_steps:
                metrics.update(self.evaluate())
            if self.extra_eval_every and self.step % self.extra_eval_every == 0:
                metrics.update(self._extra_eval())
            # 3. log, then checkpoint (a checkpoint at step N implies the line of step N is written)
            self._log_metrics(metrics)
            if self.step % self.s.log_every == 0 or self.step == self.s.n_grpo_steps:
                logger.info("%s step %d/%d: %s", self.label.lower(), self.step, self.s.n_grpo_steps,
                            _short(metrics))
            if self.s.save_every and self.step % self.s.save_every == 0:
                self.save_checkpoint()
        history["val_after"] = self.evaluate()
        history["val_after_per_prompt"] = self.val_per_prompt
        self._log_metrics({"step": self.step, "final": True, **history["val_after"]})
        if self.out is not None:
            self.save_checkpoint()
        history["last_step"] = metrics
        return history

    def _extra_eval(self) -> dict:
        """``extra_eval`` on process 0 (the others wait); {} when there is none."""
        if self.extra_eval is None:
            return {}
        out = self.extra_eval(self._unwrapped(), self.step) if self.rank == 0 else {}
        if self.acc is not None:
            self.acc.wait_for_everyone()
        return out

    def _start_fresh(self) -> None:
        """A fresh run starts fresh logs; old checkpoints move to ``checkpoints.prev`` (never resumed from)."""
        for stale in [self.out / "metrics.jsonl", *self.out.glob("rollouts.rank*.jsonl")]:
            stale.unlink(missing_ok=True)
        old = self.out / "checkpoints"
        if old.exists():
            prev = self.out / "checkpoints.prev"
            shutil.rmtree(prev, ignore_errors=True)
            old.rename(prev)
            logger.info("%s: fresh run (resume off): old checkpoints moved to %s", self.label.lower(), prev)

    def train_step(self) -> dict:
        """One step: numbered as in the module's task description."""
        s, t0 = self.s, time.perf_counter()
        # 1. sample this process's prompts, repeat each group_size times, generate
        prompts, answers = self._sample_prompts(self.step)
        completions = self.generator.generate(prompts, self._sampling_params(self.step))
        responses = [self._response_text(c) for c in completions]
        t_gen = time.perf_counter() - t0
        # 2. rewards, and the sequence-level advantages of the estimator (GRPO: group-normalised)
        scores = self._score(prompts, responses, answers)
        advantages, raw_rewards = self._sequence_advantages(scores, completions)  # (n,), (n,)
        # 3. tokenize; old log-probs (off-policy or grpo_clip) and ref log-probs, once, without grad
        t1 = time.perf_counter()
        micro = self._make_microbatches(prompts, responses, advantages, raw_rewards)
        n_tokens = sum(int(mb.labels.numel()) for mb in micro)
        t_logp = time.perf_counter() - t1
        # 4. epochs x optimizer steps x micro-batches
        t2 = time.perf_counter()
        train_stats = self._train_on_rollouts(micro)
        t_train = time.perf_counter() - t2
        # 5. make the generator use the new weights (no-op when it shares the module)
        if s.sync_weights:
            self.generator.update_weights(self._unwrapped())
        self.step += 1
        # 6. metrics (rewards gathered over processes), sample table
        metrics = {"step": self.step, **train_stats, **self._reward_metrics(scores, completions)}
        # every process makes the same collective calls whatever its own timings (a call made only when
        # a local duration passes a threshold leaves the other process waiting in a different collective)
        n_gen = self._sum(sum(c.num_tokens for c in completions))
        n_tok = self._sum(n_tokens)
        metrics.update(time_generation_s=t_gen, time_log_probs_s=t_logp, time_train_s=t_train,
                       generation_tokens_per_s=n_gen / max(t_gen, 1e-9),
                       log_prob_tokens_per_s=n_tok / t_logp if t_logp > 1e-3 else None,
                       train_tokens_per_s=n_tok * s.epochs_per_rollout_batch / max(t_train, 1e-9))
        if s.rollout_table_every and (self.step - 1) % s.rollout_table_every == 0:
            self._log_rollouts(prompts, responses, answers, scores, advantages)
        return metrics

    def _score(self, prompts: list[str], responses: list[str], truths: list[str]) -> list[dict]:
        """One dict per response (``reward`` at least): a batched scorer's ``score_batch`` or
        ``reward_fn(response, ground_truth)`` per response."""
        batch = getattr(self.reward_fn, "score_batch", None)
        if batch is not None:
            return batch(prompts, responses, truths)
        return [self.reward_fn(r, t) for r, t in zip(responses, truths)]

    def _sequence_advantages(self, scores: list[dict], completions) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPO: group-normalised advantages (Dr. GRPO: ``use_std_normalization`` off) and raw rewards."""
        it = iter(scores)
        advantages, raw_rewards, _ = compute_group_normalized_rewards(
            lambda _r, _t: next(it), scores, scores, self.s.group_size, self.s.advantage_eps,
            self.s.use_std_normalization)
        return advantages, raw_rewards

    # ------------------------------------------------------------------ rollouts
    def _sample_prompts(self, step: int) -> tuple[list[str], list[str]]:
        """This process's share of the step's prompts (whole groups), each repeated group_size times."""
        n_global = self.s.rollout_batch_size // self.s.group_size
        rng = random.Random(self.s.seed * 1_000_003 + step)
        pool = range(len(self.train_prompts))
        idx = rng.sample(pool, n_global) if n_global <= len(pool) else rng.choices(pool, k=n_global)
        share = n_global // self.world
        mine = idx[self.rank * share:(self.rank + 1) * share]
        prompts = [self.train_prompts[i] for i in mine for _ in range(self.s.group_size)]
        answers = [self.train_answers[i] for i in mine for _ in range(self.s.group_size)]
        return prompts, answers

    def _sampling_params(self, step: int) -> SamplingParams:
        s = self.s
        return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              min_new_tokens=s.min_new_tokens, stop=list(s.stop or ()),
                              seed=s.seed * 1_000_003 + step * self.world + self.rank)

    def _response_text(self, completion: Completion) -> str:
        """The completion as scored and trained on: stop string re-appended when the format needs it.

        Backends report EOS and stop strings alike as ``finish_reason == "stop"``, so an EOS right
        after an answer also gets the stop string. An empty completion (EOS at once) becomes EOS text.
        """
        text = completion.text
        if self.s.append_stop and self.s.stop and completion.finish_reason == "stop":
            text += self.s.stop[0]
        return text or (self.tokenizer.eos_token or "")

    # ------------------------------------------------------------------ log-probs and training
    def _make_microbatches(self, prompts, responses, advantages, raw_rewards) -> list[Microbatch]:
        """Shuffle once, cut into micro-batches, add old/ref log-probs under no_grad where needed."""
        order = list(range(len(prompts)))
        if not self._on_policy():  # on-policy every micro-batch feeds one optimizer step: keep groups together
            random.Random(self.s.seed + 7919 * self.step + self.rank).shuffle(order)
        need_old, need_ref = self._needs_old_and_ref()
        batches = []
        for start in range(0, len(order), self.micro_batch_size):
            # 1. tokenize this micro-batch's prompts + responses
            idx = order[start:start + self.micro_batch_size]
            tok = tokenize_prompt_and_output([prompts[i] for i in idx], [responses[i] for i in idx],
                                             self.tokenizer)
            mb = Microbatch(input_ids=tok["input_ids"].to(self.device), labels=tok["labels"].to(self.device),
                            response_mask=tok["response_mask"].to(self.device),
                            advantages=advantages[idx].unsqueeze(-1).to(self.device),  # (b, 1)
                            raw_rewards=raw_rewards[idx].unsqueeze(-1).to(self.device))  # (b, 1)
            # 2. old log-probs of the sampling policy: computed once, never differentiated
            if need_old:
                mb.old_log_probs = self._no_grad_log_probs(self.policy, mb)
                self.n_old_log_prob_passes += 1
            # 3. reference log-probs for the k3 KL penalty
            if need_ref:
                mb.ref_log_probs = self._no_grad_log_probs(self.ref_model, mb)
            batches.append(mb)
        return batches

    def _needs_old_and_ref(self) -> tuple[bool, bool]:
        """GRPO: old log-probs when off-policy (grpo_clip only reads them), reference log-probs for the k3
        penalty. On-policy (one epoch, one optimizer step per rollout batch: :meth:`_on_policy`) the policy
        has not moved since it generated, so the old log-probs are the current ones, detached, taken from
        the training forward itself (as TRL does): no separate no-grad pass."""
        need_old = self.s.epochs_per_rollout_batch > 1 or (self.s.loss_type == "grpo_clip" and not self._on_policy())
        return need_old, self.s.beta > 0

    def _on_policy(self) -> bool:
        """One pass over the rollout batch in one optimizer step: every micro-batch is trained on with the
        weights that generated it."""
        return self.s.epochs_per_rollout_batch == 1 and self.s.train_batch_size == self.s.rollout_batch_size

    @staticmethod
    def _no_grad_log_probs(model, mb: Microbatch) -> torch.Tensor:
        with torch.no_grad():
            return get_response_log_probs(model, mb.input_ids, mb.labels,
                                          response_mask=mb.response_mask)["log_probs"].detach()  # (b, T)

    def _log_probs_with_grad(self, mb: Microbatch) -> dict:
        """The policy's log-probs and entropies of a micro-batch. On-policy (no old log-probs to match bit
        for bit; groups kept together) each shared prompt runs once with its cache repeated for the group's
        responses (:func:`shared_prompt_log_probs`); else, like the no-grad passes, the padded batch from
        the first response column on (the same values up to float rounding)."""
        out = None
        if self._on_policy():
            out = shared_prompt_log_probs(self.policy, mb.input_ids, mb.labels, mb.response_mask,
                                          return_token_entropy=True)
        if out is None:
            out = get_response_log_probs(self.policy, mb.input_ids, mb.labels, return_token_entropy=True,
                                         response_mask=mb.response_mask)
        return out

    def _train_on_rollouts(self, micro: list[Microbatch]) -> dict:
        s, ga = self.s, self.s.gradient_accumulation_steps
        self.policy.eval()  # no dropout: old and new log-probs must agree for equal weights
        stats: dict[str, list[float]] = {"loss": [], "grad_norm": [], "token_entropy": [], "clip_fraction": [],
                                         "kl": []}
        for epoch in range(s.epochs_per_rollout_batch):
            for start in range(0, len(micro), ga):
                # 1. one optimizer step = gradient_accumulation_steps micro-batches
                loss_sum = 0.0
                for mb in micro[start:start + ga]:
                    # 2. log-probs with grad (+ entropy for logging)
                    out = self._log_probs_with_grad(mb)
                    # 3. policy-gradient loss (+ k3 KL), backward inside; on-policy, old = current, detached
                    old = mb.old_log_probs
                    if old is None and s.loss_type == "grpo_clip":
                        old = out["log_probs"].detach()
                    loss, meta = grpo_microbatch_train_step(
                        out["log_probs"], mb.response_mask, ga, s.loss_type, raw_rewards=mb.raw_rewards,
                        advantages=mb.advantages, old_log_probs=old, cliprange=s.cliprange,
                        length_normalization=s.length_normalization,
                        normalize_constant=float(s.normalize_constant or s.max_new_tokens),
                        ref_log_probs=mb.ref_log_probs, kl_beta=s.beta)
                    loss_sum += float(loss)
                    stats["token_entropy"].append(float(masked_mean(out["token_entropy"], mb.response_mask)))
                    for key in ("clip_fraction", "kl"):
                        if key in meta:
                            stats[key].append(float(meta[key]))
                # 4. average gradients over processes, clip, step
                stats["grad_norm"].append(self._optimizer_step())
                stats["loss"].append(loss_sum)
        return {k: sum(v) / len(v) if v else None for k, v in stats.items()}

    def _optimizer_step(self) -> float:
        params = self._trainable_params()
        if self.world > 1:
            self._all_reduce_grads(params)
        max_norm = self.s.max_grad_norm if self.s.max_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # ------------------------------------------------------------------ distributed helpers
    def _all_reduce_grads(self, params) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.acc.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def _broadcast_parameters(self) -> None:
        """Start every process from process 0's weights."""
        import torch.distributed as dist

        with torch.no_grad():
            for module in self._modules().values():
                for p in module.parameters():
                    dist.broadcast(p.data, src=0)

    def _gather(self, values: list[float]) -> list[float]:
        """All processes' values, rank 0's first. The lists may differ in length (e.g. held-out prompts
        that do not split evenly): padded to the longest for the collective, then trimmed."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # (n_local,)
        counts = self.acc.gather(torch.tensor([len(values)], device=self.device)).tolist()  # (world,)
        padded = self.acc.pad_across_processes(t, dim=0)  # (max n,)
        rows = self.acc.gather(padded).view(self.world, -1)  # (world, max n)
        return [x for r in range(self.world) for x in rows[r, :counts[r]].tolist()]

    def _sum(self, value: float) -> float:
        return sum(self._gather([float(value)]))

    def _unwrapped(self):
        return self.acc.unwrap_model(self.policy) if self.acc is not None else self.policy

    # ------------------------------------------------------------------ metrics, evaluation, rollouts table
    def _reward_metrics(self, scores: list[dict], completions: list[Completion], prefix: str = "") -> dict:
        """Means over all processes of reward, format/answer rewards (when the reward reports them) and
        response lengths (all; correct / incorrect when there is an answer reward)."""
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)
        out: dict = {}
        reward_keys = [k for k in ("reward", "format_reward", "answer_reward") if not scores or k in scores[0]]
        values = {k: self._gather([float(d[k]) for d in scores]) for k in reward_keys}
        lengths = self._gather([c.num_tokens for c in completions])
        out.update({f"{prefix}{k}": mean(v) for k, v in values.items()})
        out[f"{prefix}response_length"] = mean(lengths)
        if "answer_reward" in values:
            ans = values["answer_reward"]
            out[f"{prefix}response_length_correct"] = mean([n for n, a in zip(lengths, ans) if a > 0])
            out[f"{prefix}response_length_incorrect"] = mean([n for n, a in zip(lengths, ans) if a <= 0])
        return out

    def evaluate(self) -> dict:
        """Held-out rewards, gathered: greedy (``val_*``) and, with ``val_samples > 0``, the mean over
        ``val_samples`` samples per prompt at the training temperature (``val_sampled_*``): the expected
        reward GRPO maximises. The sampling seed is the same at every evaluation (paired comparison:
        before/after differ by the weights only). Per-prompt sampled means go to ``self.val_per_prompt``."""
        if not self.val_prompts:
            return {}
        mine = list(range(self.rank, len(self.val_prompts), self.world))
        n_tok = self.s.eval_max_new_tokens or self.s.max_new_tokens
        t0 = time.perf_counter()
        # 1. greedy
        params = SamplingParams(max_new_tokens=n_tok, temperature=0.0, stop=list(self.s.stop or ()))
        completions = self.generator.generate([self.val_prompts[i] for i in mine], params)
        scores = self._score([self.val_prompts[i] for i in mine], [self._response_text(c) for c in completions],
                             [self.val_answers[i] for i in mine])
        metrics = self._reward_metrics(scores, completions, prefix="val_")
        # 2. sampled at the training temperature, k per prompt, fixed seed
        if self.s.val_samples > 0:
            metrics.update(self._evaluate_sampled(mine, n_tok))
        logger.info("grpo validation at step %d (%d prompts, %.1fs): %s", self.step, len(self.val_prompts),
                    time.perf_counter() - t0, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                        if ("reward" in k or "pass@" in k) and v is not None))
        return metrics

    def _evaluate_sampled(self, mine: list[int], n_tok: int) -> dict:
        k = self.s.val_samples
        params = SamplingParams(max_new_tokens=n_tok, temperature=self.s.temperature, top_p=self.s.top_p,
                                min_new_tokens=self.s.min_new_tokens, stop=list(self.s.stop or ()),
                                seed=self.s.seed * 1_000_003 + 999_983 + self.rank)
        prompts = [self.val_prompts[i] for i in mine for _ in range(k)]
        completions = self.generator.generate(prompts, params)
        truths = [self.val_answers[i] for i in mine for _ in range(k)]
        scores = self._score(prompts, [self._response_text(c) for c in completions], truths)
        per_prompt = [sum(d["reward"] for d in scores[j * k:(j + 1) * k]) / k for j in range(len(mine))]
        self.val_per_prompt = self._gather(per_prompt)  # (n_val,) ordered by rank, then prompt
        return {**self._reward_metrics(scores, completions, prefix="val_sampled_"),
                **self._pass_at_k(scores, len(mine), k)}

    def _pass_at_k(self, scores: list[dict], n_prompts: int, k: int) -> dict:
        """``val_sampled_pass@K`` for K in :func:`~alignkit.eval.tasks.base.pass_at_k_ks` (k): pass_at_k_mean
        over all processes' prompts of (n = k samples, c = samples with ``answer_reward == 1``). ``{}``
        when the reward reports no ``answer_reward``."""
        if scores and "answer_reward" not in scores[0]:  # (no prompts here: still join the gather)
            return {}
        correct = [float(sum(float(d["answer_reward"]) == 1.0 for d in scores[j * k:(j + 1) * k]))
                   for j in range(n_prompts)]
        per_problem = [(k, int(c)) for c in self._gather(correct)]
        if not per_problem:
            return {}
        return {f"val_sampled_pass@{kk}": pass_at_k_mean(per_problem, kk) for kk in pass_at_k_ks(k)}

    def _log_rollouts(self, prompts, responses, answers, scores, advantages) -> None:
        rows = [{"step": self.step, "rank": self.rank, "prompt": prompts[i][-200:], "response": responses[i],
                 "ground_truth": answers[i], **scores[i], "advantage": float(advantages[i])}
                for i in range(min(self.s.rollout_table_size, len(prompts)))]
        for row in rows:
            logger.info("rollout step %d | reward %.2f (format %s, answer %s) adv %+.2f | gold %s | %r",
                        row["step"], row["reward"], row.get("format_reward", "-"), row.get("answer_reward", "-"),
                        row["advantage"], row["ground_truth"], row["response"][:160])
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / f"rollouts.rank{self.rank}.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def _log_metrics(self, metrics: dict, if_new: bool = False) -> None:
        """Append one line to metrics.jsonl (process 0 only)."""
        if self.out is None or self.rank != 0 or not metrics:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        if if_new and path.exists() and path.stat().st_size:
            return
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in metrics.items()}, default=float) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """``checkpoints/step-N/`` (process 0): trainable weights of each trained module, optimizer state,
        RNG states (torch, CUDA, python, numpy), step, settings and the validation history. Written into a
        temporary folder renamed into place, so a killed save never becomes the newest checkpoint."""
        if self.out is None:
            return None
        path = self.out / "checkpoints" / f"step-{self.step}"
        if self.rank == 0:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for fname, module in self._modules().items():
                torch.save({n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad},
                           tmp / fname)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            history = {k: v for k, v in self.history.items() if k.startswith("val_before")}
            write_json_atomic(tmp / "state.json", {"step": self.step, "settings": asdict(self.s), "history": history})
            if path.exists():  # the end-of-run save may repeat an interval save of the same step
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
            logger.info("%s: saved checkpoint %s", self.label.lower(), path)
        if self.acc is not None:
            self.acc.wait_for_everyone()
        return path

    def newest_checkpoint(self) -> Path | None:
        """The newest complete ``checkpoints/step-N`` (renamed into place, ``state.json`` present), or None."""
        root = self.out / "checkpoints" if self.out is not None else None
        if root is None or not root.is_dir():
            return None
        done = [p for p in root.glob("step-*") if p.name.split("-")[1].isdigit() and (p / "state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def load_checkpoint(self) -> bool:
        """Resume exactly from :meth:`newest_checkpoint`: weights, optimizer, RNG states, step, validation
        history; metrics.jsonl lines after step N are dropped. Refuses a checkpoint whose recorded settings
        differ (other than :data:`RESUME_MAY_CHANGE`), naming each changed key."""
        path = self.newest_checkpoint()
        if path is None:
            return False
        state = json.loads((path / "state.json").read_text())
        changed = {k: (v, getattr(self.s, k, None)) for k, v in state.get("settings", {}).items()
                   if k not in RESUME_MAY_CHANGE and _jsonable(getattr(self.s, k, None)) != v}
        if changed:
            diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ValueError(f"{path}: the run's settings changed since this checkpoint ({diff}); rerun with "
                             f"the same settings, or without resume (a fresh start), or another output_dir")
        for fname, module in self._modules().items():
            weights = torch.load(path / fname, map_location=self.device)
            missing = set(weights) - {n for n, _ in module.named_parameters()}
            if missing:
                raise ValueError(f"{path}/{fname}: parameters not in the model: {sorted(missing)[:5]}")
            module.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        if (path / "rng.pt").exists():
            _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        self.step = state["step"]
        self.history.update(state.get("history") or {})
        if self.s.sync_weights:
            self.generator.update_weights(self._unwrapped())
        self._truncate_metrics(self.step)
        logger.info("%s: resumed from %s (step %d)", self.label.lower(), path, self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (not the final line), each step once (the first kept)."""
        if self.rank != 0:
            return
        seen: set[int] = set()
        for name in ("metrics.jsonl", *(p.name for p in self.out.glob("rollouts.rank*.jsonl"))):
            path, keep = self.out / name, []
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    continue
                if row.get("step", 0) > step or row.get("final"):
                    continue
                if name == "metrics.jsonl":
                    if row.get("step", 0) in seen:
                        continue
                    seen.add(row.get("step", 0))
                keep.append(line)
            write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _short(metrics: dict) -> str:
    keys = ("loss", "grad_norm", "reward", "format_reward", "answer_reward", "token_entropy", "clip_fraction",
            "kl_ref", "value_loss", "explained_variance", "response_length", "val_reward", "val_sampled_reward",
            "time_generation_s", "time_train_s")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
