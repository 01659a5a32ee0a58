"""From-scratch GRPO / SFT building blocks (CS336 A5 style): tokenization, log-probs, masked reductions,
group-normalised rewards, policy-gradient losses and microbatch train steps.

Everything here takes tensors and plain callables; nothing reads configs or owns an optimizer.
GRPO is Shao et al. 2024 (DeepSeekMath, Eqs. 3-4); Dr. GRPO is Liu et al. 2025 ("Understanding R1-Zero-like
training"), which drops the std normalisation and the per-sequence length mean.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from alignkit.losses import CHUNK_ELEMENTS, selective_log_softmax

__all__ = [
    "POLICY_GRADIENT_LOSSES",
    "approx_kl_k3",
    "compute_entropy",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "get_response_log_probs",
    "grpo_microbatch_train_step",
    "masked_mean",
    "masked_normalize",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
]


def _same_shape(fn: str, **tensors: torch.Tensor | None) -> None:
    """Raise naming the argument whose shape differs from the first one given."""
    named = [(k, v) for k, v in tensors.items() if v is not None]
    ref_name, ref = named[0]
    for name, value in named[1:]:
        if value.shape != ref.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)} "
                             f"(the shape of {ref_name})")


# ----------------------------------------------------------------------------------------------------------
# Tokenization and log-probs
# ----------------------------------------------------------------------------------------------------------
def tokenize_prompt_and_output(prompt_strs: Sequence[str], output_strs: Sequence[str], tokenizer) -> dict:
    """Tokenize prompts and outputs separately (no special tokens), concatenate, right-pad, shift.

    Returns ``input_ids``, ``labels`` (LongTensor) and ``response_mask`` (bool), each ``(B, max_len - 1)``
    where ``max_len`` is the longest prompt+output. ``input_ids`` drops the last position, ``labels`` the first;
    ``response_mask`` is true where ``labels`` holds an output token. The mask comes from lengths, never from
    comparing ids with the pad id (SmolLM2's pad == eos). Pad id: ``pad_token_id``, else ``eos_token_id``.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"tokenize_prompt_and_output: {len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output: empty batch")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenize_prompt_and_output: tokenizer has neither pad_token_id nor eos_token_id")
    prompts = tokenizer(list(prompt_strs), add_special_tokens=False)["input_ids"]
    outputs = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    max_len = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    full = torch.full((len(prompts), max_len), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(prompts), max_len), dtype=torch.bool)  # (B, L), over full sequence
    for row, (p, o) in enumerate(zip(prompts, outputs)):
        # 1. write prompt + output ids, 2. mark the output span
        full[row, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[row, len(p) : len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def compute_entropy(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``H = logsumexp(z) - sum_v p_v z_v`` (shift-invariant).

    ``(..., V)`` -> ``(...)`` float32, computed ``chunk_size`` rows at a time in float32 (default: rows that
    fit in :data:`alignkit.losses.CHUNK_ELEMENTS` floats).
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
    for start in range(0, flat.shape[0], chunk_size):
        # 1. float32 chunk (n, V), shifted by its row max so lse and E_p[z] stay small (no cancellation)
        z = flat[start : start + chunk_size].float()
        z = z - z.max(dim=-1, keepdim=True).values
        # 2. H = lse - E_p[z]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
        out[start : start + chunk_size] = lse.squeeze(-1) - (torch.exp(z - lse) * z).sum(-1)
    return out.view(logits.shape[:-1])


def get_response_log_probs(model, input_ids: torch.Tensor, labels: torch.Tensor,
                           return_token_entropy: bool = False, attention_mask: torch.Tensor | None = None,
                           ) -> dict[str, torch.Tensor]:
    """``log_probs`` ``(B, T)``: log p(labels[t] | input_ids[:t+1]); ``token_entropy`` ``(B, T)`` if asked."""
    _same_shape("get_response_log_probs", input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model(input_ids, **kwargs).logits  # (B, T, V)
    result = {"log_probs": selective_log_softmax(logits, labels)}
    if return_token_entropy:
        with torch.no_grad():
            result["token_entropy"] = compute_entropy(logits)
    return result


# ----------------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------------
def masked_normalize(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                     normalize_constant: float = 1.0) -> torch.Tensor:
    """Sum of ``tensor`` where ``mask`` along ``dim`` (everything if ``None``), divided by ``normalize_constant``."""
    _same_shape("masked_normalize", tensor=tensor, mask=mask)
    if normalize_constant == 0:
        raise ValueError("masked_normalize: normalize_constant must be non-zero")
    masked = torch.where(mask.bool(), tensor, torch.zeros_like(tensor))
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over positions where ``mask`` along ``dim`` (all if ``None``); NaN where the mask is empty."""
    _same_shape("masked_mean", tensor=tensor, mask=mask)
    mask = mask.to(tensor.dtype)
    masked = torch.where(mask.bool(), tensor, torch.zeros_like(tensor))
    if dim is None:
        return masked.sum() / mask.sum()
    return masked.sum(dim=dim) / mask.sum(dim=dim)


# ----------------------------------------------------------------------------------------------------------
# SFT step
# ----------------------------------------------------------------------------------------------------------
def sft_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                              gradient_accumulation_steps: int, normalize_constant: float = 1.0,
                              ) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the response tokens for one microbatch; calls ``backward()``.

    ``loss = mean_b(-sum_t mask * logp / normalize_constant) / gradient_accumulation_steps``.
    ``policy_log_probs``, ``response_mask``: ``(B, T)``.
    """
    _same_shape("sft_microbatch_train_step", policy_log_probs=policy_log_probs, response_mask=response_mask)
    if gradient_accumulation_steps < 1:
        raise ValueError(f"sft_microbatch_train_step: gradient_accumulation_steps must be >= 1, "
                         f"got {gradient_accumulation_steps}")
    per_example = -masked_normalize(policy_log_probs, response_mask, dim=-1,
                                    normalize_constant=normalize_constant)  # (B,)
    loss = per_example.mean() / gradient_accumulation_steps
    loss.backward()
    metadata = {
        "nll_per_example": per_example.detach(),
        "response_tokens": response_mask.sum().detach(),
    }
    return loss.detach(), metadata


# ----------------------------------------------------------------------------------------------------------
# Rewards and policy-gradient losses
# ----------------------------------------------------------------------------------------------------------
def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], dict],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """GRPO advantages (Shao et al. 2024, Eq. 4 outcome supervision): ``A_i = (r_i - mean_g) / (std_g + eps)``.

    Responses are consecutive groups of ``group_size`` (one prompt each). ``std_g`` is the unbiased sample std.
    ``normalize_by_std=False`` gives ``A_i = r_i - mean_g`` (Dr. GRPO). Returns ``(advantages (N,),
    raw_rewards (N,), metadata)`` with reward mean/std/max/min and mean format/answer rewards.
    """
    n = len(rollout_responses)
    if n != len(repeated_ground_truths):
        raise ValueError(f"compute_group_normalized_rewards: {n} responses but "
                         f"{len(repeated_ground_truths)} ground truths")
    if group_size < 1 or n % group_size:
        raise ValueError(f"compute_group_normalized_rewards: {n} responses is not a multiple of "
                         f"group_size={group_size}")
    scores = [reward_fn(resp, truth) for resp, truth in zip(rollout_responses, repeated_ground_truths)]
    for i, score in enumerate(scores):
        missing = {"reward", "format_reward", "answer_reward"} - set(score)
        if missing:
            raise KeyError(f"reward_fn result for response {i} lacks {sorted(missing)}")
    raw = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # (N,)
    grouped = raw.view(-1, group_size)  # (N / G, G)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_by_std:
        centered = centered / (grouped.std(dim=-1, keepdim=True) + advantage_eps)
    metadata = {
        "reward_mean": raw.mean().item(),
        "reward_std": raw.std().item() if n > 1 else 0.0,
        "reward_max": raw.max().item(),
        "reward_min": raw.min().item(),
        "format_reward_mean": sum(float(s["format_reward"]) for s in scores) / n,
        "answer_reward_mean": sum(float(s["answer_reward"]) for s in scores) / n,
    }
    return centered.reshape(-1), raw, metadata


def _as_column(name: str, values: torch.Tensor, policy_log_probs: torch.Tensor) -> torch.Tensor:
    """``(B,)`` or ``(B, 1)`` -> ``(B, 1)``, checked against ``policy_log_probs`` ``(B, T)``."""
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if values.dim() != 2 or values.shape[1] != 1 or values.shape[0] != policy_log_probs.shape[0]:
        raise ValueError(f"{name} must be (B, 1) with B={policy_log_probs.shape[0]}, got {tuple(values.shape)}")
    return values.to(policy_log_probs.dtype)


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: torch.Tensor,
                                       policy_log_probs: torch.Tensor) -> torch.Tensor:
    """REINFORCE per-token loss ``-A * logp`` (A ``(B, 1)`` broadcast over ``(B, T)``)."""
    adv = _as_column("raw_rewards_or_advantages", raw_rewards_or_advantages, policy_log_probs)
    return -adv * policy_log_probs


def compute_grpo_clip_loss(advantages: torch.Tensor, policy_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                           cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped surrogate (Schulman et al. 2017 Eq. 7; Shao et al. 2024 Eq. 3), per token:

    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, ``ratio = exp(logp - logp_old)``.
    Metadata: ``clipped`` (bool ``(B, T)``: the clipped term was the smaller one) and ``ratio``.
    """
    _same_shape("compute_grpo_clip_loss", policy_log_probs=policy_log_probs, old_log_probs=old_log_probs)
    adv = _as_column("advantages", advantages, policy_log_probs)  # (B, 1)
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (B, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def _no_baseline(policy_log_probs, raw_rewards, advantages, old_log_probs, cliprange):
    return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}


def _with_baseline(policy_log_probs, raw_rewards, advantages, old_log_probs, cliprange):
    return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}


def _grpo_clip(policy_log_probs, raw_rewards, advantages, old_log_probs, cliprange):
    return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)


#: loss_type -> (implementation, names of the arguments it requires)
POLICY_GRADIENT_LOSSES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "no_baseline": (_no_baseline, ("raw_rewards",)),
    "reinforce_with_baseline": (_with_baseline, ("advantages",)),
    "grpo_clip": (_grpo_clip, ("advantages", "old_log_probs", "cliprange")),
}


def compute_policy_gradient_loss(policy_log_probs: torch.Tensor, loss_type: str,
                                 raw_rewards: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                                 old_log_probs: torch.Tensor | None = None, cliprange: float | None = None,
                                 ) -> tuple[torch.Tensor, dict]:
    """Per-token loss ``(B, T)`` and metadata for ``loss_type`` in :data:`POLICY_GRADIENT_LOSSES`."""
    if loss_type not in POLICY_GRADIENT_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(POLICY_GRADIENT_LOSSES)}")
    impl, required = POLICY_GRADIENT_LOSSES[loss_type]
    given = {"raw_rewards": raw_rewards, "advantages": advantages, "old_log_probs": old_log_probs,
             "cliprange": cliprange}
    missing = [name for name in required if given[name] is None]
    if missing:
        raise ValueError(f"loss_type {loss_type!r} requires {', '.join(missing)}")
    return impl(policy_log_probs, raw_rewards, advantages, old_log_probs, cliprange)


def approx_kl_k3(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token (used by GRPO, Shao et al. 2024 Eq. 4):

    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased for samples from pi).
    """
    _same_shape("approx_kl_k3", policy_log_probs=policy_log_probs, ref_log_probs=ref_log_probs)
    delta = ref_log_probs - policy_log_probs
    return torch.exp(delta) - delta - 1


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    *,
    length_normalization: str = "mean",
    normalize_constant: float = 1.0,
    ref_log_probs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Policy-gradient loss of one microbatch; calls ``backward()``.

    Per-token loss (+ ``kl_beta * k3`` when ``ref_log_probs`` given), reduced per sequence by
    ``length_normalization``: ``"mean"`` (masked mean over the sequence, GRPO) or ``"constant"``
    (masked sum / ``normalize_constant``, Dr. GRPO); then mean over the batch, / accumulation steps.
    """
    _same_shape("grpo_microbatch_train_step", policy_log_probs=policy_log_probs, response_mask=response_mask,
                old_log_probs=old_log_probs, ref_log_probs=ref_log_probs)
    if gradient_accumulation_steps < 1:
        raise ValueError(f"grpo_microbatch_train_step: gradient_accumulation_steps must be >= 1, "
                         f"got {gradient_accumulation_steps}")
    per_token, metadata = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages,
                                                       old_log_probs, cliprange)  # (B, T)
    if kl_beta and ref_log_probs is not None:
        kl = approx_kl_k3(policy_log_probs, ref_log_probs)  # (B, T)
        per_token = per_token + kl_beta * kl
        metadata["kl"] = masked_mean(kl.detach(), response_mask)
    if length_normalization == "mean":
        per_sequence = masked_mean(per_token, response_mask, dim=-1)  # (B,)
    elif length_normalization == "constant":
        per_sequence = masked_normalize(per_token, response_mask, dim=-1, normalize_constant=normalize_constant)
    else:
        raise ValueError(f"length_normalization must be 'mean' or 'constant', got {length_normalization!r}")
    loss = per_sequence.mean() / gradient_accumulation_steps
    loss.backward()
    if "clipped" in metadata:
        metadata["clip_fraction"] = masked_mean(metadata["clipped"].float(), response_mask)
    return loss.detach(), metadata
