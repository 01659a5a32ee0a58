"""Loss masks you can see: assistant spans for any chat template, and rows exactly as TRL's trainers see them.

* :func:`assistant_mask` finds the assistant turns of a conversation for a chat template WITHOUT
  ``{% generation %}`` tags (most templates): it renders the conversation turn by turn with
  ``apply_chat_template`` and takes the token prefix lengths (an assistant turn starts where the
  rendering of the messages before it plus the generation prompt ends, and ends where the rendering
  up to and including it ends). A template whose partial renderings are not prefixes of the whole
  rendering cannot be split into turns: :class:`MaskError`.
* :func:`with_assistant_masks` adds the ``input_ids`` / ``assistant_masks`` (and, for prompt/completion
  rows, ``completion_mask``) columns that TRL 1.16's ``SFTTrainer`` turns into labels (-100 outside the
  masks) for pre-tokenized rows.
* :func:`sft_view` / :func:`dpo_view` run TRL's own dataset preparation (``SFTTrainer._prepare_dataset``,
  ``DPOTrainer._prepare_dataset``: template, tokenization, labels, truncation, packing) and TRL's own
  collators on a dataset, and return :class:`ViewRow` s: token ids, which tokens carry loss, where
  documents start. :func:`render_text` brackets loss tokens ``[[...]]``; :func:`render_html` colours them.
* :func:`mask_problems` (rows that train on nothing, or on every token when a mask was asked for) and
  :func:`cross_document_problem` (padding-free rows whose attention would cross documents) are the
  checks ``alignkit data check`` runs on that view.
"""
from __future__ import annotations

import copy
import html
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

#: attention implementations that keep padding-free documents apart (flash varlen kernels read
#: cu_seq_lens/position_ids; transformers' mask builders turn restarting position_ids into a
#: block-diagonal mask for sdpa, eager and flex; alignkit's sdpa_varlen splits per document)
PER_DOCUMENT_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention",
                                    "sdpa_varlen"})


class MaskError(ValueError):
    """A loss mask that cannot be built or would train on the wrong tokens (one-line message)."""


@dataclass
class ViewRow:
    """One training sequence as the trainer sees it (padding stripped)."""

    label: str                         # "row 1", "row 1 chosen", "batch 1" (padding-free) ...
    input_ids: list[int]
    loss: list[bool]                   # token carries loss (label != -100, or DPO's completion_mask)
    starts: list[int] = field(default_factory=lambda: [0])  # offsets where a document starts
    masked: bool = True                # a loss mask was asked for (all-one is then a fault)

    @property
    def n_loss(self) -> int:
        return sum(self.loss)


# ----------------------------------------------------------------------------------------------
# Assistant spans for templates without generation tags


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)


def _render(tokenizer, messages, *, chat_template=None, tools=None, generation_prompt=False) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=chat_template,
                                              tools=tools, add_generation_prompt=generation_prompt))


