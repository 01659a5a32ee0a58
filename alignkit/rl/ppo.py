"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT) on
the one RL loop of :mod:`alignkit.rl.loop`.

:class:`PPOLoop` is :class:`~alignkit.rl.loop.GRPOLoop` (the same prompt sampling, rollouts through the same
generation backends, reward scoring, validation, metrics, checkpoints and multi-process plumbing) with the
other advantage estimator: instead of normalising rewards within a group of samples, a value model
``V(s_t)`` (default: initialised from the reward model) gives per-token advantages by GAE over the
per-token reward ``r_t = -kl_coef * (log pi - log pi_ref)_t`` (+ the sequence score at the last token),
and the update adds a clipped value loss. Per rollout batch, in order:

1. score each response (reward model or verifiable reward), subtract the missing-EOS and length penalties;
2. old log-probs, reference log-probs and old values, once, under ``no_grad``;
3. per-token rewards (:func:`~alignkit.rl.core.kl_penalized_rewards`), GAE
   (:func:`~alignkit.rl.core.compute_gae`), advantages whitened over the whole rollout batch;
4. ``epochs_per_rollout_batch`` PPO epochs: clipped policy loss + ``vf_coef`` x clipped value loss
   (:func:`~alignkit.rl.core.ppo_microbatch_train_step`), one optimizer step per train batch (policy and
   value parameters together, gradients clipped together).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.rl.core import (
    compute_gae,
    explained_variance,
    get_response_log_probs,
    get_token_values,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_microbatch_train_step,
)
from alignkit.rl.loop import GRPOLoop, Microbatch, RLLoopConfig, setting

__all__ = ["PPOConfig", "PPOLoop", "penalized_scores"]


@dataclass
class PPOConfig(RLLoopConfig):
    """Every setting of :class:`PPOLoop`: the shared :class:`~alignkit.rl.loop.RLLoopConfig` (batch sizes,
    sampling, ``cliprange``, ``epochs_per_rollout_batch`` = PPO epochs, checkpoints) plus PPO's own."""

    kl_coef: float = setting(0.05, "Per-token KL penalty to the frozen reference in the reward, "
                              "r_t = -kl_coef * (log pi - log pi_ref) (0: no reference model).")
    gamma: float = setting(1.0, "GAE discount.")
    gae_lambda: float = setting(0.95, "GAE lambda (1: Monte-Carlo returns minus values, 0: one-step TD).")
    cliprange_value: float = setting(0.2, "Clip range of the value update around the rollout's values.")
    vf_coef: float = setting(0.1, "Weight of the value loss in the PPO loss.")
    whiten_advantages: bool = setting(True, "Whiten advantages (zero mean, unit variance) over the rollout batch.")
    missing_eos_penalty: float | None = setting(None, "Subtracted from the score of a response that hit max_new_tokens "
                                                 "without EOS or a stop string (None: no penalty).")
    length_penalty: float = setting(0.0, "Subtracted from the score per generated token (0: none).")


def penalized_scores(rewards: list[float], finished: list[bool], lengths: list[int], settings: PPOConfig,
                     ) -> torch.Tensor:
    """``(n,)`` sequence scores: reward - missing_eos_penalty (unfinished responses) - length_penalty x tokens."""
    out = []
    for r, done, n in zip(rewards, finished, lengths):
        if settings.missing_eos_penalty is not None and not done:
            r -= settings.missing_eos_penalty
        out.append(r - settings.length_penalty * n)
    return torch.tensor(out, dtype=torch.float32)


def _check(s: PPOConfig) -> None:
    problems = [f"{name} must be in [0, 1], got {getattr(s, name)}" for name in ("gamma", "gae_lambda")
                if not 0 <= getattr(s, name) <= 1]
    problems += [f"{name} must be > 0, got {getattr(s, name)}" for name in ("cliprange", "cliprange_value")
                 if getattr(s, name) <= 0]
    problems += [f"{name} must be >= 0, got {getattr(s, name)}" for name in ("kl_coef", "vf_coef", "length_penalty")
                 if getattr(s, name) < 0]
    if problems:
        raise ValueError("PPO settings: " + "; ".join(problems))


