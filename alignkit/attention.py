"""Padding-free attention without flash-attn: PyTorch SDPA run once per document (``"sdpa_varlen"``).

Padding-free batches (TRL's ``padding_free=True`` collator, ``PackedSFTDataset(return_position_ids=True)``)
put several documents in one row and restart the position ids at each document. With flash-attention's
varlen kernel (GPU) each document attends only to itself at the cost of the sum of the per-document
squares. With plain ``sdpa`` (CPU, or a GPU without flash-attn) transformers turns the restarting
position ids into a dense ``(N, N)`` block-diagonal mask, so attention costs ``N**2`` over the whole row:
at batch 8 of ~230-token GSM8K documents, 1,819² scores against 8 x 394² for the padded batch and
8 x 227² for the documents alone, which spends again much of what dropping the pads saved
(``benchmarks/RESULTS.md``: 1.3-1.45x padding-free on ``sdpa``, ~2x on ``sdpa_varlen``).

``"sdpa_varlen"`` keeps the padding-free semantics and the cost of varlen kernels on any device:

* its mask function returns no mask for a single unpadded row whose queries and keys coincide
  (training, prefill of an empty cache), and transformers' SDPA mask otherwise;
* its attention function finds the document boundaries (``cu_seq_lens_q`` from TRL's collator, else
  where ``position_ids`` restart) and calls causal SDPA on each document's slice; anything else (a
  mask, a batch of several rows, decoding with a KV cache) goes to transformers' own SDPA path.

Use it with ``load_model(..., attn_implementation="sdpa_varlen")`` or, in a recipe,
``model.attn_implementation: sdpa_varlen``. The values equal ``sdpa`` with the block-diagonal mask
(``tests/test_attention.py`` compares both against a float64 reference).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

VARLEN_SDPA = "sdpa_varlen"


def document_bounds(q_len: int, position_ids: torch.Tensor | None = None,
                    cu_seq_lens: torch.Tensor | None = None) -> list[int] | None:
    """Start offsets of each document plus the row length, e.g. ``[0, 5, 9, 12]``; ``None`` if unknown.

    ``cu_seq_lens`` (TRL's collator) is used as is; otherwise a document starts wherever
    ``position_ids`` (shape ``(1, T)``) does not continue the previous position by one.
    """
    if cu_seq_lens is not None:
        bounds = [int(x) for x in cu_seq_lens.tolist()]
        return bounds if bounds and bounds[0] == 0 and bounds[-1] == q_len else None
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] != q_len:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1  # (n_docs - 1,)
    return [0, *starts.tolist(), q_len]


def varlen_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` (B, H, T, D), ``key``/``value`` (B, Hkv, S, D) ->
    (B, T, H, D). Causal SDPA per document for one unmasked packed row, transformers' SDPA otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1:
        bounds = document_bounds(query.shape[2], kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
    if bounds is None or len(bounds) <= 2 or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", query.shape[1] // key.shape[1])
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (1, H, T, D)
    p = dropout if module.training else 0.0
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                            dropout_p=p, is_causal=True, scale=scaling)  # (1, H, t, D)
             for s, e in itertools.pairwise(bounds) if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


def varlen_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers mask function: no mask where ``varlen_sdpa_attention`` splits by document (one row,
    no padding mask, queries == keys from position 0); transformers' SDPA mask everywhere else."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None and q_length == kv_length and kv_offset == 0 and q_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register_varlen_sdpa() -> str:
    """Register ``"sdpa_varlen"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)
    return VARLEN_SDPA
