"""Per-token log-probs: alignkit's ``lm_head_log_probs`` vs TRL 1.16's chunked LM-head kernel, forward + backward.

Main rows: hidden states ``(B, T, H)`` and the LM head ``(V, H)`` in, per-token log-probs out, then the
gradient into both. alignkit's :func:`~alignkit.losses.lm_head_log_probs` (``(tokens, vocab)`` tiles, online
logsumexp, recomputing backward) against ``trl.kernels.ChunkedLogProbFunction`` called exactly as
``trl.trainer.utils.add_fused_lm_head`` calls it off Triton (every position scored, TRL's vocab tile
``_CHUNKED_LOGPROB_CHUNK_SIZE``, its torch-op fallback on CPU). Neither path materialises ``(B, T, V)``;
time is the median of alternating rounds (3 at T = 512, 1 at T = 2048, after the peak-memory calls) and peak
memory the CPU allocator's peak above entry (both paths' gradients included). Agreement: both paths' values vs
a float64 ``log_softmax(h.double() @ W.double().T)`` (error relative to the float64 log-prob <= 2e-6, ~17
float32 eps); gradients vs that reference's float64 autograd gradients
at T <= 512, alignkit's vs TRL's at T = 2048 (relative max error <= 1e-4).

Secondary rows (the older comparison): alignkit's chunked ``selective_log_softmax`` on given logits vs
``log_softmax(logits).gather``, forward only, which materialises a float32 ``(B, T, V)`` log-softmax.
"""
from __future__ import annotations

import logging

import torch

from alignkit.losses import (
    CHUNK_ELEMENTS,
    LM_HEAD_TILE_ELEMENTS,
    LM_HEAD_VOCAB_CHUNK,
    lm_head_log_probs,
    selective_log_softmax,
)

from .common import Context, Row, interleaved, peak_cpu_bytes

logger = logging.getLogger("benchmarks")

VOCAB = 49152  # SmolLM2's vocabulary
HIDDEN = 576  # SmolLM2-135M's hidden size
LOGIT_STD = 4.0  # spread of the random logits (SmolLM2's real logits span tens of nats)
REL_TOL = 2e-6  # value tolerance relative to the float64 log-prob: ~17 float32 eps


def naive_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The baseline: full log-softmax, then gather. ``(B, T, V), (B, T) -> (B, T)``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_lm_head_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's fused LM head off Triton (``add_fused_lm_head``'s call): ``(B, T, H), (V, H), (B, T) -> (B, T)``."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != -100
    logps = ChunkedLogProbFunction.apply(hidden.reshape(-1, hidden.size(-1)), weight, None,
                                         labels.clamp(min=0).reshape(-1), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                         None, 1.0, ("log_probs",))[0]
    return logps.view(mask.shape).masked_fill(~mask, 0)


def float64_reference(hidden, weight, labels, upstream, *, grads: bool = True, rows: int = 512):
    """Values and, with ``grads``, (grad_hidden, grad_weight) of ``sum(upstream * log_softmax(h @ W^T)[labels])``
    in float64 by autograd, ``rows`` tokens at a time (the float64 ``(rows, V)`` logits fit in memory)."""
    h64, w64 = hidden.detach().double().reshape(-1, hidden.size(-1)), weight.detach().double().requires_grad_(grads)
    flat_labels, flat_up = labels.reshape(-1), upstream.reshape(-1).double()
    values, grad_h = torch.empty(h64.shape[0], dtype=torch.float64), torch.empty_like(h64)
    grad_w = torch.zeros_like(w64)
    for start in range(0, h64.shape[0], rows):
        part = slice(start, start + rows)
        h = h64[part].clone().requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            logp = torch.log_softmax(h @ w64.T, -1).gather(-1, flat_labels[part, None]).squeeze(-1)
        values[part] = logp.detach()
        if grads:
            gh, gw = torch.autograd.grad(logp, (h, w64), flat_up[part])
            grad_h[part] = gh
            grad_w += gw
    return (values.view(labels.shape), grad_h.view(hidden.shape), grad_w) if grads else (values.view(labels.shape),)