def _prefix_len(tokenizer, messages, k: int, full: list[int], *, generation_prompt: bool, **kw) -> int:
    """Length of the rendering of ``messages[:k]``; MaskError when it is not a prefix of ``full``."""
    if k == 0:
        return 0
    part = _render(tokenizer, messages[:k], generation_prompt=generation_prompt, **kw)
    if part != full[:len(part)]:
        at = next((i for i, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
        what = f"the first {k} messages" + (" with the generation prompt" if generation_prompt else "")
        raise MaskError(
            f"the chat template cannot be split into turns: rendering {what} is not a prefix of the whole "
            f"conversation (they differ at token {at}: {tokenizer.decode(part[at:at + 8])!r} vs "
            f"{tokenizer.decode(full[at:at + 8])!r}); assistant-only loss needs a template that renders earlier "
            "turns the same way, or one with {% generation %} tags")
    return len(part)


def assistant_mask(tokenizer, messages: list[dict], *, chat_template=None, tools=None) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of a conversation: ``input_ids`` as ``apply_chat_template(messages)`` gives them
    (what TRL's SFTTrainer tokenizes), ``mask`` 1 on each assistant turn: from the end of the generation
    prompt that precedes it to the end of its own rendering (its end-of-turn tokens included)."""
    kw = {"chat_template": chat_template, "tools": tools}
    full = _render(tokenizer, messages, **kw)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = _prefix_len(tokenizer, messages, i, full, generation_prompt=True, **kw)
        end = _prefix_len(tokenizer, messages, i + 1, full, generation_prompt=False, **kw)
        mask[start:end] = [1] * (end - start)
    return full, mask


def has_generation_tags(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with ``{% generation %}`` (TRL masks it then)."""
    from trl.chat_template_utils import has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and has_generation_markers(template)


def with_assistant_masks(rows: list[dict], tokenizer, *, name: str = "training data") -> list[dict]:
    """Conversational SFT rows plus the pre-tokenized columns TRL's SFTTrainer builds labels from:
    ``input_ids`` and ``assistant_masks`` (assistant turns, :func:`assistant_mask`), and for prompt/completion
    rows ``completion_mask`` (TRL's rule: 1 after the common prefix of the prompt with its generation prompt).
    A row without any assistant token is refused (MaskError naming the row)."""
    from trl.data_utils import common_prefix_length

    if not getattr(tokenizer, "chat_template", None):
        raise MaskError("assistant-only loss needs a tokenizer with a chat template")
    out = []
    for i, row in enumerate(rows, start=1):
        messages = row["messages"] if "messages" in row else list(row["prompt"]) + list(row["completion"])
        ids, mask = assistant_mask(tokenizer, messages, tools=row.get("tools"))
        if 1 not in mask:
            raise MaskError(f"{name} row {i}: no assistant turn, so assistant-only loss would train on nothing "
                            "(give each conversation an assistant message, or drop the row)")
        extra = {"input_ids": ids, "assistant_masks": mask}
        if "prompt" in row:
            prompt_len = common_prefix_length(_render(tokenizer, row["prompt"], generation_prompt=True), ids)
            extra["completion_mask"] = [0] * prompt_len + [1] * (len(ids) - prompt_len)
        out.append({**row, **extra})
    return out


# ----------------------------------------------------------------------------------------------
# The trainer's own view


def _bare(trainer_class, tokenizer, **attrs):
    """A trainer object with only what its ``_prepare_dataset`` reads (no model, no accelerator)."""
    trainer = trainer_class.__new__(trainer_class)
    trainer._tokenizer = tokenizer
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


def sft_prepare(dataset, tokenizer, args):
    """``(prepared dataset, padding_free, masked)``: TRL's ``SFTTrainer._prepare_dataset`` on ``dataset``
    with the settings its ``__init__`` derives from ``args`` (completion_only_loss default, training chat
    template for assistant_only_loss, padding-free for BFD packing)."""
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    sample = next(iter(dataset))
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    chat_template = None
    if args.assistant_only_loss and not has_generation_tags(tokenizer):
        chat_template = get_training_chat_template(tokenizer)
    trainer = _bare(SFTTrainer, tokenizer, completion_only_loss=completion_only, chat_template=chat_template)
    try:
        prepared = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, args.packing, None, "train")
    except RuntimeError as exc:  # TRL's own assistant mask found no assistant token in a row
        raise MaskError(" ".join(str(exc).split())) from exc
    padding_free = args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"})
    has_mask_column = "completion_mask" in dataset.column_names and completion_only
    masked = bool(args.assistant_only_loss or "assistant_masks" in dataset.column_names or has_mask_column
                  or (completion_only and "prompt" in sample))
    return prepared, padding_free, masked


def sft_view(dataset, tokenizer, args, *, limit: int | None = None) -> Iterator[ViewRow]:
    """Rows of an SFT dataset (as :func:`alignkit.train.sft.build_datasets` builds it) after TRL's preparation
    and TRL's ``DataCollatorForLanguageModeling``, one batch of ``per_device_train_batch_size`` at a time;
    padding-free batches are one row holding several documents. ``limit``: stop after that many rows."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    prepared, padding_free, masked = sft_prepare(dataset, tokenizer, args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=padding_free,
                                               pad_to_multiple_of=args.pad_to_multiple_of)
    keep = [c for c in ("input_ids", "labels", "seq_lengths") if c in prepared.column_names]
    prepared = prepared.select_columns(keep)
    size, count = max(1, args.per_device_train_batch_size), 0
    for b, first in enumerate(range(0, len(prepared), size), start=1):
        batch = collator([prepared[i] for i in range(first, min(first + size, len(prepared)))])
        for r in range(batch["input_ids"].shape[0]):
            if limit is not None and count >= limit:
                return
            count += 1
            yield _sft_row(batch, r, f"batch {b}" if padding_free else f"row {first + r + 1}", masked)


def _sft_row(batch, r: int, label: str, masked: bool) -> ViewRow:
    ids, labels = batch["input_ids"][r], batch["labels"][r]
    if "attention_mask" in batch:
        keep = batch["attention_mask"][r].bool()
        ids, labels = ids[keep], labels[keep]
        starts = [0]
        if "position_ids" in batch:
            positions = batch["position_ids"][r][keep].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] or [0]
    else:  # padding-free: documents start where position_ids restart
        positions = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
    return ViewRow(label, ids.tolist(), (labels != -100).tolist(), starts, masked)


def dpo_view(dataset, tokenizer, args, *, limit: int | None = None) -> Iterator[ViewRow]:
    """Preference rows (a TRL prompt/chosen/rejected dataset) after ``DPOTrainer._prepare_dataset`` and TRL's
    ``DataCollatorForPreference`` (truncation to ``max_length``): a chosen and a rejected row per pair, loss
    on the collator's ``completion_mask``."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    prepared = DPOTrainer._prepare_dataset(_bare(DPOTrainer, tokenizer), dataset, tokenizer, args, "train")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorForPreference(pad_token_id=pad_id, max_length=args.max_length,
                                         truncation_mode=args.truncation_mode,
                                         pad_to_multiple_of=args.pad_to_multiple_of)
    n = len(prepared) if limit is None else min(limit, len(prepared))
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    for i in range(n):
        batch = collator([{c: prepared[i][c] for c in cols}])
        for r, side in enumerate(("chosen", "rejected")):
            keep = batch["attention_mask"][r].bool()
            yield ViewRow(f"row {i + 1} {side}", batch["input_ids"][r][keep].tolist(),
                          batch["completion_mask"][r][keep].bool().tolist())


# ----------------------------------------------------------------------------------------------
# Checks


def mask_problems(rows: Iterable[ViewRow], max_listed: int = 5) -> list[str]:
    """One line per fault: a row whose loss mask is all zero (it trains on nothing), or all one although a
    mask was asked for (it trains on the prompt too). At most ``max_listed`` lines per fault, then a count."""
    empty, full = [], []
    for row in rows:
        if not row.n_loss:
            empty.append(row.label)
        elif row.masked and row.n_loss == len(row.input_ids):
            full.append(row.label)
    out = []
    everything = "every token carries loss although a loss mask was asked for (the row trains on the prompt too)"
    for where, what in ((empty, "no token carries loss (the row trains on nothing)"), (full, everything)):
        if where:
            shown = ", ".join(where[:max_listed]) + (f" and {len(where) - max_listed} more" if
                                                     len(where) > max_listed else "")
            out.append(f"loss mask: {what}: {shown}")
    return out


def cross_document_problem(*, per_document: bool, attn_implementation: str | None, prepacked: bool,
                           probe: Callable[[], bool] | None = None) -> str | None:
    """Why padding-free rows would attend across documents, or None. ``per_document``: the recipe asked for
    per-document attention (``padding_free``, or TRL's BFD packing); ``attn_implementation``: the one the model
    trains with; ``prepacked``: rows are alignkit-packed streams (several documents per row, no position ids);
    ``probe``: for an implementation outside :data:`PER_DOCUMENT_ATTENTION`, a call that answers whether it
    keeps documents apart (e.g. :func:`attends_per_document` on the loaded model)."""
    if not per_document:
        return None
    if prepacked:
        return ("packed rows attend across documents: data.packing: alignkit concatenates documents into each row "
                "without restarting position ids, so train.padding_free keeps them apart only between rows; use "
                "TRL's packing (train.packing: true, packing_strategy: bfd) for per-document attention")
    if attn_implementation in PER_DOCUMENT_ATTENTION:
        return None
    if probe is None:
        return (f"packed rows attend across documents: model.attn_implementation {attn_implementation!r} is not "
                f"known to respect position_ids or cu_seq_lens (known: {', '.join(sorted(PER_DOCUMENT_ATTENTION))})")
    if probe():
        return None
    return (f"packed rows attend across documents: model.attn_implementation {attn_implementation!r} ignores "
            "position_ids and cu_seq_lens (a padding-free row of two documents gave the second one other logits "
            "than it gets alone); use sdpa_varlen, sdpa or flash_attention_2")


def attends_per_document(model, n: int = 6, atol: float = 1e-4) -> bool:
    """Whether ``model`` keeps padding-free documents apart: one row of two random documents with restarting
    ``position_ids`` and ``cu_seq_lens`` (what TRL's padding-free collator passes), without a KV cache as
    ``SFTTrainer.compute_loss`` runs it (transformers looks for packed rows only then), gives the second
    document the logits it gets alone."""
    import torch

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(model.device) for _ in range(2))
    positions = torch.arange(n, device=model.device).repeat(2)[None]  # (1, 2n)
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32, device=model.device)
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, cu_seq_lens_q=cu,
                       cu_seq_lens_k=cu, max_length_q=n, max_length_k=n, use_cache=False).logits[0, n:]  # (n, V)
        alone = model(input_ids=second, use_cache=False).logits[0]  # (n, V)
    return bool(torch.allclose(packed.double(), alone.double(), atol=atol, rtol=1e-3))


