"""Unpaired (thumbs-up / thumbs-down) examples ``(prompt, completion, label)`` for KTO, from files in the
common formats, and the TRL dataset.

Formats (``format=``; ``"auto"`` detects from the first usable row's columns and logs what it found):

* ``"unpaired"``: ``prompt``, ``completion`` (strings, or message lists for conversational rows: a
  string prompt before a message-list completion becomes one user turn) and ``label``;
* a preference format (``"prompt_chosen_rejected"``, ``"conversational"``, ``"hh"``, read by
  :func:`alignkit.data.preference.load_preference_rows`): every pair is unpaired on the fly into
  ``(prompt, chosen, True)`` and ``(prompt, rejected, False)``. Order: all the chosen examples of the file,
  then all the rejected ones, as ``trl.data_utils.unpair_preference_dataset`` orders a batch; so the KL
  completions KTOTrainer builds by rotating completions within a batch come from other prompts.
  ``auto`` picks this when the row has ``chosen`` and ``rejected`` (after ``columns``) and no ``label``.

Labels (:func:`parse_label`): ``true``/``false`` (JSON booleans), the integers ``1``/``0``, and the
strings ``"true"``/``"false"``, ``"1"``/``"0"``, ``"up"``/``"down"``, ``"yes"``/``"no"`` (case and
surrounding spaces ignored: CSV cells are strings). Anything else (``2``, ``0.5``, ``"maybe"``, null) is
refused naming file, line and field ``label``.

``columns={"prompt": "question", "completion": "answer", "label": "thumbs"}`` maps other column names
(targets: prompt, completion, label, chosen, rejected). Bad rows raise :class:`alignkit.data.io.DataError`
naming file, line and field; with ``errors="collect"`` they are collected in ``.malformed``
(``allow_empty=True`` keeps empty texts so that :func:`alignkit.data.check.check_unpaired` counts them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from alignkit.data.io import (
    LoadedRows,
    RowProblem,
    apply_columns,
    check_not_empty,
    each_field,
    get_messages,
    get_text,
    is_messages,
    parsed_rows,
    read_rows,
)
from alignkit.data.preference import FORMATS as PREFERENCE_FORMATS
from alignkit.data.preference import TrainingRow, load_preference_rows, rows_dataset

logger = logging.getLogger(__name__)

UNPAIRED = "unpaired"
PAIRED_FORMATS = tuple(f for f in PREFERENCE_FORMATS if f != "auto")
FORMATS = ("auto", UNPAIRED, *PAIRED_FORMATS)
FIELDS = ("prompt", "completion", "label")
COLUMN_TARGETS = ("prompt", "completion", "label", "chosen", "rejected")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "up", "yes"), ("false", "0", "down", "no")


@dataclass
class UnpairedExample(TrainingRow):
    """One rated reply: ``completion`` to ``prompt`` is desirable (``label`` True) or not (False)."""

    REPLIES: ClassVar[tuple[str, ...]] = ("completion",)
    EXTRA: ClassVar[tuple[str, ...]] = ("label",)

    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool
    source: str = "<memory>"
    line: int = 0


def parse_label(value) -> bool:
    """A thumbs-up/down label as a bool (accepted values: module doc); RowProblem("label") otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    shown = "null" if value is None else repr(value)
    raise RowProblem("label", f"expected true/false, 1/0 or one of the strings {'/'.join(TRUE_WORDS)} (desirable) "
                              f"or {'/'.join(FALSE_WORDS)} (undesirable), got {shown}")


def _prompt_and_completion(data: dict):
    """(prompt, completion): two strings, or a message-list completion after a string/message-list prompt."""
    if is_messages(data.get("completion")):
        completion = get_messages(data, "completion")
        prompt = data.get("prompt")
        if isinstance(prompt, list):
            prompt = get_messages(data, "prompt")
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            get_text(data, "prompt")  # raises: missing / null / wrong type
        if completion[0]["role"] != "assistant":
            raise RowProblem("completion[0].role", f"the reply must start with an assistant turn, got "
                                                   f"{completion[0]['role']!r}")
        return prompt, completion
    return tuple(each_field(("prompt", "completion"), lambda name: get_text(data, name)))


