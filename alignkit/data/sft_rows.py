"""SFT rows from files: ``{"prompt", "completion"}`` or ``{"messages"}``, the two shapes TRL's SFTTrainer takes.

Column names accepted as they are: ``prompt/completion``, ``prompt/response``, ``instruction/output``
(with Alpaca's optional ``input`` appended to the instruction after a blank line), ``instruction/response``,
``question/answer``, and ``messages`` (a chat transcript, list of ``{"role", "content"}``). Anything else:
``columns={"prompt": "q", "completion": "a"}`` or ``columns={"messages": "conversation"}``.
Prompt and completion may both be strings or both message lists (TRL's conversational prompt-completion).

Errors follow :mod:`alignkit.data.preference`: a :class:`~alignkit.data.io.DataError` naming file, line and
field, or with ``errors="collect"`` an entry in the result's ``.malformed``.
"""
from __future__ import annotations

import logging

from alignkit.data.io import (
    LoadedRows,
    RowProblem,
    apply_columns,
    check_not_empty,
    each_field,
    get_messages,
    get_text,
    parsed_rows,
)

logger = logging.getLogger(__name__)

# (prompt column, completion column), tried in this order after a ``messages`` column
ALIASES = (("prompt", "completion"), ("prompt", "response"), ("instruction", "output"),
           ("instruction", "response"), ("question", "answer"))
TARGETS = ("prompt", "completion", "messages")


def _columns_of(data: dict) -> str:
    """Which shape this row has: "messages" or "<prompt col>/<completion col>" (RowProblem if none)."""
    if "messages" in data:
        return "messages"
    for prompt, completion in ALIASES:
        if prompt in data and completion in data:
            return f"{prompt}/{completion}"
    names = ", ".join(f"{p}/{c}" for p, c in ALIASES)
    raise RowProblem("prompt", f"missing: no messages column and none of {names} among columns "
                               f"{', '.join(map(str, data))}; map them with columns={{'prompt': ..., "
                               f"'completion': ...}} or columns={{'messages': ...}}")


def _parse(data: dict, shape: str) -> dict:
    if shape == "messages":
        messages = get_messages(data, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowProblem("messages", "no assistant turn to train on")
        return {"messages": messages}
    prompt_col, completion_col = shape.split("/")
    if isinstance(data.get(prompt_col), list):
        prompt, completion = each_field((prompt_col, completion_col), lambda name: get_messages(data, name))
        return {"prompt": prompt, "completion": completion}
    prompt, completion = each_field((prompt_col, completion_col), lambda name: get_text(data, name))
    if prompt_col == "instruction" and data.get("input"):
        prompt = f"{prompt}\n\n{get_text(data, 'input')}"
    return {"prompt": prompt, "completion": completion}


def _parse_row(data: dict, columns: dict | None, allow_empty: bool) -> tuple[str, dict]:
    data = apply_columns(data, columns, TARGETS)
    shape = _columns_of(data)
    row = _parse(data, shape)
    if not allow_empty:
        check_not_empty(row)
    return shape, row


def load_sft_rows(path, *, split: str = "train", columns: dict | None = None, errors: str = "raise",
                  allow_empty: bool = False, limit: int | None = None) -> LoadedRows:
    """Read SFT rows from ``path`` (see :func:`alignkit.data.io.read_rows`) as plain dicts; with ``limit``,
    reading stops after the first ``limit`` records (bad ones included), so ``rows_read`` is at most ``limit``.

    The result is a list of ``{"prompt", "completion"}`` / ``{"messages"}`` dicts (a
    :class:`~alignkit.data.io.LoadedRows` with ``format``, ``rows_read``, ``malformed``, and
    ``locations``: the ``(source, line)`` of each row, in order).
    """
    out, shapes = LoadedRows(), {}
    rows = parsed_rows(path, lambda data: _parse_row(data, columns, allow_empty), out, split=split, errors=errors,
                       limit=limit)
    for row, (shape, parsed) in rows:
        shapes[shape] = shapes.get(shape, 0) + 1
        out.append(parsed)
        out.locations.append((row.source, row.line))
    out.format = ", ".join(shapes)
    logger.info("%s: %d SFT rows (columns %s) from %d rows, %d malformed", path, len(out), out.format or "-",
                out.rows_read, len(out.malformed))
    return out
