"""Preference pairs (prompt, chosen, rejected) from files in the common formats, and the TRL dataset.

Formats (``format=``; ``"auto"`` detects from the first row's columns and logs what it found):

* ``"prompt_chosen_rejected"``: three strings (the format of TRL's standard preference datasets);
* ``"conversational"``: ``chosen``/``rejected`` are message lists ``[{"role", "content"}]``; the prompt is a
  message list, or implicit: the turns chosen and rejected share are split off as the prompt, with
  TRL's own ``trl.data_utils.extract_prompt`` (what ``DPOTrainer`` does for implicit prompts);
* ``"hh"``: Anthropic HH-RLHF transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` in ``chosen`` and
  ``rejected`` (Bai et al., 2022, "Training a Helpful and Harmless Assistant with RLHF"). Single-turn rows
  become strings (instruction, chosen response, rejected response), as in the CS336 A5 supplement §5.2;
  multi-turn rows are dropped (``multi_turn="drop"``, the supplement's rule) or, with ``multi_turn="keep"``,
  every row becomes conversational with the earlier turns as the prompt;
* anything else: ``columns={"prompt": "question", "chosen": "good", "rejected": "bad"}`` maps the file's
  columns onto these names first, and the format is then detected or given as usual.

A missing field, a wrong type or empty text raises :class:`alignkit.data.io.DataError` naming file, line
and field; with ``errors="collect"`` such rows are collected in the result's ``.malformed`` instead (and
``allow_empty=True`` keeps empty texts so that :func:`alignkit.data.check.check_preference` counts them).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

from alignkit.data.io import (
    DataError,
    LoadedRows,
    RowProblem,
    apply_columns,
    check_not_empty,
    each_field,
    get_messages,
    get_text,
    is_messages,
    location,
    parsed_rows,
)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "prompt_chosen_rejected", "conversational", "hh")
FIELDS = ("prompt", "chosen", "rejected")
MULTI_TURN_REASON = "multi-turn (hh)"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class TrainingRow:
    """What a preference pair and an unpaired example share: a ``prompt``, reply fields (:attr:`REPLIES`),
    other fields (:attr:`EXTRA`) and where the row came from (``source``, ``line``)."""

    REPLIES: ClassVar[tuple[str, ...]] = ()
    EXTRA: ClassVar[tuple[str, ...]] = ()

    @property
    def conversational(self) -> bool:
        return isinstance(getattr(self, self.REPLIES[0]), list)

    def to_dict(self, metadata: bool = True) -> dict:
        """The row as TRL takes it (a string prompt becomes a user message when the replies are messages)."""
        prompt = self.prompt
        if self.conversational and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        out = {"prompt": prompt, **{name: getattr(self, name) for name in self.REPLIES + self.EXTRA}}
        if metadata:
            out.update(source=self.source, line=self.line)
        return out


@dataclass
class PreferencePair(TrainingRow):
    """One comparison: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``.

    Texts are strings, or message lists ``[{"role", "content"}]`` for conversational pairs (then
    ``chosen``/``rejected`` hold the reply turns only and ``prompt`` the turns before them).
    """

    REPLIES: ClassVar[tuple[str, ...]] = ("chosen", "rejected")

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    source: str = "<memory>"
    line: int = 0


def detect_format(data: dict) -> str:
    """Preference format of one row from its columns and value types (raises RowProblem if unknown)."""
    missing = [k for k in ("chosen", "rejected") if k not in data]
    if missing:
        raise RowProblem(missing[0], (
            f"missing; cannot detect the format from columns {', '.join(map(str, data))}. Formats: "
            "prompt/chosen/rejected strings, conversational chosen/rejected message lists, HH transcripts; "
            "for other names pass columns={'prompt': ..., 'chosen': ..., 'rejected': ...}"))
    chosen = data["chosen"]
    if is_messages(chosen):
        return "conversational"
    bad = [RowProblem(k, f"expected a string or a list of messages, got {type(data[k]).__name__}")
           for k in ("chosen", "rejected") if not isinstance(data[k], str) and not is_messages(data[k])]
    if bad:
        raise RowProblem.merge(bad)
    if "prompt" in data:
        return "prompt_chosen_rejected"
    if _HH_TURN.search(chosen):
        return "hh"
    raise RowProblem("prompt", "missing: chosen/rejected are plain text (not HH transcripts), so a prompt "
                               "column is needed; map one with columns={'prompt': ...}")


def _parse_standard(data: dict, multi_turn: str):
    return tuple(each_field(FIELDS, lambda name: get_text(data, name)))


def _parse_conversational(data: dict, multi_turn: str):
    """Explicit message-list prompt, a string prompt before assistant replies, or the implicit shared prefix."""
    from trl.data_utils import extract_prompt

    chosen, rejected = each_field(("chosen", "rejected"), lambda name: get_messages(data, name))
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        prompt = get_messages(data, "prompt")
    elif isinstance(prompt, str) and chosen[0]["role"] == "assistant":
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is None or isinstance(prompt, str):  # implicit prompt (a string prompt beside full chats is ignored)
        parts = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = parts["prompt"], parts["chosen"], parts["rejected"]
        if not prompt:
            raise RowProblem("prompt", "no prompt column, and chosen and rejected share no leading turns")
    else:
        raise RowProblem("prompt", f"expected a list of messages or a string, got {type(prompt).__name__}")
    _check_roles(prompt, chosen, rejected)
    return prompt, chosen, rejected


def _check_roles(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> None:
    if prompt[-1]["role"] not in ("user", "tool", "assistant"):
        raise RowProblem("prompt[-1].role", f"the prompt must end with a user, tool or assistant turn, "
                                            f"got {prompt[-1]['role']!r}")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply and reply[0]["role"] != "assistant":
            raise RowProblem(f"{name}[0].role", f"the reply must start with an assistant turn, got "
                                                f"{reply[0]['role']!r}")


def parse_hh_transcript(text: str, field: str = "chosen") -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", "content": "a"}, {"role": "assistant", ...}]``."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowProblem(field, f"text before the first 'Human:' turn: {parts[0][:40]!r}")
    turns = [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if not turns:
        raise RowProblem(field, "not an HH transcript (no '\\n\\nHuman:' / '\\n\\nAssistant:' turns)")
    if turns[0]["role"] != "user":
        raise RowProblem(field, "the transcript must start with a 'Human:' turn")
    if turns[-1]["role"] != "assistant":
        raise RowProblem(field, "the transcript must end with an 'Assistant:' turn")
    return turns


def _parse_hh(data: dict, multi_turn: str):
    """Split HH transcripts into the shared prompt turns and the final assistant replies."""
    chosen, rejected = each_field(("chosen", "rejected"), lambda name: parse_hh_transcript(get_text(data, name), name))
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        turn = next((i for i, (a, b) in enumerate(zip(prompt, rejected[:-1])) if a != b),
                    min(len(prompt), len(rejected) - 1))
        what = "its human message differs from the chosen transcript's: " if turn == 0 else ""
        raise RowProblem("rejected", f"{what}chosen and rejected transcripts differ before the last reply "
                                     f"(turn {turn})")
    n_human = sum(t["role"] == "user" for t in prompt)
    if multi_turn == "keep":
        return prompt, chosen[-1:], rejected[-1:]
    if n_human > 1:
        return None  # dropped: multi-turn
    return prompt[0]["content"], chosen[-1]["content"], rejected[-1]["content"]


_PARSERS = {"prompt_chosen_rejected": _parse_standard, "conversational": _parse_conversational, "hh": _parse_hh}


def _parse_row(data: dict, fmt: str, columns, multi_turn: str, allow_empty: bool):
    """(format, parsed texts or None); raises RowProblem."""
    data = apply_columns(data, columns, FIELDS)
    if fmt == "auto":
        fmt = detect_format(data)
    parsed = _PARSERS[fmt](data, multi_turn)
    if parsed is not None and not allow_empty:
        check_not_empty(dict(zip(FIELDS, parsed)))
    return fmt, parsed


def load_preference_rows(path, *, split: str = "train", format: str = "auto", columns: dict | None = None,
                         errors: str = "raise", allow_empty: bool = False, multi_turn: str = "drop",
                         limit: int | None = None) -> LoadedRows:
    """Read preference pairs from ``path`` (see :func:`alignkit.data.io.read_rows` for paths); with ``limit``,
    reading stops after the first ``limit`` records (bad ones included).

    Returns a list of :class:`PreferencePair` (a :class:`~alignkit.data.io.LoadedRows` carrying
    ``format``, ``rows_read``, ``malformed`` and ``skipped``).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if multi_turn not in ("drop", "keep"):
        raise ValueError(f"multi_turn must be 'drop' or 'keep', got {multi_turn!r}")
    out, fmt = LoadedRows(format=format), format
    # the format is detected once, from the first usable row (the parser reads ``fmt`` at each call)
    rows = parsed_rows(path, lambda data: _parse_row(data, fmt, columns, multi_turn, allow_empty), out,
                       split=split, errors=errors, limit=limit)
    for row, (row_fmt, parsed) in rows:
        if fmt == "auto":
            fmt = out.format = row_fmt
            logger.info("%s: detected preference format %r from columns %s", row.source, fmt, list(row.data))
        if parsed is None:
            out.skipped.setdefault(MULTI_TURN_REASON, []).append((row.source, row.line))
            continue
        out.append(PreferencePair(*parsed, source=row.source, line=row.line))
        out.locations.append((row.source, row.line))
    logger.info("%s: %d pairs from %d rows (%d malformed, %d skipped)", path, len(out), out.rows_read,
                len(out.malformed), sum(map(len, out.skipped.values())))
    return out


