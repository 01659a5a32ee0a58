"""Anthropic HH-RLHF loader (Bai et al. 2022; CS336 A5 supplement section 5.2).

Each row is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: two transcripts sharing the
conversation before the final assistant reply. Only single-turn conversations (one human message) are kept,
as ``{"instruction", "chosen", "rejected", "source", "line"}`` with the assistant replies stripped.
"""
from __future__ import annotations

import logging
from pathlib import Path

from alignkit.data.io import LoadedRows, RowProblem, get_text, problem_to_error, read_rows
from alignkit.data.preference import parse_hh_transcript

logger = logging.getLogger(__name__)

HH_FILES = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
MULTI_TURN = "multi-turn"
EMPTY_REPLY = "empty assistant reply"


def hh_files(path, split: str = "train") -> list[Path]:
    """The HH files of ``path``: the file itself; a folder's ``*.jsonl.gz`` / ``*.jsonl`` (sorted); or, in the
    hub layout (``harmless-base/train.jsonl.gz``), each sub-folder's ``{split}.jsonl.gz``."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"load_hh: no such file or folder {p}")
    files = sorted(f for pattern in ("*.jsonl.gz", "*.jsonl") for f in p.glob(pattern))
    if not files:
        files = sorted(f for pattern in (f"*/{split}.jsonl.gz", f"*/{split}.jsonl") for f in p.glob(pattern))
    if not files:
        raise FileNotFoundError(f"load_hh: {p} has no .jsonl.gz/.jsonl files (nor */{split}.jsonl.gz)")
    return files


def _single_turn(data: dict) -> tuple[str, str, str] | str:
    """``(instruction, chosen, rejected)`` of one row, or the reason it is dropped."""
    chosen = parse_hh_transcript(get_text(data, "chosen"), "chosen")
    rejected = parse_hh_transcript(get_text(data, "rejected"), "rejected")
    if sum(t["role"] == "user" for t in chosen) > 1 or sum(t["role"] == "user" for t in rejected) > 1:
        return MULTI_TURN
    if len(chosen) != 2 or len(rejected) != 2:
        raise RowProblem("chosen" if len(chosen) != 2 else "rejected",
                         "expected one 'Human:' turn followed by one 'Assistant:' turn")
    if chosen[0]["content"] != rejected[0]["content"]:
        raise RowProblem("rejected", "its human message differs from the chosen transcript's")
    if not chosen[0]["content"]:
        raise RowProblem("chosen", "empty human message")
    if not chosen[1]["content"] or not rejected[1]["content"]:
        return EMPTY_REPLY
    return chosen[0]["content"], chosen[1]["content"], rejected[1]["content"]


def load_hh(path, *, split: str = "train") -> LoadedRows:
    """Single-turn HH pairs from one file or a folder of the four ``.jsonl.gz`` files (see :func:`hh_files`).

    Returns a list (:class:`~alignkit.data.io.LoadedRows`) of ``{"instruction", "chosen", "rejected",
    "source" (file name, or ``folder/file`` in the hub layout), "line"}``; ``.rows_read`` counts every
    record, ``.skipped`` maps reasons (multi-turn, empty assistant reply) to ``(source, line)``.
    Malformed rows raise a :class:`~alignkit.data.io.DataError` naming file, line and field.
    """
    files = hh_files(path, split)
    root = Path(path).expanduser()
    out = LoadedRows(format="hh")
    for file in files:
        source = file.name if root.is_file() or file.parent == root else f"{file.parent.name}/{file.name}"
        for row in read_rows(file):
            # 1. parse both transcripts; 2. keep single-turn pairs, count the rest
            out.rows_read += 1
            try:
                parsed = _single_turn(row.data)
            except RowProblem as problem:
                raise problem_to_error(row, problem) from None
            if isinstance(parsed, str):
                out.skipped.setdefault(parsed, []).append((row.source, row.line))
                continue
            instruction, chosen, rejected = parsed
            out.append({"instruction": instruction, "chosen": chosen, "rejected": rejected,
                        "source": source, "line": row.line})
            out.locations.append((row.source, row.line))
    dropped = ", ".join(f"{len(v)} {k}" for k, v in out.skipped.items()) or "none"
    logger.info("load_hh: %d files, %d rows read, %d single-turn pairs kept (dropped: %s)",
                len(files), out.rows_read, len(out), dropped)
    return out
