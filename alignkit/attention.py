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

Shared prefixes (padding-free DPO with ``train.padding_free``, :mod:`alignkit.data.dpo_packing`): with the
keyword ``shared_prefix_lens`` (one int per document, passed through the model's forward like
``cu_seq_lens_q``), a document ``j`` with ``k = shared_prefix_lens[j] > 0`` also attends to the first ``k``
tokens of document ``j - 1`` (their keys and values; ``j - 1`` itself reads no prefix and starts at position
0), as if they stood in front of it: a DPO pair's rejected
reply reads the prompt of the chosen sequence before it instead of carrying its own copy. Its queries see
all ``k`` prefix keys and their own keys causally (:func:`prefix_causal_mask`); its ``position_ids`` continue
from ``k``. Only this function reads the keyword: other attention implementations would ignore it, so the
collator emits it only for ``sdpa_varlen`` models whose attention was probed to honour it
(:func:`honours_shared_prefix`).

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


def prefix_causal_mask(q_len: int, prefix: int, device=None) -> torch.Tensor:
    """``(q_len, prefix + q_len)`` bool mask: query ``i`` sees every prefix key and its own keys up to ``i``."""
    return torch.ones(q_len, prefix + q_len, dtype=torch.bool, device=device).tril(diagonal=prefix)


def _document_attention(query, key, value, bounds: list[int], prefixes: list[int] | None, dropout: float,
                        scaling: float | None) -> list[torch.Tensor]:
    """Causal SDPA per document ``[s, e)`` of ``bounds``; a document with a shared prefix ``k`` reads the first
    ``k`` keys/values of the document before it as well. ``query``/``key``/``value`` ``(1, H, T, D)``."""
    parts = []
    for j, (s, e) in enumerate(itertools.pairwise(bounds)):
        if e <= s:
            continue
        k = prefixes[j] if prefixes else 0
        if k <= 0:
            parts.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                        dropout_p=dropout, is_causal=True, scale=scaling))
            continue
        p = bounds[j - 1]  # the previous document's start: its first k tokens are this one's prefix
        keys = torch.cat([key[:, :, p:p + k], key[:, :, s:e]], dim=2)  # (1, H, k + t, D)
        values = torch.cat([value[:, :, p:p + k], value[:, :, s:e]], dim=2)
        mask = prefix_causal_mask(e - s, k, device=query.device)  # (t, k + t)
        parts.append(F.scaled_dot_product_attention(query[:, :, s:e], keys, values, attn_mask=mask,
                                                    dropout_p=dropout, scale=scaling))  # (1, H, t, D)
    return parts


def _shared_prefixes(kwargs: dict, bounds: list[int]) -> list[int] | None:
    """``shared_prefix_lens`` as a list checked against ``bounds`` (one per document; a prefix never longer
    than the document before it, which has no prefix itself; none for the first document)."""
    lens = kwargs.get("shared_prefix_lens")
    if lens is None:
        return None
    lens = [int(x) for x in (lens.tolist() if torch.is_tensor(lens) else lens)]
    sizes = [e - s for s, e in itertools.pairwise(bounds)]
    if len(lens) != len(sizes) or (lens and lens[0] != 0) or any(
            k < 0 or (j and k and (k > sizes[j - 1] or lens[j - 1])) for j, k in enumerate(lens)):
        raise ValueError(f"sdpa_varlen: shared_prefix_lens {lens} do not fit the documents of lengths {sizes}")
    return lens


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
        if kwargs.get("shared_prefix_lens") is not None:
            raise ValueError("sdpa_varlen: shared_prefix_lens needs one unmasked packed row of documents")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", query.shape[1] // key.shape[1])
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (1, H, T, D)
    p = dropout if module.training else 0.0
    parts = _document_attention(query, key, value, bounds, _shared_prefixes(kwargs, bounds), p, scaling)
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


def honours_shared_prefix(model, n: int = 5, rtol: float = 1e-3) -> bool:
    """Whether ``model`` (on ``sdpa_varlen``) reads ``shared_prefix_lens``: a row ``[a b c d e | d' e']`` whose
    second document shares the first 3 tokens of the first must give that document the logits it gets as
    ``[a b c d' e']`` alone (two small no-grad forwards in eval mode, so dropout cannot tell them apart; the
    model's mode is restored), to ``rtol`` of the largest logit: float32 kernels differ by ~4e-5 of it on
    SmolLM2-135M, a prefix that is not read by ~0.4."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(1, n + 3) % vocab  # (n + 2,)
    k = n - 2
    alone = torch.cat([ids[:k], ids[n:]])[None]  # (1, k + 2) the second sequence on its own
    row = ids[None]  # (1, n + 2): the first sequence (n tokens), then the second's own 2 tokens
    positions = torch.cat([torch.arange(n), torch.arange(k, k + 2)])[None]
    cu = torch.tensor([0, n, n + 2], dtype=torch.int32)
    device, training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=alone.to(device)).logits[0, k:]
            got = model(input_ids=row.to(device), position_ids=positions.to(device), cu_seq_lens_q=cu.to(device),
                        cu_seq_lens_k=cu.to(device), max_length_q=n, max_length_k=n,
                        shared_prefix_lens=torch.tensor([0, k], device=device)).logits[0, n:]
    finally:
        model.train(training)
    want, got = want.double(), got.double()
    return bool((want - got).abs().max() <= rtol * want.abs().max())


def register_varlen_sdpa() -> str:
    """Register ``"sdpa_varlen"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)
    return VARLEN_SDPA