def _parse_unpaired(data: dict, columns, allow_empty: bool):
    data = apply_columns(data, columns, COLUMN_TARGETS)
    problems = []
    try:
        prompt, completion = _prompt_and_completion(data)
    except RowProblem as problem:
        problems.append(problem)
    try:
        label = parse_label(data["label"]) if "label" in data else None
        if label is None:
            raise RowProblem("label", "missing")
    except RowProblem as problem:
        problems.append(problem)
    if problems:
        raise RowProblem.merge(problems)
    if not allow_empty:
        check_not_empty({"prompt": prompt, "completion": completion})
    return prompt, completion, label


def detect_format(path, *, split: str = "train", columns: dict | None = None) -> str:
    """``"unpaired"`` when the first usable record has ``label`` or ``completion`` (after ``columns``),
    else ``"auto"`` for the preference loader (``chosen``/``rejected``: unpaired on the fly)."""
    for row in read_rows(path, split=split, errors="collect"):
        if row.error:
            continue
        mapped = {**row.data, **{k: row.data[v] for k, v in (columns or {}).items() if v in row.data}}
        if "chosen" in mapped and "rejected" in mapped and "label" not in mapped:
            logger.info("%s: paired columns %s: each pair becomes a desirable (chosen) and an undesirable "
                        "(rejected) example", row.source, list(row.data))
            return "auto"
        return UNPAIRED
    return UNPAIRED


def load_unpaired_rows(path, *, split: str = "train", format: str = "auto", columns: dict | None = None,
                       errors: str = "raise", allow_empty: bool = False, multi_turn: str = "drop",
                       limit: int | None = None) -> LoadedRows:
    """Read unpaired examples from ``path`` (paths as :func:`alignkit.data.io.read_rows`); ``limit`` stops
    after the first ``limit`` records (bad ones included; a pair is one record).

    Returns a list of :class:`UnpairedExample` (a :class:`~alignkit.data.io.LoadedRows` carrying ``format``
    ("unpaired", or e.g. "prompt_chosen_rejected -> unpaired"), ``rows_read``, ``malformed``, ``skipped``,
    ``locations``); for pairs see :func:`unpair`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "auto":
        format = detect_format(path, split=split, columns=columns)
    if format != UNPAIRED:
        return unpair(load_preference_rows(path, split=split, format=format, columns=columns, errors=errors,
                                           allow_empty=allow_empty, multi_turn=multi_turn, limit=limit))
    out = LoadedRows(format=UNPAIRED)
    for row, (prompt, completion, label) in parsed_rows(
            path, lambda data: _parse_unpaired(data, columns, allow_empty), out, split=split, errors=errors,
            limit=limit):
        out.append(UnpairedExample(prompt, completion, label, source=row.source, line=row.line))
        out.locations.append((row.source, row.line))
    _log_counts(path, out)
    return out


def unpair(pairs) -> LoadedRows:
    """Preference pairs -> unpaired examples: every pair's ``(prompt, chosen, True)``, then every pair's
    ``(prompt, rejected, False)``, each with the pair's file and line. ``format`` becomes e.g.
    ``"hh -> unpaired"``; ``rows_read`` counts two rows per pair and one per malformed or skipped record
    (``malformed`` and ``skipped`` carry over)."""
    records = getattr(pairs, "rows_read", 0) or len(pairs)
    pairs = list(pairs) if not isinstance(pairs, LoadedRows) else pairs
    fmt = getattr(pairs, "format", "") or "pairs"
    # rows read = rows a check sees: two per usable pair, one per malformed or skipped record, so that
    # read = kept + dropped + malformed holds in the report
    out = LoadedRows(format=f"{fmt} -> {UNPAIRED}", rows_read=records + len(pairs))
    out.malformed = list(getattr(pairs, "malformed", []))
    out.skipped = dict(getattr(pairs, "skipped", {}))
    for attr, label in (("chosen", True), ("rejected", False)):
        for p in pairs:
            out.append(UnpairedExample(p.prompt, getattr(p, attr), label, source=p.source, line=p.line))
            out.locations.append((p.source, p.line))
    _log_counts("unpaired pairs" if not pairs else pairs[0].source, out)
    return out


def _log_counts(path, out: LoadedRows) -> None:
    up = sum(e.label for e in out)
    logger.info("%s: %d unpaired examples (%d desirable, %d undesirable) from %d records (%d malformed)", path,
                len(out), up, len(out) - up, out.rows_read, len(out.malformed))


def to_trl_dataset(examples, *, metadata: bool = True):
    """A ``datasets.Dataset`` with prompt/completion/label columns, as TRL's KTOTrainer takes it.

    All examples must be of one kind (all strings, or all message lists)."""
    return rows_dataset(examples, metadata=metadata, what="example", plural="unpaired examples")
