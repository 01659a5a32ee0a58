"""Anthropic HH-RLHF loader (Bai et al. 2022; CS336 A5 supplement section 5.2).

Each row is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: two transcripts sharing the
conversation before the final assistant reply. Only single-turn conversations (one human message) are kept,
as ``{"instruction", "chosen", "rejected", "source", "line"}`` with the assistant replies stripped. The
transcripts are parsed by :func:`alignkit.data.preference.load_preference_rows` (``format="hh"``), the
package's one HH parser; this module adds the four-file folder layout and the CS336 row shape.
"""
from __future__ import annotations

import logging
from pathlib import Path

from alignkit.data.io import DataError, LoadedRows, location
from alignkit.data.preference import MULTI_TURN_REASON, load_preference_rows

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
        # 1. the preference loader parses the transcripts (one HH parser for the package)
        source = file.name if root.is_file() or file.parent == root else f"{file.parent.name}/{file.name}"
        pairs = load_preference_rows(file, format="hh", multi_turn="drop", allow_empty=True)
        out.rows_read += pairs.rows_read
        for where in pairs.skipped.get(MULTI_TURN_REASON, []):
            out.skipped.setdefault(MULTI_TURN, []).append(where)
        # 2. single-turn pairs with both replies become CS336 rows; empty replies are counted
        for pair in pairs:
            if not pair.prompt:
                raise DataError(f"{location(pair.source, pair.line)}: field 'chosen': empty human message",
                                source=pair.source, line=pair.line, field="chosen")
            if not pair.chosen or not pair.rejected:
                out.skipped.setdefault(EMPTY_REPLY, []).append((pair.source, pair.line))
                continue
            out.append({"instruction": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                        "source": source, "line": pair.line})
            out.locations.append((pair.source, pair.line))
    dropped = ", ".join(f"{len(v)} {k}" for k, v in out.skipped.items()) or "none"
    logger.info("load_hh: %d files, %d rows read, %d single-turn pairs kept (dropped: %s)",
                len(files), out.rows_read, len(out), dropped)
    return out
