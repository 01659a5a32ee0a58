"""Training memory of full fine-tuning, LoRA and QLoRA (4-bit NF4, Dettmers et al. 2023): parameter,
gradient and AdamW-state bytes computed from the parameter counts, next to the bytes measured on the
live tensors after one real training step (``alignkit.models.load_model``; fp32 on CPU).

Computed, with P base parameters (Q of them in quantized Linear weights) and L LoRA parameters:
  full:  params 4P,  grads 4P,  AdamW (exp_avg, exp_avg_sq) 8P
  LoRA:  params 4P + 4L,  grads 4L,  AdamW 8L
  QLoRA: params 4(P - Q) + Q/2 (NF4: 2 weights a byte) + Q/64 (double-quantized absmax: one byte a
         64-weight block) + 4Q/(64*256) (fp32 second-level absmax) + 4L;  grads 4L;  AdamW 8L
"""
from __future__ import annotations

import logging

import torch

from .common import Context, Row, tensor_bytes

logger = logging.getLogger("benchmarks")


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _quant_state_bytes(model) -> int:
    """absmax / nested absmax / code tensors of bitsandbytes 4-bit weights (not in parameters())."""
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            continue
        total += qs.absmax.numel() * qs.absmax.element_size()
        if getattr(qs, "state2", None) is not None:
            total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total


def measure(model, vocab: int, seq: int) -> dict:
    """Bytes of params (+ 4-bit quant states), grads after one backward, AdamW state after one step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))  # (1, T)
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    grads = tensor_bytes(p.grad for p in params)
    opt.step()
    state = tensor_bytes(t for s in opt.state.values() for t in s.values()
                         if torch.is_tensor(t) and t.dim() > 0)  # step counters are 0-dim
    return {"params": tensor_bytes(model.parameters()) + _quant_state_bytes(model), "grads": grads,
            "optimizer": state, "loss": float(loss)}


def computed(kind: str, n_total: int, n_quant: int, n_lora: int) -> dict:
    """The formulas of the module docstring; ``n_total`` counts base parameters (LoRA excluded)."""
    if kind == "full":
        return {"params": 4 * n_total, "grads": 4 * n_total, "optimizer": 8 * n_total}
    base = 4 * n_total if kind == "lora" else (4 * (n_total - n_quant) + n_quant / 2 + n_quant / 64
                                               + 4 * n_quant / (64 * 256))
    return {"params": base + 4 * n_lora, "grads": 4 * n_lora, "optimizer": 8 * n_lora}


def bench_memory(ctx: Context) -> list[Row]:
    from alignkit.models import load_model

    seq = ctx.pick(16, 32)
    rows, losses = [], {}
    for kind, quant, lora in (("full", None, None), ("lora", None, _lora_config()),
                              ("qlora", "4bit", _lora_config())):
        model, _tok, _ = load_model(str(ctx.model_dir()), dtype=torch.float32, device="cpu",
                                   quantization=quant, lora=lora)
        model.train()
        names = dict(model.named_parameters())
        n_lora = sum(p.numel() for n, p in names.items() if "lora_" in n)
        n_quant = sum(2 * p.numel() for n, p in names.items() if getattr(p, "quant_state", None) is not None)
        n_total = sum(p.numel() for n, p in names.items() if "lora_" not in n
                      and getattr(p, "quant_state", None) is None) + n_quant
        got = measure(model, model.config.vocab_size, seq)
        want = computed(kind, n_total, n_quant, n_lora)
        losses[kind] = got.pop("loss")
        total_got, total_want = sum(got.values()), sum(want.values())
        rows.append(Row(f"memory: {kind} (params + grads + AdamW), measured vs computed", total_got / 2**20,
                        total_want / 2**20, "MiB",
                        agreement={"rel_diff": abs(total_got - total_want) / total_want,
                                   "tol": 0.02, "ok": abs(total_got - total_want) / total_want <= 0.02},
                        details={"measured_MiB": {k: v / 2**20 for k, v in got.items()},
                                 "computed_MiB": {k: v / 2**20 for k, v in want.items()},
                                 "base_params": n_total, "quantized_params": n_quant, "lora_params": n_lora},
                        notes="ratio = computed / measured; activations not included"))
        del model
    # the same model at step 0: full, LoRA (B = 0) and QLoRA (NF4 weights) start from (nearly) the same loss
    for row in rows:
        row.details["loss_step0"] = losses
    return rows + computed_at_scale()


#: Llama-3.2-1B and Llama-3.1-8B shapes (their config.json); nothing is downloaded
SHAPES = {
    "1B (Llama-3.2-1B shape)": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                    "tie_word_embeddings": True},
    "8B (Llama-3.1-8B shape)": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                    "tie_word_embeddings": False},
}


def counts(model, r: int, targets: list[str]) -> tuple[int, int, int]:
    """(base params, params in quantizable Linear weights, LoRA params at rank r) of a (meta) model:
    bitsandbytes quantizes every Linear but the LM head; LoRA adds r (in + out) per targeted Linear."""
    from torch import nn

    n_total = sum(p.numel() for p in model.parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    n_quant = sum(m.weight.numel() for _, m in linears)
    n_lora = sum(r * (m.in_features + m.out_features) for n, m in linears if n.rsplit(".", 1)[-1] in targets)
    return n_total, n_quant, n_lora


def computed_at_scale() -> list[Row]:
    """Params + grads + AdamW state of each method at 1B and 8B from the same formulas (exact at 135M above),
    with parameter counts from the architectures built on the meta device (no weights allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lora = _lora_config()
    rows = []
    for label, shape in SHAPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        n_total, n_quant, n_lora = counts(model, lora.r, sorted(lora.target_modules))
        gib = {kind: sum(computed(kind, n_total, n_quant, n_lora).values()) / 2**30
               for kind in ("full", "lora", "qlora")}
        rows.append(Row(f"memory at {label}: full / LoRA / QLoRA (computed)", gib["full"], None, "GiB",
                        details={"GiB": gib, "base_params": n_total, "quantized_params": n_quant,
                                 "lora_params": n_lora, "lora_r": lora.r},
                        notes=f"fp32 params + grads + AdamW: full {gib['full']:.1f}, LoRA {gib['lora']:.1f}, "
                              f"QLoRA {gib['qlora']:.1f} GiB ({n_total / 1e9:.2f}B params; bf16 weights halve "
                              "the frozen part); the formula equals the measured bytes at 135M (rows above)"))
    return rows
