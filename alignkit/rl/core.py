"""From-scratch GRPO / PPO / SFT building blocks (CS336 A5 style): tokenization, log-probs, masked reductions,
group-normalised rewards, policy-gradient losses and microbatch train steps; for PPO (Schulman et al. 2017;
Ouyang et al. 2022, InstructGPT) per-token values, the per-token KL-penalised reward, GAE (Schulman et al.
2016), whitening, the clipped value loss and explained variance.

Everything here takes tensors and plain callables; nothing reads configs or owns an optimizer.
GRPO is Shao et al. 2024 (DeepSeekMath, Eqs. 3-4); Dr. GRPO is Liu et al. 2025 ("Understanding R1-Zero-like
training"), which drops the std normalisation and the per-sequence length mean.
"""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence

import torch

from alignkit.losses import CHUNK_ELEMENTS, lm_head_log_probs, selective_log_softmax
from alignkit.models import plain_lm_head

__all__ = [
    "POLICY_GRADIENT_LOSSES",
    "approx_kl_k3",
    "compute_entropy",
    "compute_gae",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "compute_ppo_policy_loss",
    "compute_value_loss",
    "explained_variance",
    "get_response_log_probs",
    "get_token_values",
    "grpo_microbatch_train_step",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_normalize",
    "masked_whiten",
    "ppo_microbatch_train_step",
    "sft_microbatch_train_step",
    "shared_prompt_log_probs",
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
                           response_mask: torch.Tensor | None = None, *, temperature: float = 1.0,
                           ) -> dict[str, torch.Tensor]:
    """``log_probs`` ``(B, T)``: log p(labels[t] | input_ids[:t+1]); ``token_entropy`` ``(B, T)`` if asked.

    With ``response_mask`` ``(B, T)`` only the positions from the first response position of any row on
    go through the LM head, log-softmax and entropy (``logits_to_keep``, as TRL does): the prompt
    positions before it hold 0 in both outputs (a loss masks them out anyway). The kept positions'
    values equal the full computation's (the same hidden states, the same head). Where the model's logits
    are exactly ``lm_head(hidden)`` (:func:`_plain_lm_head`) the head runs inside
    :func:`alignkit.losses.lm_head_log_probs` (vocabulary tiles: no ``(B, T, V)`` logits in either pass);
    else the model's logits go through :func:`alignkit.losses.selective_log_softmax`. Both are float32 and
    score ``softmax(logits / temperature)`` (1: the model's own distribution, as the GRPO/PPO loops use it)."""
    _same_shape("get_response_log_probs", input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                response_mask=response_mask)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    first = _first_response_column(response_mask) if response_mask is not None else 0
    if first > 0 and _takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = input_ids.shape[1] - first
    else:
        first = 0
    kept = input_ids.shape[1] - first
    out, hidden, head = _lm_forward(model, lambda: model(input_ids, **kwargs))
    scores = (_logits_scores(out.logits[:, -kept:], labels[:, first:], temperature, return_token_entropy)
              if hidden is None else
              _head_scores(hidden[:, -kept:], head, labels[:, first:], temperature, return_token_entropy))
    return {name: _left_pad(values, first) for name, values in scores.items()}


def _logits_scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float, entropy: bool) -> dict:
    """``log_probs`` (and ``token_entropy``, no grad) ``(B, K)`` float32 of ``softmax(logits / temperature)``."""
    if temperature != 1.0:
        logits = logits / temperature
    result = {"log_probs": selective_log_softmax(logits, labels)}
    if entropy:
        with torch.no_grad():
            result["token_entropy"] = compute_entropy(logits)
    return result


def _head_scores(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, temperature: float,
                 entropy: bool) -> dict:
    """:func:`_logits_scores` of ``head(hidden)`` ``(B, K, H)`` without the logits (``lm_head_log_probs``)."""
    out = lm_head_log_probs(hidden, head.weight, labels, bias=head.bias, temperature=temperature,
                            return_entropy=entropy)
    log_probs, token_entropy = out if entropy else (out, None)
    result = {"log_probs": log_probs.float()}
    if entropy:
        result["token_entropy"] = token_entropy.float()
    return result


#: heads whose model returned something other than the head's own output once (checked on every call)
_UNFIT_HEADS: weakref.WeakSet = weakref.WeakSet()


def _plain_lm_head(model) -> torch.nn.Linear | None:
    """:func:`alignkit.models.plain_lm_head`, except a head whose model once returned something other than
    the head's own output (:data:`_UNFIT_HEADS`)."""
    head = plain_lm_head(model)
    return None if head is None or head in _UNFIT_HEADS else head