def _grad_err(grads, ref_grads) -> float:
    """Largest ``max|g - g_ref| / max|g_ref|`` over the gradients."""
    return max(((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads))


def bench_lm_head(ctx: Context, batch: int, seq: int, hidden_size: int, rounds: int) -> list[Row]:
    """Rows for one shape: forward + backward time and peak memory, alignkit vs TRL's chunked kernel."""
    gen = torch.Generator().manual_seed(seq)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen).requires_grad_()  # (B, T, H)
    weight = (torch.randn(VOCAB, hidden_size, generator=gen) * LOGIT_STD / hidden_size ** 0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)  # (B, T), every position scored
    upstream = torch.randn(batch, seq, generator=gen)  # d loss / d logp (advantage-like weights)

    def step(fn):
        def run():
            logps = fn(hidden, weight, labels)
            return (logps.detach(), *torch.autograd.grad(logps, (hidden, weight), upstream))
        return run

    ours, base = step(lm_head_log_probs), step(trl_lm_head_log_probs)
    peak_ours, out_ours = peak_cpu_bytes(ours)
    peak_base, out_base = peak_cpu_bytes(base)
    logger.info("logprobs T=%d: peak MiB alignkit %.0f, TRL %.0f; timing %d round(s)", seq, peak_ours / 2**20,
                peak_base / 2**20, rounds)
    times = interleaved({"ours": ours, "base": base}, rounds=rounds, warmup=False)  # the peak-memory calls warmed both
    logger.info("logprobs T=%d: s alignkit %.2f, TRL %.2f; float64 reference", seq, times["ours"], times["base"])
    # float64 gradients cost three float64 GEMMs of the full shape: up to T = 512; above, TRL's gradients are
    # the second implementation the gradients are checked against
    ref, *ref_grads = float64_reference(hidden, weight, labels, upstream, grads=seq <= 512)
    errors = [(out[0].double() - ref).abs() for out in (out_ours, out_base)]
    diff, diff_base = (e.max().item() for e in errors)
    # Values are checked relative to the truth: float32 rounds |log p| ~ 6-33 here to 4e-7 .. 2e-6 (eps x |ref|),
    # and both kernels land within ~5-8 eps of it; an absolute 1e-5 is ~4 eps at |ref| = 21 and failed both
    # (1.0e-5 and 1.2e-5 at T = 2048) on one machine's GEMM summation order while passing on another's.
    rel, rel_base = (e.div(ref.abs().clamp_min(1.0)).max().item() for e in errors)
    versus = "float64" if ref_grads else "trl"
    ref_grads = ref_grads or [g.double() for g in out_base[1:]]
    grad_errs = {"alignkit": _grad_err(out_ours[1:], ref_grads), "trl": _grad_err(out_base[1:], ref_grads)}
    agreement = {"max_abs_diff_vs_float64": diff, "trl_max_abs_diff_vs_float64": diff_base,
                 "max_rel_diff_vs_float64": rel, "trl_max_rel_diff_vs_float64": rel_base,
                 f"grad_rel_err_vs_{versus}": grad_errs["alignkit"], "rel_tol": REL_TOL, "grad_tol": 1e-4,
                 "ok": max(rel, rel_base) <= REL_TOL and max(grad_errs.values()) <= 1e-4}
    if versus == "float64":
        agreement["trl_grad_rel_err_vs_float64"] = grad_errs["trl"]
    tile_v = min(VOCAB, LM_HEAD_VOCAB_CHUNK)
    shape = f"B={batch}, T={seq}, H={hidden_size}, V={VOCAB}, fp32"
    details = {"shape": shape, "alignkit_tile": f"{LM_HEAD_TILE_ELEMENTS // tile_v} tokens x {tile_v} vocab",
               "trl_tile": "4096 tokens x 32768 vocab (torch fallback on CPU)",
               "logits_MiB_never_materialised": batch * seq * VOCAB * 4 / 2**20}
    name = f"per-token log-probs fwd+bwd: alignkit vs TRL chunked kernel (T={seq})"
    return [
        Row(f"{name}: time", times["ours"], times["base"], "s", target=1.0, higher_is_better=False,
            agreement=agreement, details=details,
            notes=f"{shape}; LM head + log-probs + grads into hidden and weight; median of {rounds} alternating rounds"),
        Row(f"{name}: peak memory", peak_ours / 2**20, peak_base / 2**20, "MiB", target=1.0,
            higher_is_better=False, agreement=agreement, details=details,
            notes=f"{shape}; peak above entry over forward + backward, both gradients included"),
    ]


