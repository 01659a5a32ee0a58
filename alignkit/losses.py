"""From-scratch losses: token log-probs, the per-instance DPO loss and a table of batched preference losses.

Preference losses take per-sequence log-probabilities (tensors in, no model, no trainer) and return
``(losses (B,), chosen_rewards (B,) detached, rejected_rewards (B,) detached)``; the caller reduces
(``losses.mean()``). Conventions follow TRL 1.16 so that the same numbers come out of TRL's trainers:

=========  ==========================================  =========================================
name       paper                                       TRL 1.16 equivalent
=========  ==========================================  =========================================
dpo        Rafailov et al. 2023, Eq. 7                 ``DPOTrainer`` ``loss_type="sigmoid"``
cdpo       Mitchell 2023 (conservative DPO)            ``CPOTrainer`` ``sigmoid`` + label_smoothing
                                                       on the DPO log-ratios (TRL 1.16's DPOTrainer
                                                       has no cDPO: its ``label_smoothing`` only
                                                       feeds ``robust``/``exo_pair``)
robust     Chowdhury et al. 2024 (rDPO), Eq. 7         ``DPOTrainer`` ``loss_type="robust"``
hinge      Zhao et al. 2023 (SLiC-HF)                  ``DPOTrainer`` ``loss_type="hinge"``
ipo        Azar et al. 2023, Eq. 17                    ``DPOTrainer`` ``loss_type="ipo"``
simpo      Meng et al. 2024, Eq. 6                     ``CPOTrainer`` ``loss_type="simpo"``, cpo_alpha=0
orpo       Hong et al. 2024, Eqs. 4, 7 (odds-ratio     ``ORPOTrainer.odds_ratio_loss`` (negated:
           term only; caller adds the SFT NLL)         TRL returns ``beta * logsigmoid(log_odds)``)
=========  ==========================================  =========================================

Length normalisation: IPO, SimPO and ORPO use per-token *mean* log-probs in TRL. Pass summed logps plus
``chosen_lengths``/``rejected_lengths`` (number of completion tokens) and they are averaged here; or pass
mean logps and leave the lengths ``None``. For IPO without lengths the loss uses sequence sums (the paper's
form, which TRL no longer uses). DPO/cDPO/robust/hinge take no lengths.

Each loss declares what it reads in :data:`PREFERENCE_LOSSES` (a :class:`LossSpec`: function, paper,
hyperparameters ``params``, ``reference_free``, ``uses_lengths``, TRL ``loss_type`` equivalent). The functions
take exactly those keyword arguments: an undeclared one (``label_smoothing`` for ``dpo``) is a ``TypeError``,
never silently dropped. :meth:`LossSpec.kwargs` picks a call's arguments from a dict of candidates.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.resources import prompt as _bundled_prompt

__all__ = [
    "IGNORE_INDEX",
    "LENGTH_PARAMS",
    "LM_HEAD_TILE_ELEMENTS",
    "LM_HEAD_VOCAB_CHUNK",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE",
    "LossSpec",
    "PreferenceLoss",
    "cdpo_loss",
    "dpo_loss",
    "get_loss_spec",
    "get_preference_loss",
    "hinge_loss",
    "ipo_loss",
    "lm_head_log_probs",
    "losses_reading",
    "orpo_loss",
    "per_instance_dpo_loss",
    "robust_dpo_loss",
    "selective_log_softmax",
    "sequence_log_probs",
    "simpo_loss",
]

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PreferenceLoss = Callable[..., LossOutput]


# ----------------------------------------------------------------------------------------------------------
# Token log-probabilities
# ----------------------------------------------------------------------------------------------------------
#: elements of one float32 chunk when ``chunk_size`` is not given (64 MiB)
CHUNK_ELEMENTS = 1 << 24


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Chunked ``log_softmax(x).gather(index)`` whose backward recomputes softmax chunk by chunk.

    Saves only the logits (already alive in the graph) and the ``(N,)`` row normalisers, so neither pass
    holds a float32 ``(N, V)`` tensor: d logp_i / d x_iv = 1[v = index_i] - softmax(x_i)_v.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
        n = logits.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,)
        for start in range(0, n, chunk_size):
            # 1. one row chunk in float32 (n, V); 2. label logit minus the row normaliser
            chunk = logits[start : start + chunk_size].float()
            lse[start : start + chunk_size] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, index[start : start + chunk_size]).squeeze(-1)  # (n,)
            out[start : start + chunk_size] = picked - lse[start : start + chunk_size]
        ctx.save_for_backward(logits, index, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        for start in range(0, logits.shape[0], ctx.chunk_size):
            # 1. softmax of the chunk from the saved normaliser; 2. g = grad_out * (onehot - softmax)
            rows = slice(start, start + ctx.chunk_size)
            g_out = grad_out[rows].float().unsqueeze(-1)  # (n, 1)
            g = torch.exp(logits[rows].float() - lse[rows].unsqueeze(-1)).mul_(-g_out)  # (n, V)
            g.scatter_add_(-1, index[rows], g_out)
            grad[rows] = g.to(grad.dtype)
        return grad, None, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int | None = None
                          ) -> torch.Tensor:
    """``log_softmax(logits.float(), -1).gather(-1, index)`` without a float32 copy of the whole logits.

    Rows (all leading dims flattened) are processed ``chunk_size`` at a time (default: as many rows as fit
    in :data:`CHUNK_ELEMENTS` floats): the label logit is gathered and the row's float32 ``logsumexp``
    subtracted. The backward pass recomputes the softmax per chunk, so training does not keep a float32
    ``(B, T, V)`` tensor either.

    Args:
        logits: ``(..., V)`` any float dtype.
        index: ``(...)`` integer label ids, same leading shape as ``logits``.
    Returns:
        ``(...)`` float32 log-probabilities.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"selective_log_softmax: index shape {tuple(index.shape)} must equal logits shape without the "
            f"vocab dim {tuple(logits.shape[:-1])}"
        )
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if chunk_size < 1:
        raise ValueError(f"selective_log_softmax: chunk_size must be >= 1, got {chunk_size}")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_index = index.reshape(-1, 1).long()  # (N, 1)
    return _SelectiveLogSoftmax.apply(flat_logits, flat_index, chunk_size).view(index.shape)


