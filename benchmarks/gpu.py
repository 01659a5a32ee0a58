"""GPU suite (``--suite gpu``): training tokens/s and MFU of random-init Llama-3.2-1B / Llama-3.1-8B configs,
bf16, SDPA, on one CUDA GPU. Not run on the CPU machines (no numbers are claimed for it here).

MFU = achieved FLOP/s / peak dense bf16 FLOP/s of the GPU, with achieved FLOP/s counted as
  full fine-tuning: 6 x N x tokens / s   (N = all parameters; forward 2N, backward 4N per token;
                    attention's T^2 term is left out, as in Kaplan et al. / the PaLM MFU convention);
  LoRA:             4 x N x tokens / s   (forward 2N + backward through frozen weights for the
                    activation gradients 2N; the frozen weights' own gradient 2N is not computed;
                    adapter FLOPs, < 1% of N, are not counted).
The peak is taken from ``PEAK_BF16_TFLOPS`` by device name, or ``ALIGNKIT_PEAK_TFLOPS``.
Sizes: ``smoke`` = a 2-layer config (checks the path), ``full`` = the real 1B (full FT, AdamW) and
8B (LoRA r=16 on all linear layers: full FT of 8B with AdamW needs ~128 GB), seq 2048.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from .common import Context, Row

logger = logging.getLogger("benchmarks")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

LLAMA_CONFIGS = {  # published configs of the two models (random init: no weights are downloaded)
    "Llama-3.2-1B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    "Llama-3.1-8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False, "rope_theta": 500000.0, "max_position_embeddings": 131072},
}


def peak_tflops(name: str) -> float | None:
    if os.environ.get("ALIGNKIT_PEAK_TFLOPS"):
        return float(os.environ["ALIGNKIT_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_tokens_per_s(model, *, batch: int, seq: int, steps: int, lora: bool) -> float:
    """Tokens/s of forward + backward + AdamW step on random tokens, after 2 warm-up steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")  # (B, T)
    for i in range(steps + 2):
        # 1. start the clock after the warm-up steps
        if i == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        # 2. one step
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch * seq * steps / (time.perf_counter() - t0)


def bench_gpu(ctx: Context) -> list[Row]:
    if not torch.cuda.is_available():
        raise RuntimeError("--suite gpu needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    device_name = torch.cuda.get_device_name(0)
    peak = peak_tflops(device_name)
    rows = []
    for name, mode, batch, seq in (("Llama-3.2-1B", "full", 4, 2048), ("Llama-3.1-8B", "lora", 2, 2048)):
        cfg = dict(LLAMA_CONFIGS[name])
        if ctx.smoke:
            cfg.update(num_hidden_layers=2)
            batch, seq = 1, 256
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        if mode == "lora":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        torch.cuda.reset_peak_memory_stats()
        tps = train_tokens_per_s(model, batch=batch, seq=seq, steps=ctx.pick(2, 10), lora=mode == "lora")
        flops_per_token = (6 if mode == "full" else 4) * n_params
        mfu = tps * flops_per_token / (peak * 1e12) if peak else None
        rows.append(Row(f"GPU {name}{' (2 layers)' if ctx.smoke else ''} {mode}: train tokens/s", tps, None,
                        "tok/s", details={"mfu": mfu, "params": n_params, "batch": batch, "seq": seq,
                                          "flops_per_token": flops_per_token, "peak_tflops": peak,
                                          "device": device_name, "dtype": "bf16", "attn": "sdpa",
                                          "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30},
                        notes=f"MFU {100 * mfu:.1f}% ({'6' if mode == 'full' else '4'} x N x tok/s / peak "
                              f"{peak} TFLOP/s)" if mfu is not None else "MFU: unknown peak for this GPU"))
        del model
        torch.cuda.empty_cache()
    return rows