def bench_logits_log_probs(ctx: Context) -> list[Row]:
    """Secondary reference: chunked ``selective_log_softmax`` on given logits vs full ``log_softmax``."""
    batch, seq = ctx.pick((2, 64), (4, 512))
    chunk = ctx.pick(32, 256)  # rows per chunk; alignkit's default (CHUNK_ELEMENTS // V rows) is also measured below
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, seq, VOCAB, generator=gen) * LOGIT_STD  # (B, T, V)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)  # (B, T)

    def ours():
        return selective_log_softmax(logits, labels, chunk_size=chunk)

    def base():
        return naive_log_probs(logits, labels)

    peak_ours, lp_ours = peak_cpu_bytes(ours)
    peak_default, _ = peak_cpu_bytes(lambda: selective_log_softmax(logits, labels))
    peak_base, lp_base = peak_cpu_bytes(base)
    # independent float64 reference for both
    ref = (logits.double().gather(-1, labels.unsqueeze(-1)).squeeze(-1)
           - torch.logsumexp(logits.double(), dim=-1))  # (B, T)
    diff = (lp_ours.double() - lp_base.double()).abs().max().item()
    diff_ref = (lp_ours.double() - ref).abs().max().item()
    diff_base_ref = (lp_base.double() - ref).abs().max().item()
    times = interleaved({"ours": ours, "base": base}, rounds=ctx.pick(2, 3))
    logits_mb = logits.numel() * 4 / 2**20
    # the tolerance is applied against the float64 truth: at |log p| ~ 30 a float32 ulp is ~4e-6, and the
    # baseline's own full-vocab log_softmax drifts further from the truth than the chunked path does
    agreement = {"max_abs_diff_vs_float64": diff_ref, "baseline_max_abs_diff_vs_float64": diff_base_ref,
                 "max_abs_diff_vs_baseline": diff, "tol": 1e-5, "ok": diff_ref <= 1e-5}
    shape = f"(B={batch}, T={seq}, V={VOCAB}), logits {logits_mb:.0f} MiB, chunk {chunk} rows"
    secondary = "secondary reference (from given logits, forward only, vs full log_softmax)"
    return [
        Row("per-token log-probs: peak memory", peak_ours / 2**20, peak_base / 2**20, "MiB", target=2.0,
            higher_is_better=False, agreement=agreement,
            details={"shape": shape, "peak_MiB_default_chunk": peak_default / 2**20,
                     "default_chunk_rows": CHUNK_ELEMENTS // VOCAB},
            notes=f"{secondary}: extra memory of the log-prob step above the logits {shape}; with alignkit's "
                  f"default chunk ({CHUNK_ELEMENTS // VOCAB} rows) the peak is {peak_default / 2**20:.0f} MiB"),
        Row("per-token log-probs: time", times["ours"], times["base"], "s", higher_is_better=False,
            agreement=agreement, details={"shape": shape}, notes=f"{secondary}; reported only"),
    ]


def bench_logprobs(ctx: Context) -> list[Row]:
    rows = []
    for seq in ctx.pick((32, 64), (512, 2048)):
        rows += bench_lm_head(ctx, batch=1, seq=seq, hidden_size=ctx.pick(64, HIDDEN),
                              rounds=ctx.pick(1, 3 if seq <= 512 else 1))
    return rows + bench_logits_log_probs(ctx)