def sequence_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *, average: bool = False
) -> torch.Tensor:
    """Per-sequence sum (or mean, ``average=True``) of label log-probs over ``mask``.

    ``logits`` ``(B, T, V)`` are already aligned with ``labels`` ``(B, T)`` (position t predicts labels[t]).
    ``mask`` ``(B, T)``; when ``None`` it is ``labels != -100`` (the HF ignore index); ignored positions may
    hold any label. Returns ``(B,)`` float32.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_log_probs: logits must be (B, T, V) and labels (B, T); got logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    if mask is None:
        mask = labels != -100
    if mask.shape != labels.shape:
        raise ValueError(f"sequence_log_probs: mask shape {tuple(mask.shape)} != labels {tuple(labels.shape)}")
    safe_labels = labels.masked_fill(~mask.bool(), 0)  # (B, T)
    token_logps = selective_log_softmax(logits, safe_labels) * mask  # (B, T)
    total = token_logps.sum(-1)  # (B,)
    return total / mask.sum(-1).clamp(min=1) if average else total


#: float32 elements of one ``(tokens, vocab)`` logits tile of :func:`lm_head_log_probs` (8 MiB: 512 x 4096) and the
#: tile's vocabulary width. Measured on the shared 2-core EPYC (T = 512, H = 576, V = 49152, fwd + bwd, 1 thread,
#: noisy): 512 x 4096 and 512 x 8192 tiles 3.6-3.8 s, 512 x 2048 5.6 s, 256 x 4096 4.8 s, full-vocabulary rows
#: of 16-341 tokens 3.8-6.6 s, TRL's kernel 6.9-9.5 s. Small tiles lose in the GEMMs (each call re-packs its
#: operands, ~(n + v) H work for 2 n v H flops); the elementwise passes stay in cache; the peak is one tile.
LM_HEAD_TILE_ELEMENTS = 1 << 21
LM_HEAD_VOCAB_CHUNK = 4096

IGNORE_INDEX = -100


def _head_tiles(vocab: int, chunk_vocab: int):
    """``(start, end)`` of the vocabulary tiles."""
    return [(v0, min(v0 + chunk_vocab, vocab)) for v0 in range(0, vocab, chunk_vocab)]


def _tile_logits(h_scaled, weight, bias, v0, v1, inv_t):
    """``(h / T) @ W[v0:v1]^T + b[v0:v1] / T`` in ``h_scaled``'s dtype: one ``(n, v)`` logits tile."""
    w = weight[v0:v1].to(h_scaled.dtype)  # (v, H), a view when the dtypes match
    if bias is None:
        return h_scaled @ w.t()
    return torch.addmm(bias[v0:v1].to(h_scaled.dtype) * inv_t, h_scaled, w.t())