def to_trl_dataset(pairs, *, metadata: bool = True):
    """A ``datasets.Dataset`` with prompt/chosen/rejected columns as TRL's DPOTrainer and RewardTrainer take.

    All pairs must be of one kind (all strings, or all message lists). ``source``/``line`` columns are kept
    when ``metadata`` (TRL's trainers ignore extra columns: their tokenizing ``map`` keeps them and
    ``remove_unused_columns`` or the collator, which reads only the token columns, leaves them out).
    """
    return rows_dataset(pairs, metadata=metadata, what="pair", plural="preference pairs")


def rows_dataset(rows, *, metadata: bool, what: str, plural: str):
    """A ``datasets.Dataset`` of :class:`TrainingRow` objects (their ``to_dict`` columns); all of one kind
    (plain text or messages), else a DataError naming the first row of the other kind."""
    import datasets

    rows = list(rows)
    if not rows:
        raise ValueError(f"no {plural} to build a dataset from")
    first = rows[0]
    for row in rows:
        if row.conversational != first.conversational:
            kinds = {True: "conversational", False: "plain-text"}
            raise DataError(
                f"{location(row.source, row.line)}: {what} is {kinds[row.conversational]} but "
                f"{location(first.source, first.line)} is {kinds[first.conversational]}; a dataset holds one kind",
                source=row.source, line=row.line)
    dicts = [row.to_dict(metadata) for row in rows]
    return datasets.Dataset.from_dict({key: [d[key] for d in dicts] for key in dicts[0]})