class PPOLoop(GRPOLoop):
    """The RL loop with GAE advantages from ``value_model`` (a sequence-classification model with one label,
    trained alongside the policy; ``optimizer`` must hold both models' trainable parameters). ``ref_model``
    is needed when ``kl_coef > 0``. Everything else as :class:`~alignkit.rl.loop.GRPOLoop`."""

    label = "PPO"

    def __init__(self, policy, tokenizer, generator, reward_fn, train_prompts, train_answers, optimizer,
                 settings: PPOConfig, *, value_model, ref_model=None, **kwargs) -> None:
        if not isinstance(settings, PPOConfig):
            raise TypeError(f"PPOLoop: settings must be a PPOConfig, got {type(settings).__name__}")
        _check(settings)
        if settings.kl_coef > 0 and ref_model is None:
            raise ValueError("PPOLoop: settings.kl_coef > 0 needs a ref_model (or set kl_coef: 0)")
        self.value_model = value_model
        super().__init__(policy, tokenizer, generator, reward_fn, train_prompts, train_answers, optimizer,
                         settings, ref_model=ref_model, **kwargs)
        self._rollout_stats: dict = {}

    def _modules(self) -> dict:
        value = self.acc.unwrap_model(self.value_model) if self.acc is not None else self.value_model
        return {"trainable.pt": self._unwrapped(), "value.pt": value}

    def _response_text(self, completion) -> str:
        """As the shared loop, plus the EOS token on a response that ended on EOS (no stop strings set), so
        that the policy is trained to end (and the missing-EOS penalty has something to move)."""
        text = super()._response_text(completion)
        eos = self.tokenizer.eos_token or ""
        if completion.finish_reason == "stop" and not self.s.stop and not text.endswith(eos):
            text += eos
        return text

    # ------------------------------------------------------------------ the estimator
    def _sequence_advantages(self, scores, completions) -> tuple[torch.Tensor, torch.Tensor]:
        """(penalised sequence scores, raw rewards): the scores enter the per-token reward at the last token."""
        raw = [float(d["reward"]) for d in scores]
        finished = [c.finish_reason == "stop" for c in completions]
        return penalized_scores(raw, finished, [c.num_tokens for c in completions], self.s), torch.tensor(raw)

    def _needs_old_and_ref(self) -> tuple[bool, bool]:
        return True, self.s.kl_coef > 0

    def _make_microbatches(self, prompts, responses, advantages, raw_rewards) -> list[Microbatch]:
        """Tokenize + old/ref log-probs (the shared loop), then old values, per-token rewards and GAE per
        micro-batch, and advantages whitened over the whole rollout batch."""
        micro = super()._make_microbatches(prompts, responses, advantages, raw_rewards)
        s = self.s
        kls, non_score, values_all, returns_all = [], [], [], []
        for mb in micro:
            with torch.no_grad():
                mb.old_values = get_token_values(self.value_model, mb.input_ids).detach()  # (b, T)
            rewards, kl = kl_penalized_rewards(mb.advantages, mb.old_log_probs, mb.ref_log_probs,
                                               mb.response_mask, s.kl_coef)  # (b, T) each
            mb.token_advantages, mb.returns = compute_gae(rewards, mb.old_values, mb.response_mask, s.gamma,
                                                          s.gae_lambda)
            kls += kl.sum(-1).tolist()
            non_score += (-s.kl_coef * kl).sum(-1).tolist()
            m = mb.response_mask.bool()
            values_all.append(mb.old_values[m])
            returns_all.append(mb.returns[m])
        if s.whiten_advantages:
            flat = torch.cat([mb.token_advantages.reshape(-1) for mb in micro])
            mask = torch.cat([mb.response_mask.reshape(-1) for mb in micro])
            flat = masked_whiten(flat, mask)
            offset = 0
            for mb in micro:
                n = mb.token_advantages.numel()
                mb.token_advantages = flat[offset:offset + n].view_as(mb.token_advantages)
                offset += n
        values, returns = torch.cat(values_all), torch.cat(returns_all)
        mean = (lambda xs: sum(xs) / len(xs))
        self._rollout_stats = {
            "kl_ref": mean(kls), "non_score_reward": mean(non_score),
            "score": float(advantages.mean()),
            "value_mean": float(values.mean()), "return_mean": float(returns.mean()),
            "explained_variance": explained_variance(values, returns, torch.ones_like(values, dtype=torch.bool)),
        }
        return micro

    # ------------------------------------------------------------------ the update
    def _train_on_rollouts(self, micro: list[Microbatch]) -> dict:
        s, ga = self.s, self.s.gradient_accumulation_steps
        self.policy.eval()  # no dropout: old and new log-probs (and values) must agree for equal weights
        self.value_model.eval()
        keys = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl")
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "grad_norm", "token_entropy", *keys)}
        for _epoch in range(s.epochs_per_rollout_batch):
            for start in range(0, len(micro), ga):
                loss_sum = 0.0
                for mb in micro[start:start + ga]:
                    out = get_response_log_probs(self.policy, mb.input_ids, mb.labels, return_token_entropy=True)
                    values = get_token_values(self.value_model, mb.input_ids)  # (b, T), with grad
                    loss, meta = ppo_microbatch_train_step(
                        out["log_probs"], values, mb.response_mask, ga, advantages=mb.token_advantages,
                        old_log_probs=mb.old_log_probs, old_values=mb.old_values, returns=mb.returns,
                        cliprange=s.cliprange, cliprange_value=s.cliprange_value, vf_coef=s.vf_coef)
                    loss_sum += float(loss)
                    stats["token_entropy"].append(float(masked_mean(out["token_entropy"], mb.response_mask)))
                    for k in keys:
                        stats[k].append(float(meta[k]))
                stats["grad_norm"].append(self._optimizer_step())
                stats["loss"].append(loss_sum)
        result = {k: sum(v) / len(v) if v else None for k, v in stats.items()}
        return {**result, **self._rollout_stats}