def _lm_forward(model, call: Callable[[], object]) -> tuple[object, torch.Tensor | None, torch.nn.Linear | None]:
    """Run the model's forward ``call()``. With a :func:`_plain_lm_head` the head is handed only the last
    position of its input and ``(outputs, hidden (B, K, H), head)`` comes back: the model's logits (of the
    last position) were the head's own output, so ``head(hidden)`` are its logits for all ``K`` positions.
    Otherwise ``(outputs, None, None)``, ``outputs.logits`` whole (a model that post-processed the head's
    output is run again and its head not tried again)."""
    head = _plain_lm_head(model)
    if head is not None:
        out, hidden = _last_position_head(head, call)
        if hidden is not None:
            return out, hidden, head
        if out is not None:  # the head never ran: these logits are the model's own
            return out, None, None
        _UNFIT_HEADS.add(head)
    return call(), None, None


def _last_position_head(head: torch.nn.Module, call: Callable[[], object]) -> tuple[object, torch.Tensor | None]:
    """``(outputs, head input)`` of ``call()`` with ``head`` given only its input's last position, when the
    head ran once on a ``(B, K, H)`` input and the model returned the head's output unchanged (no softcap,
    scale or vocabulary slice after it); ``(outputs, None)`` when the head never ran; ``(None, None)``
    when the outputs are unusable (the head's output was changed, or it ran more than once)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def give_last(_module, args):
        inputs.append(args[0])
        return (args[0][:, -1:], *args[1:]) if len(inputs) == 1 and args[0].dim() == 3 else None

    pre = head.register_forward_pre_hook(give_last)
    post = head.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        out = call()
    finally:
        pre.remove()
        post.remove()
    if not inputs:
        return out, None
    logits = getattr(out, "logits", None)
    if (len(inputs) != 1 or inputs[0].dim() != 3 or logits is None or logits.shape != outputs[0].shape
            or not torch.equal(logits, outputs[0].to(logits.dtype))):
        return None, None
    return out, inputs[0]


def shared_prompt_log_probs(model, input_ids: torch.Tensor, labels: torch.Tensor, response_mask: torch.Tensor,
                            return_token_entropy: bool = False, *, temperature: float = 1.0,
                            ) -> dict[str, torch.Tensor] | None:
    """:func:`get_response_log_probs` with ``response_mask`` for rows that share prompts (a GRPO group):
    each distinct prompt goes through the model once (with grad), its KV cache is repeated for the rows
    that share it, and only their response tokens are run on top. The values (and gradients) equal the
    per-row computation's on the response positions; the rest hold 0. Rows are right-padded as
    :func:`tokenize_prompt_and_output` makes them (prompt, then one contiguous response). Returns None
    (use :func:`get_response_log_probs`) when no prompt repeats or the model takes no KV cache argument.
    The LM head runs inside ``lm_head_log_probs`` where :func:`get_response_log_probs`' does."""
    _same_shape("shared_prompt_log_probs", input_ids=input_ids, labels=labels, response_mask=response_mask)
    groups = _prompt_groups(input_ids, labels, response_mask)
    cache_arg = next((a for a in ("cache", "past_key_values") if _takes(model, a)), None)  # transformers 5.x / 4.x
    if groups is None or cache_arg is None or not _takes(model, "logits_to_keep"):
        return None
    log_probs = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    entropy = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device) if return_token_entropy else None
    for prompt, rows, start, lengths in groups:
        width = max(lengths)
        response = labels[rows, start:start + width]  # (g, R)
        scores = _group_scores(model, prompt, response, cache_arg, temperature, entropy is not None)
        r_idx = torch.tensor(rows, device=labels.device).repeat_interleave(torch.tensor(lengths)).to(labels.device)
        c_idx = torch.cat([torch.arange(start, start + n, device=labels.device) for n in lengths])
        keep = torch.cat([torch.arange(n, device=labels.device) + j * width for j, n in enumerate(lengths)])
        log_probs = log_probs.index_put((r_idx, c_idx), scores["log_probs"].reshape(-1)[keep])
        if entropy is not None:
            entropy[r_idx, c_idx] = scores["token_entropy"].reshape(-1)[keep]
    return {"log_probs": log_probs, **({"token_entropy": entropy} if entropy is not None else {})}