def _acc_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so that gradcheck can run)."""
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out += a @ b`` when ``accumulate``, else ``out = a @ b`` (float32, in place)."""
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _fold_tile(tile: torch.Tensor, stats: list, v0: int = 0) -> None:
    """Fold one ``(n, v)`` logits tile (overwritten) into the online ``[max, sum exp(z - max), sum exp(z - max) z,
    argmax]`` (the last two only when they are not None): the old sums are rescaled by ``exp(old_max - new_max)``;
    the argmax (a vocabulary id, the tile starting at id ``v0``) moves only on a strictly larger maximum, so
    it is the *first* maximum, as ``torch.argmax`` over the whole row."""
    run_max, run_sum, run_xs, run_arg = stats
    if run_arg is None:
        tile_max = tile.amax(-1)  # (n,)
    else:
        tile_max, tile_arg = tile.max(-1)  # (n,) each; the first maximum inside the tile
        run_arg.copy_(torch.where(tile_max > run_max, tile_arg + v0, run_arg))
    new_max = torch.maximum(run_max, tile_max)
    rescale = torch.exp(run_max - new_max)
    shifted = tile.sub_(new_max.unsqueeze(-1))  # z - new_max
    e = shifted.exp() if run_xs is not None else shifted.exp_()
    e_sum = e.sum(-1)
    if run_xs is not None:
        run_xs.mul_(rescale).add_((e * shifted).sum(-1) + new_max * e_sum)
    run_sum.mul_(rescale).add_(e_sum)
    stats[0] = new_max


