"""Padding-free preference batches: every pair's chosen and rejected sequence end to end in one row.

TRL 1.16's ``DataCollatorForPreference`` pads ``2B`` sequences (``[chosen; rejected]``) to the longest one;
:class:`PaddingFreePreferenceCollator` lays the same ``2B`` sequences (prompt + completion, truncated the way
TRL truncates them) one after the other in a single row ``(1, N)``, ``N`` = the sum of their lengths, with

* ``position_ids`` restarting at 0 for each sequence, and ``cu_seq_lens_q/k`` + ``max_length_q/k`` (what
  TRL's padding-free SFT collator passes), so per-document attention (``sdpa_varlen``, flash-attention's
  varlen kernel) keeps the sequences apart;
* ``completion_mask`` (1 on completion tokens) and ``segment_ids`` (the sequence each token belongs to:
  ``0..B-1`` chosen, ``B..2B-1`` rejected);
* ``shift_labels``: at position ``t`` the token ``t + 1`` when it is a completion token of the same sequence,
  else ``-100`` (so no log-prob ever crosses a sequence boundary);
* ``ref_chosen_logps`` / ``ref_rejected_logps`` ``(B,)`` when the examples carry them (TRL's precompute pass).

Per-sequence log-probs are then ``zeros(2B).index_add(0, segment_ids[0], per_token[0])``
(:func:`sequence_sums`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

#: keys of a padding-free batch that are not model inputs
PACKED_ONLY_KEYS = frozenset({"segment_ids", "shift_labels", "completion_mask", "ref_chosen_logps",
                              "ref_rejected_logps"})


@dataclass
class PaddingFreePreferenceCollator:
    """Examples ``{"prompt_ids", "chosen_ids", "rejected_ids"[, "ref_chosen_logps", "ref_rejected_logps"]}``
    -> one padding-free row (module docstring). ``max_length`` / ``truncation_mode`` ("keep_start" or
    "keep_end") cut each prompt + completion sequence as TRL's ``DataCollatorForPreference`` does."""

    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def _cut(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is None:
            return ids, mask
        if self.truncation_mode == "keep_start":
            return ids[:self.max_length], mask[:self.max_length]
        if self.truncation_mode == "keep_end":
            return ids[-self.max_length:], mask[-self.max_length:]
        raise ValueError(f"Unsupported truncation mode: {self.truncation_mode}, expected 'keep_start' or 'keep_end'")

    def sequences(self, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
        """``2B`` ``(token ids, completion mask)`` pairs, chosen sequences first, each truncated."""
        out = []
        for reply in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                prompt, completion = list(ex["prompt_ids"]), list(ex[reply])
                out.append(self._cut(prompt + completion, [0] * len(prompt) + [1] * len(completion)))
        return out

    def __call__(self, examples: list[dict]) -> dict:
        seqs = self.sequences(examples)
        lengths = [len(ids) for ids, _ in seqs]
        ids = torch.tensor([t for s, _ in seqs for t in s], dtype=torch.long)  # (N,)
        mask = torch.tensor([m for _, s in seqs for m in s], dtype=torch.long)  # (N,)
        segment = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths))  # (N,)
        positions = torch.cat([torch.arange(n) for n in lengths])  # (N,)
        same_next = torch.zeros_like(mask, dtype=torch.bool)  # token t+1 exists and is in t's sequence
        same_next[:-1] = segment[1:] == segment[:-1]
        scored = torch.zeros_like(same_next)
        scored[:-1] = same_next[:-1] & (mask[1:] == 1)
        labels = torch.full_like(ids, -100)
        labels[:-1] = torch.where(scored[:-1], ids[1:], labels[:-1])
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)  # (2B + 1,)
        batch = {"input_ids": ids[None], "position_ids": positions[None], "completion_mask": mask[None],
                 "segment_ids": segment[None], "shift_labels": labels[None], "cu_seq_lens_q": cu,
                 "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch


def sequence_sums(values: torch.Tensor, segment_ids: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """Per-sequence sums of a padding-free row: ``values`` and ``segment_ids`` ``(1, N)`` -> ``(n_sequences,)``."""
    out = values.new_zeros(n_sequences)
    return out.index_add(0, segment_ids[0].to(values.device), values[0])


def padding_fraction(examples: list[dict], max_length: int | None = None) -> float:
    """The share of pad tokens in TRL's padded batch of ``examples`` (``2B`` rows padded to the longest)."""
    lengths = [len(ids) for ids, _ in PaddingFreePreferenceCollator(max_length).sequences(examples)]
    return 1 - sum(lengths) / (len(lengths) * max(lengths))