def _group_scores(model, prompt: torch.Tensor, response: torch.Tensor, cache_arg: str, temperature: float,
                  entropy: bool) -> dict:
    """:func:`_logits_scores` ``(g, R)`` of one group's right-padded responses ``(g, R)`` after ``prompt``."""
    g = response.shape[0]
    # 1. the prompt once: its cache, and the last position's hidden state (or logits): the first response token's
    first, first_hidden, head = _lm_forward(model, lambda: model(prompt.unsqueeze(0), use_cache=True,
                                                                  logits_to_keep=1))
    cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
    cache.batch_repeat_interleave(g)
    # 2. the rows' responses (right-padded; causal attention never looks at the pads after a token)
    rest, rest_hidden, rest_head = None, None, None
    if response.shape[1] > 1:
        rest, rest_hidden, rest_head = _lm_forward(model, lambda: model(response[:, :-1], **{cache_arg: cache},
                                                                use_cache=True))
    if first_hidden is not None and (rest is None or rest_hidden is not None):
        hidden = first_hidden.expand(g, 1, -1)
        hidden = hidden if rest is None else torch.cat([hidden, rest_hidden], dim=1)  # (g, R, H)
        return _head_scores(hidden, head, response, temperature, entropy)
    logits = (first.logits if first_hidden is None else head(first_hidden)).expand(g, 1, -1)
    if rest is not None:
        rest_logits = rest.logits if rest_hidden is None else rest_head(rest_hidden)
        logits = torch.cat([logits, rest_logits], dim=1)  # (g, R, V)
    return _logits_scores(logits, response, temperature, entropy)


def _prompt_groups(input_ids, labels, response_mask) -> list | None:
    """``[(prompt ids (P,), rows, first response column, response lengths)]`` for rows with the same
    prompt; None when no prompt repeats (nothing to share) or a row's response is not contiguous."""
    mask = response_mask.bool()
    lengths = mask.sum(dim=1).tolist()
    starts = mask.float().argmax(dim=1).tolist()  # first response column (label index)
    by_prompt: dict[tuple, list[int]] = {}
    for row, (start, n) in enumerate(zip(starts, lengths)):
        if n == 0 or not bool(mask[row, start:start + n].all()):
            return None
        prompt = torch.cat([input_ids[row, :1], labels[row, :start]])  # full sequence's first start + 1 ids
        by_prompt.setdefault(tuple(prompt.tolist()), []).append(row)
    if len(by_prompt) == len(lengths):
        return None
    out = []
    for prompt, rows in by_prompt.items():
        out.append((torch.tensor(prompt, device=input_ids.device), rows, starts[rows[0]], [lengths[r] for r in rows]))
    return out


def _first_response_column(response_mask: torch.Tensor) -> int:
    """The first column where any row has a response token (0 for an empty mask)."""
    cols = response_mask.bool().any(dim=0).nonzero()
    return int(cols[0]) if cols.numel() else 0


def _takes_logits_to_keep(model) -> bool:
    return _takes(model, "logits_to_keep")


def _takes(model, argument: str) -> bool:
    """Whether the (PEFT-unwrapped) model's ``forward`` takes ``argument`` (transformers causal LMs do
    ``logits_to_keep`` and ``past_key_values``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", None)
    try:
        return forward is not None and argument in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _left_pad(values: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, K)`` -> ``(B, n + K)`` with zeros in the first ``n`` columns (differentiable)."""
    if n == 0:
        return values
    return torch.cat([values.new_zeros(values.shape[0], n), values], dim=1)


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