# ----------------------------------------------------------------------------------------------
# Rendering


def _segments(row: ViewRow, tokenizer) -> Iterator[tuple[bool, bool, str]]:
    """``(document start, carries loss, text)`` runs of tokens."""
    starts = set(row.starts[1:])
    cut = sorted({0, *starts, len(row.input_ids)})
    for a, b in itertools.pairwise(cut):
        first = True
        for loss, group in itertools.groupby(range(a, b), key=lambda i: row.loss[i]):
            idx = list(group)
            yield first and a in starts, loss, tokenizer.decode([row.input_ids[i] for i in idx])
            first = False


def render_text(row: ViewRow, tokenizer) -> str:
    """The row's decoded text with loss tokens between ``[[`` and ``]]``; ``‖`` where a document starts."""
    return "".join(("‖" if doc else "") + (f"[[{text}]]" if loss else text)
                   for doc, loss, text in _segments(row, tokenizer))


def describe(row: ViewRow) -> str:
    docs = f", {len(row.starts)} documents" if len(row.starts) > 1 else ""
    return f"--- {row.label}: {len(row.input_ids)} tokens, {row.n_loss} with loss{docs} ---"


def render_html(rows: Iterable[ViewRow], tokenizer, title: str = "alignkit data check") -> str:
    """A standalone HTML page: each row's text, loss tokens in ``<mark class="loss">``."""
    body = []
    for row in rows:
        parts = []
        for doc, loss, text in _segments(row, tokenizer):
            if doc:
                parts.append('<span class="doc">‖</span>')
            text = html.escape(text)
            parts.append(f'<mark class="loss">{text}</mark>' if loss else f"<span>{text}</span>")
        body.append(f"<h2>{html.escape(describe(row).strip('- '))}</h2>\n<pre>{''.join(parts)}</pre>")
    style = ("body{font-family:sans-serif} pre{white-space:pre-wrap;background:#f6f6f6;padding:8px} "
             "mark.loss{background:#ffe08a} span.doc{color:#c00;font-weight:bold}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>Highlighted: tokens that "
            f"carry loss.</p>\n" + "\n".join(body) + "\n</body></html>\n")


def args_with(args, **changes):
    """A shallow copy of a TRL config with ``changes`` set (the recipe's own object stays as it was)."""
    out = copy.copy(args)
    for key, value in changes.items():
        setattr(out, key, value)
    return out