class _LMHeadLogProbs(torch.autograd.Function):
    """Per-token ``log_softmax((h @ W^T + b) / T)[label]`` over ``(tokens, vocab)`` tiles of the LM head.

    Neither pass holds ``(N, V)``. The forward folds each float32 tile into an online logsumexp (running max and
    rescaled sum of exponentials) and saves only its inputs and the ``(N,)`` log-normalisers; the label logit is
    the dot product ``h_i . W[label_i]``. The backward recomputes each tile, turns it in place into
    ``G = grad * (onehot - softmax) / T`` and accumulates ``grad_hidden[rows] += G @ W[tile]`` and
    ``grad_weight[tile] += G^T @ h[rows]`` (``grad_bias[tile] += G.sum(0)``) in float32 (float64 for float64
    inputs). The caller removes the ignored rows first.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, chunk_vocab, inv_t, with_entropy, with_top1):
        n_tok, acc = hidden.shape[0], _acc_dtype(hidden, weight)
        lse, picked = (torch.empty(n_tok, dtype=acc, device=hidden.device) for _ in range(2))  # (N,)
        entropy = torch.zeros(n_tok, dtype=acc, device=hidden.device)  # (N,), stays 0 unless asked for
        top1 = torch.zeros(n_tok, dtype=torch.bool, device=hidden.device)  # (N,), stays False unless asked for
        for start in range(0, n_tok, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(acc) * inv_t  # (n, H)
            # running max, sum of exp(z - max) and sum of exp(z - max) * z over the vocabulary tiles
            stats = [torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device),
                     torch.zeros(h.shape[0], dtype=acc, device=h.device),
                     torch.zeros(h.shape[0], dtype=acc, device=h.device) if with_entropy else None,
                     torch.zeros(h.shape[0], dtype=torch.long, device=h.device) if with_top1 else None]
            for v0, v1 in _head_tiles(weight.shape[0], chunk_vocab):
                _fold_tile(_tile_logits(h, weight, bias, v0, v1, inv_t), stats, v0)
            lse[rows] = stats[0] + stats[1].log()
            picked[rows] = (h * weight[labels[rows]].to(acc)).sum(-1)  # label logit h_i . W[label_i]
            if bias is not None:
                picked[rows] += bias[labels[rows]].to(acc) * inv_t
            if with_entropy:
                entropy[rows] = lse[rows] - stats[2] / stats[1]  # H = logsumexp(z) - E_p[z]
            if with_top1:
                top1[rows] = stats[3] == labels[rows]  # the label is the (first) argmax of the logits
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.sizes = (chunk_tokens, chunk_vocab, inv_t)
        ctx.mark_non_differentiable(entropy, top1)
        return picked - lse, entropy, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_entropy, _grad_top1):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _LMHeadLogProbs._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk_tokens, chunk_vocab, inv_t = ctx.sizes
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(hidden, weight)
        like = {"dtype": acc, "device": hidden.device}
        # the first tile of each row (column) block writes grad_h (grad_w) with mm(out=): no zero-fill pass
        grad_h = torch.empty(hidden.shape, **like) if need_h else None
        grad_w = (torch.empty if hidden.shape[0] else torch.zeros)(weight.shape, **like) if need_w else None
        grad_b = torch.zeros(weight.shape[0], **like) if need_b else None
        scale = grad_out.to(acc) * inv_t  # (N,) d loss / d logp_i times the 1/T of the logits
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(acc)  # (n, H)
            h_scaled, s, m = h * inv_t, scale[rows].unsqueeze(-1), lse[rows].unsqueeze(-1)  # (n, H), (n, 1)
            for v0, v1 in _head_tiles(weight.shape[0], chunk_vocab):
                # 1. recompute the tile; 2. G = s * (onehot - softmax) in place; 3. the gradient GEMMs
                g = _tile_logits(h_scaled, weight, bias, v0, v1, inv_t).sub_(m).exp_().mul_(-s)  # (n, v)
                local = labels[rows] - v0
                hit = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(-1)
                g[hit, local[hit]] += s[hit, 0]
                if need_h:
                    _mm_into(grad_h[rows], g, weight[v0:v1].to(acc), accumulate=v0 > 0)
                if need_w:
                    _mm_into(grad_w[v0:v1], g.t(), h, accumulate=start > 0)
                if need_b:
                    grad_b[v0:v1] += g.sum(0)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def lm_head_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      bias: torch.Tensor | None = None, chunk_tokens: int | None = None,
                      chunk_vocab: int | None = None, temperature: float = 1.0, return_entropy: bool = False,
                      return_top1: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-token ``log_softmax((hidden @ weight.T + bias) / temperature)[labels]`` without the ``(..., V)`` logits.

    The LM head runs inside the loop: ``(chunk_tokens, chunk_vocab)`` float32 logits tiles (defaults:
    :data:`LM_HEAD_VOCAB_CHUNK` vocabulary rows and as many tokens as fit in :data:`LM_HEAD_TILE_ELEMENTS`),
    an online logsumexp over the vocabulary tiles, and a custom backward that recomputes each tile, so
    neither pass holds ``(N, V)``. Matmuls, logsumexp and the gradient accumulators are float32 for float32,
    bf16 and fp16 inputs (upcast tile by tile), float64 for float64 inputs. Positions whose label is ``-100`` get
    log-prob 0 and no gradient; they are dropped before the LM head, so they cost nothing.

    Args:
        hidden: ``(..., H)`` final hidden states, aligned with ``labels`` (position t predicts ``labels[t]``).
        weight: ``(V, H)`` LM head (output embedding) weight; ``bias``: optional ``(V,)``.
        labels: ``(...)`` integer ids in ``[0, V)`` or ``-100``, the leading shape of ``hidden``.
        temperature: the logits are divided by it (GRPO's sampling temperature).
        return_entropy: also return the per-token entropy of ``softmax(logits / temperature)`` (detached,
            for logging; one more pass per tile; 0 at ignored positions).
        return_top1: also return whether each label is the argmax of its logits (bool, False at ignored
            positions): ``argmax(logits) == label`` with ``torch.argmax``'s first-maximum rule on ties, the
            token accuracy of TRL's ``is_top1`` (the tile's max also yields its index: no extra pass).
    Returns:
        ``(...)`` float32 (float64 for float64 inputs) log-probabilities, differentiable in ``hidden``,
        ``weight`` and ``bias`` (gradients come back in the inputs' dtypes); with ``return_entropy`` and/or
        ``return_top1`` the tuple ``(log_probs, entropy, top1)`` of those asked for, in that order.
    """
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lm_head_log_probs: hidden (..., H), weight (V, H) and labels (...) must agree; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"lm_head_log_probs: temperature must be > 0, got {temperature}")
    vocab = weight.shape[0]
    chunk_vocab = min(vocab, chunk_vocab or LM_HEAD_VOCAB_CHUNK)
    chunk_tokens = chunk_tokens or max(1, LM_HEAD_TILE_ELEMENTS // chunk_vocab)
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"lm_head_log_probs: chunk sizes must be >= 1, got {chunk_tokens}, {chunk_vocab}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1).long()  # (N,)
    valid = flat_labels != IGNORE_INDEX
    if bool(((flat_labels < 0) | (flat_labels >= vocab))[valid].any()):
        raise ValueError(f"lm_head_log_probs: labels must be in [0, {vocab}) or {IGNORE_INDEX}")
    sizes = (chunk_tokens, chunk_vocab, 1.0 / temperature, return_entropy, return_top1)
    with torch.autocast(hidden.device.type, enabled=False):  # the tiles stay float32 under autocast too
        if bool(valid.all()):
            out = _LMHeadLogProbs.apply(flat_h, weight, bias, flat_labels, *sizes)
        else:
            rows = valid.nonzero().squeeze(-1)  # (M,) the scored positions
            scored = _LMHeadLogProbs.apply(flat_h.index_select(0, rows), weight, bias, flat_labels[rows], *sizes)
            out = [x.new_zeros(flat_labels.shape).index_put((rows,), x) for x in scored]  # (N,) each
    log_probs, entropy, top1 = (x.view(labels.shape) for x in out)
    extra = [x for x, asked in ((entropy, return_entropy), (top1, return_top1)) if asked]
    return (log_probs, *extra) if extra else log_probs

# ----------------------------------------------------------------------------------------------------------
# Per-instance DPO (CS336 A5 supplement section 5.3)
# ----------------------------------------------------------------------------------------------------------
def _whole_text_logp(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over t >= 1 of log p(x_t | x_<t) for one tokenized text ``(1, T)``; returns a 0-dim tensor."""
    logits = model(input_ids).logits  # (1, T, V)
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:]).sum()


def _alpaca_ids(tokenizer, template: str, prompt: str, response: str) -> list[int]:
    text = template.format(instruction=prompt, response=response)
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def per_instance_dpo_loss(lm, lm_ref, tokenizer, beta: float, prompt: str, response_chosen: str,
                          response_rejected: str) -> torch.Tensor:
    """DPO loss of one preference pair (Rafailov et al. 2023, Eq. 7; CS336 A5 supplement Eq. 3).

    ``-log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))``

    Each response is formatted with the Alpaca template (``resources.prompt("alpaca_sft")``), tokenized with
    the tokenizer's default special tokens, and ``eos_token_id`` appended. Log-probabilities are those of the
    whole text (the prompt's terms cancel in the difference). ``lm_ref`` runs under ``no_grad`` on its own
    device; the result is a scalar on ``lm``'s device with gradient into ``lm`` only.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("per_instance_dpo_loss: tokenizer has no eos_token_id")
    template = _bundled_prompt("alpaca_sft")
    lm_device = next(lm.parameters()).device
    ref_device = next(lm_ref.parameters()).device
    logratios = []
    for response in (response_chosen, response_rejected):
        # 1. tokenize "template(prompt, response) + EOS"
        ids = torch.tensor([_alpaca_ids(tokenizer, template, prompt, response)])  # (1, T)
        # 2. policy log-prob with grad, reference log-prob without, both on lm's device
        policy = _whole_text_logp(lm, ids.to(lm_device))
        with torch.no_grad():
            ref = _whole_text_logp(lm_ref, ids.to(ref_device)).to(lm_device)
        logratios.append(policy - ref)
    return -F.logsigmoid(beta * (logratios[0] - logratios[1]))


# ----------------------------------------------------------------------------------------------------------
# Batched preference losses
# ----------------------------------------------------------------------------------------------------------
def _check_pair(name: str, chosen: torch.Tensor, rejected: torch.Tensor, **others) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"{name}: policy_chosen_logps and policy_rejected_logps must both be (B,); got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    for arg, value in others.items():
        if value is not None and value.shape != chosen.shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(value.shape)}, expected {tuple(chosen.shape)}")