# ----------------------------------------------------------------------------------------------------------
# PPO: values, per-token rewards, GAE, whitening, clipped losses
# ----------------------------------------------------------------------------------------------------------
def _value_head(model):
    """The per-token scoring head of a ``*ForSequenceClassification`` model (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier", "v_head"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(base).__name__} has no score/classifier head: a value model must be a "
                    "sequence-classification model with one label")


def get_token_values(value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """``(B, T)`` values: the value model's head applied at every position (before the model pools the
    last token), read with a forward hook. ``values[:, t]`` is the value of the state ``input_ids[:, :t+1]``,
    aligned with :func:`get_response_log_probs`' ``log_probs[:, t]``."""
    captured: list[torch.Tensor] = []
    handle = _value_head(value_model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        value_model(input_ids, **kwargs)
    finally:
        handle.remove()
    out = captured[-1]  # (B, T, 1)
    if out.shape[:2] != input_ids.shape or out.shape[-1] != 1:
        raise ValueError(f"value head output {tuple(out.shape)}: expected (B, T, 1) for input "
                         f"{tuple(input_ids.shape)} (num_labels must be 1)")
    return out.squeeze(-1).float()


def kl_penalized_rewards(scores: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None,
                         response_mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token reward: ``r_t = -kl_coef * (logp_t - logp_ref_t)`` on every response token,
    plus the sequence score on the last response token. Returns ``(rewards (B, T), kl (B, T))`` with zeros
    outside the mask (``kl`` is the k1 estimate ``logp - logp_ref``; zeros without a reference)."""
    _same_shape("kl_penalized_rewards", log_probs=log_probs, ref_log_probs=ref_log_probs, response_mask=response_mask)
    mask = response_mask.bool()
    kl = torch.zeros_like(log_probs) if ref_log_probs is None else (log_probs - ref_log_probs)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,)
    if (last < 0).any():
        raise ValueError("kl_penalized_rewards: a row has no response token")
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.reshape(-1).to(rewards.dtype)
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response span:
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last response token is 0: the episode ends),
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``R_t = A_t + V_t``. ``(B, T)`` each, zero outside the
    mask (the response tokens of a row must be contiguous, as :func:`tokenize_prompt_and_output` makes them)."""
    _same_shape("compute_gae", rewards=rewards, values=values, response_mask=response_mask)
    mask = response_mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # a position outside the response resets the recursion (the next row state is terminal)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_adv, next_value = advantages[:, t], values[:, t]
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (unbiased var); zeros outside the mask.
    ``shift_mean=False`` only rescales (the mean is added back)."""
    _same_shape("masked_whiten", values=values, mask=mask)
    m = mask.bool()
    x = values[m]
    if x.numel() < 2:
        raise ValueError("masked_whiten: needs at least two masked entries")
    mean, var = x.mean(), x.var(unbiased=True)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def compute_ppo_policy_loss(advantages: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                            cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate with per-token advantages ``(B, T)``: ``max(-A r, -A clip(r, 1-eps, 1+eps))``,
    ``r = exp(logp - logp_old)``. Metadata: ``clipped`` (bool: the clipped term was taken) and ``ratio``."""
    _same_shape("compute_ppo_policy_loss", advantages=advantages, log_probs=log_probs, old_log_probs=old_log_probs)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), {"clipped": (clipped > unclipped).detach(), "ratio": ratio.detach()}


def compute_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss per token: ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``. Metadata: ``clipped`` (the clipped term was larger)."""
    _same_shape("compute_value_loss", values=values, old_values=old_values, returns=returns)
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), {"clipped": (loss_clipped > loss_unclipped).detach()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the masked entries (1: perfect value, <= 0: no better than a constant);
    NaN when the returns do not vary."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    var_r = r.var(unbiased=False)
    return float("nan") if var_r == 0 else float(1 - (r - v).var(unbiased=False) / var_r)


def ppo_microbatch_train_step(log_probs: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                              gradient_accumulation_steps: int, *, advantages: torch.Tensor,
                              old_log_probs: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                              cliprange: float, cliprange_value: float, vf_coef: float,
                              ) -> tuple[torch.Tensor, dict]:
    """PPO loss of one micro-batch, ``(masked_mean(policy loss) + vf_coef * masked_mean(value loss)) /
    gradient_accumulation_steps`` (token means over the micro-batch); calls ``backward()``."""
    _same_shape("ppo_microbatch_train_step", log_probs=log_probs, values=values, response_mask=response_mask,
                advantages=advantages, old_log_probs=old_log_probs, old_values=old_values, returns=returns)
    if gradient_accumulation_steps < 1:
        raise ValueError(f"ppo_microbatch_train_step: gradient_accumulation_steps must be >= 1, "
                         f"got {gradient_accumulation_steps}")
    pg, pg_meta = compute_ppo_policy_loss(advantages, log_probs, old_log_probs, cliprange)
    vf, vf_meta = compute_value_loss(values, old_values, returns, cliprange_value)
    pg_loss, vf_loss = masked_mean(pg, response_mask), masked_mean(vf, response_mask)
    loss = (pg_loss + vf_coef * vf_loss) / gradient_accumulation_steps
    loss.backward()
    with torch.no_grad():
        approx_kl = masked_mean(0.5 * (log_probs - old_log_probs) ** 2, response_mask)
    return loss.detach(), {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                           "clip_fraction": masked_mean(pg_meta["clipped"].float(), response_mask),
                           "value_clip_fraction": masked_mean(vf_meta["clipped"].float(), response_mask),
                           "approx_kl": approx_kl, "ratio": pg_meta["ratio"]}
