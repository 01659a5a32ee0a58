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

With ``share_prompt=True`` (models on ``sdpa_varlen`` that honour it, :func:`alignkit.attention.honours_shared_prefix`)
each pair's rejected sequence follows its chosen one and drops the prompt tokens they share but the last: it
starts at the last shared prompt token (position ``k``, so that token predicts the first reply token), and
``shared_prefix_lens`` (one int per sequence) tells the attention to read the first ``k`` tokens of the
chosen sequence in front of it. The prompt is run once per pair instead of twice; every hidden state, and so
every log-prob and gradient, equals the unshared row's (``k`` = the shared prompt prefix minus one, so no
shared position is ever scored).

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
    share_prompt: bool = False

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

    def documents(self, examples: list[dict]) -> list[tuple[int, int, list[int], list[int]]]:
        """The row's documents ``(segment, first position, token ids, completion mask)`` in row order: chosen
        sequences then rejected ones, or with ``share_prompt`` each chosen one followed by its rejected one
        from position ``k`` (:func:`shared_prefix`) on."""
        seqs, n = self.sequences(examples), len(examples)
        if not self.share_prompt:
            return [(i, 0, ids, mask) for i, (ids, mask) in enumerate(seqs)]
        docs = []
        for i in range(n):
            (c_ids, c_mask), (r_ids, r_mask) = seqs[i], seqs[n + i]
            k = shared_prefix(c_ids, c_mask, r_ids, r_mask)
            docs += [(i, 0, c_ids, c_mask), (n + i, k, r_ids[k:], r_mask[k:])]
        return docs

    def __call__(self, examples: list[dict]) -> dict:
        docs = self.documents(examples)
        lengths = [len(ids) for _, _, ids, _ in docs]
        ids = torch.tensor([t for _, _, s, _ in docs for t in s], dtype=torch.long)  # (N,)
        mask = torch.tensor([m for _, _, _, s in docs for m in s], dtype=torch.long)  # (N,)
        segment = torch.repeat_interleave(torch.tensor([d[0] for d in docs]), torch.tensor(lengths))  # (N,)
        positions = torch.cat([torch.arange(k, k + n) for (_, k, _, _), n in zip(docs, lengths)])  # (N,)
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
        if self.share_prompt:
            batch["shared_prefix_lens"] = torch.tensor([k for _, k, _, _ in docs])  # (2B,) read by sdpa_varlen
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch


def shared_prefix(c_ids: list[int], c_mask: list[int], r_ids: list[int], r_mask: list[int]) -> int:
    """How many leading tokens the rejected sequence can read from the chosen one: the tokens both sequences
    share at their start and neither scores (prompt tokens), minus the last one (it must predict each reply's
    first token in its own sequence); 0 when they share at most one."""
    k = 0
    for a, b, ma, mb in zip(c_ids, r_ids, c_mask, r_mask):
        if a != b or ma or mb:
            break
        k += 1
    return max(k - 1, 0)


def sequence_sums(values: torch.Tensor, segment_ids: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """Per-sequence sums of a padding-free row: ``values`` and ``segment_ids`` ``(1, N)`` -> ``(n_sequences,)``."""
    out = values.new_zeros(n_sequences)
    return out.index_add(0, segment_ids[0].to(values.device), values[0])


def padding_fraction(examples: list[dict], max_length: int | None = None) -> float:
    """The share of pad tokens in TRL's padded batch of ``examples`` (``2B`` rows padded to the longest)."""
    lengths = [len(ids) for ids, _ in PaddingFreePreferenceCollator(max_length).sequences(examples)]
    return 1 - sum(lengths) / (len(lengths) * max(lengths))