def _logratios(name, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"{name} needs ref_chosen_logps and ref_rejected_logps (it is a reference-based loss)")
    _check_pair(name, policy_chosen_logps, policy_rejected_logps,
                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps  # (B,), (B,)


def _per_token(logps: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    return logps if lengths is None else logps / lengths.to(logps.dtype).clamp(min=1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta: float) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): ``-log sigmoid(beta * (r_w - r_l))``, ``r = logp - logp_ref``.

    Rewards: ``beta * (logp - logp_ref)``. Same as TRL's ``loss_type="sigmoid"``.
    """
    chosen_lr, rejected_lr = _logratios("dpo", policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr))  # (B,)
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
              beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), labels flipped w.p. eps:

    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, ``h = r_w - r_l``. ``eps = 0`` is DPO.
    (TRL <= 0.2x's ``sigmoid`` with label_smoothing; in TRL 1.16 only CPOTrainer keeps this form.)
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"cdpo: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen_lr, rejected_lr = _logratios("cdpo", policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
    h = beta * (chosen_lr - rejected_lr)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                    *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, Eq. 7), unbiased under label-flip rate eps in [0, 0.5):

    ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``. TRL ``loss_type="robust"``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_lr, rejected_lr = _logratios("robust", policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
    h = beta * (chosen_lr - rejected_lr)  # (B,)
    losses = (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (
        1 - 2 * label_smoothing
    )
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
               beta: float) -> LossOutput:
    """SLiC-HF hinge (Zhao et al. 2023, Eq. 2 on DPO log-ratios): ``relu(1 - beta (r_w - r_l))``. TRL ``hinge``."""
    chosen_lr, rejected_lr = _logratios("hinge", policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (chosen_lr - rejected_lr))
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta: float, chosen_lengths=None, rejected_lengths=None) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17), beta is the paper's tau: ``(h - 1 / (2 beta))^2``.

    ``h = r_w / |y_w| - r_l / |y_l|`` with per-token averaged log-ratios when lengths are given (TRL 1.16's
    ``loss_type="ipo"``, confirmed with the IPO authors), sequence sums when they are ``None``.
    Rewards: ``beta * (logp - logp_ref)`` on the summed log-ratios, as TRL logs them.
    """
    _check_pair("ipo", policy_chosen_logps, policy_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen_lr, rejected_lr = _logratios("ipo", policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
    h = _per_token(chosen_lr, chosen_lengths) - _per_token(rejected_lr, rejected_lengths)  # (B,)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
               beta: float, gamma: float = 0.5, label_smoothing: float = 0.0, chosen_lengths=None,
               rejected_lengths=None) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free with target margin gamma:

    ``-log sigmoid(beta * logp_w / |y_w| - beta * logp_l / |y_l| - gamma)`` (label smoothing as in cDPO).
    Pass mean logps, or sums plus lengths. ``ref_*`` are ignored. Rewards: ``beta * mean logp``.
    TRL: ``CPOTrainer(loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0)``.
    """
    _check_pair("simpo", policy_chosen_logps, policy_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen = _per_token(policy_chosen_logps, chosen_lengths)  # (B,)
    rejected = _per_token(policy_rejected_logps, rejected_lengths)  # (B,)
    h = beta * (chosen - rejected) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012); x is clamped below 0."""
    x = x.clamp(max=-1e-12)
    near_zero = x > -0.6931471805599453
    # each branch only sees inputs where it is accurate, so neither yields inf/NaN gradients through where()
    upper = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    lower = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, upper, lower)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
              beta: float, chosen_lengths=None, rejected_lengths=None) -> LossOutput:
    """ORPO odds-ratio term (Hong et al. 2024, Eqs. 4 and 7), beta is the paper's lambda:

    ``-beta * log sigmoid(log odds(y_w) - log odds(y_l))``, ``odds(y) = P(y) / (1 - P(y))`` on per-token mean
    logps. The full ORPO objective is ``NLL(y_w) + losses.mean()``; the caller adds the NLL. TRL's
    ``odds_ratio_loss`` returns ``beta * logsigmoid(...)`` (the negative of ours) and subtracts its mean.
    Computed in float32. Rewards: ``beta * mean logp``. ``ref_*`` are ignored.
    """
    _check_pair("orpo", policy_chosen_logps, policy_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen = _per_token(policy_chosen_logps.float(), chosen_lengths)  # (B,)
    rejected = _per_token(policy_rejected_logps.float(), rejected_lengths)  # (B,)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


@dataclass(frozen=True)
class LossSpec:
    """One entry of the loss table: the function and what it reads.

    ``params`` are the hyperparameters the function takes as keyword arguments (``beta``, ``label_smoothing``,
    ``gamma``); with ``uses_lengths`` it also takes ``chosen_lengths``/``rejected_lengths``. Its signature has
    no other keyword argument, so a caller passing anything else gets a ``TypeError``. ``reference_free``:
    the reference log-probs are not read (the caller may skip the reference forward). ``trl_loss_type``:
    TRL 1.16 ``DPOTrainer``'s ``loss_type`` with the same definition, or None when it has none.
    """

    fn: PreferenceLoss
    paper: str
    params: tuple[str, ...]
    reference_free: bool = False
    uses_lengths: bool = False
    trl_loss_type: str | None = None

    def kwargs(self, values: dict) -> dict:
        """The keyword arguments of one call: the declared params (and lengths) picked from ``values``."""
        names = self.params + (LENGTH_PARAMS if self.uses_lengths else ())
        return {name: values[name] for name in names if name in values}


#: the length keyword arguments of the losses with ``uses_lengths``
LENGTH_PARAMS = ("chosen_lengths", "rejected_lengths")

PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, "Rafailov et al. 2023, Eq. 7", ("beta",), trl_loss_type="sigmoid"),
    "cdpo": LossSpec(cdpo_loss, "Mitchell 2023 (conservative DPO)", ("beta", "label_smoothing")),
    "robust": LossSpec(robust_dpo_loss, "Chowdhury et al. 2024, Eq. 7", ("beta", "label_smoothing"),
                       trl_loss_type="robust"),
    "hinge": LossSpec(hinge_loss, "Zhao et al. 2023 (SLiC-HF), Eq. 2", ("beta",), trl_loss_type="hinge"),
    "ipo": LossSpec(ipo_loss, "Azar et al. 2023, Eq. 17", ("beta",), uses_lengths=True, trl_loss_type="ipo"),
    "simpo": LossSpec(simpo_loss, "Meng et al. 2024, Eq. 6", ("beta", "gamma", "label_smoothing"),
                      reference_free=True, uses_lengths=True),
    "orpo": LossSpec(orpo_loss, "Hong et al. 2024, Eqs. 4, 7", ("beta",), reference_free=True,
                     uses_lengths=True),
}

#: losses that ignore the reference model's log-probs (the caller may skip the reference forward)
REFERENCE_FREE = frozenset(name for name, spec in PREFERENCE_LOSSES.items() if spec.reference_free)


def get_loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` called ``name`` in :data:`PREFERENCE_LOSSES`; unknown names list the valid ones."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown preference loss {name!r}; valid names: {', '.join(sorted(PREFERENCE_LOSSES))}"
        ) from None


def losses_reading(param: str) -> list[str]:
    """Names of the losses whose declared ``params`` include ``param`` (e.g. label_smoothing)."""
    return [name for name, spec in PREFERENCE_LOSSES.items() if param in spec.params]


def get_preference_loss(name: str) -> PreferenceLoss:
    """The loss function called ``name`` in :data:`PREFERENCE_LOSSES` (common signature, see module doc)."""
    return get_loss_spec(name).fn
