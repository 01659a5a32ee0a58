"""Per-token log-probs: alignkit's chunked ``selective_log_softmax`` vs ``log_softmax(logits).gather``.

The baseline materialises a float32 ``(B, T, V)`` log-softmax next to the logits; the chunked path
keeps ``chunk x V`` floats. Peak memory of the step (CPU allocator, torch profiler) at V = 49152.
"""
from __future__ import annotations

import torch

from alignkit.losses import CHUNK_ELEMENTS, selective_log_softmax

from .common import Context, Row, interleaved, peak_cpu_bytes

VOCAB = 49152  # SmolLM2's vocabulary


def naive_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The baseline: full log-softmax, then gather. ``(B, T, V), (B, T) -> (B, T)``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def bench_logprobs(ctx: Context) -> list[Row]:
    batch, seq = ctx.pick((2, 64), (4, 512))
    chunk = ctx.pick(32, 256)  # rows per chunk; alignkit's default (CHUNK_ELEMENTS // V rows) is also measured below
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, seq, VOCAB, generator=gen) * 4  # (B, T, V)
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
    return [
        Row("per-token log-probs: peak memory", peak_ours / 2**20, peak_base / 2**20, "MiB", target=2.0,
            higher_is_better=False, agreement=agreement,
            details={"shape": shape, "peak_MiB_default_chunk": peak_default / 2**20,
                     "default_chunk_rows": CHUNK_ELEMENTS // VOCAB},
            notes=f"extra memory of the log-prob step above the logits {shape}; with alignkit's default "
                  f"chunk ({CHUNK_ELEMENTS // VOCAB} rows) the peak is {peak_default / 2**20:.0f} MiB"),
        Row("per-token log-probs: time", times["ours"], times["base"], "s", higher_is_better=False,
            agreement=agreement, details={"shape": shape}, notes="reported only"),
    ]
