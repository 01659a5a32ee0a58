"""Reading rows of training data from files, folders or the hub, with file and line for every row.

``read_rows(path, split=...)`` yields :class:`Row` objects whatever the storage format:

* ``.jsonl`` / ``.jsonl.gz``, ``.json`` (one array of objects, or JSON lines): ``line`` is the 1-based
  file line (for an array: the line where the object starts);
* ``.parquet``, hub datasets: ``line`` is the 0-based row index;
* ``.csv`` / ``.tsv`` (optionally ``.gz``): ``line`` is the 1-based file line where the record starts
  (the header is line 1, so the first data row is line 2; quoted fields may span lines);
* a folder of those: files sorted by name; when files are named after splits (``train.jsonl``,
  ``test-00000-of-00001.parquet``, or a ``train/`` sub-folder) only those of ``split`` are read;
* anything else that is not an existing path is taken as a hub dataset name and loaded with
  ``datasets.load_dataset(name, split=split)`` (imported lazily).

Malformed records raise :class:`DataError` naming the file, the line and the problem; with
``errors="collect"`` they are yielded instead as rows whose ``error`` is set and ``data`` is empty,
so a data check can list every bad row in one pass.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
SUFFIXES = TEXT_SUFFIXES + (".parquet",)
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
# Sources whose ``line`` is a 1-based line of a text file; for the rest it is a 0-based row index.
_LINE_SOURCES = tuple(s + gz for s in TEXT_SUFFIXES for gz in ("", ".gz"))


# ------------------------------------------------------------------------------------------------
# The package's one atomic writer: every finished file is written to a temporary sibling, flushed
# and fsynced, then renamed over the target (``os.replace``), so a kill never leaves a torn file.
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` atomically.

    The caller writes the temporary file by any means (``np.save``, ``save_pretrained`` of one file,
    ``open``); on an exception the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON (non-JSON values through ``str``), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` (a matplotlib figure) to ``path`` atomically; the format follows ``path``'s suffix."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or None, **savefig_kwargs)
    return Path(path)


class DataError(ValueError):
    """A problem with one row (or one file) of input data; the message names file, line and field."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.source, self.line, self.field = source, line, field


@dataclass(frozen=True)
class Row:
    """One record: where it came from and its fields. ``error`` is set only for collected bad records."""

    source: str
    line: int
    data: dict = field(default_factory=dict)
    error: str | None = None


def location(source: str, line: int) -> str:
    """Human-readable place of a row: ``data.jsonl line 4`` or ``data.parquet row 3``."""
    unit = "line" if source.lower().endswith(_LINE_SOURCES) else "row"
    return f"{source} {unit} {line}"


def _suffix(path: Path) -> str:
    """Data suffix ignoring a trailing .gz: ``a.jsonl.gz`` -> ``.jsonl``."""
    name = path.name.removesuffix(".gz")
    return Path(name).suffix.lower()


def _open_text(path: Path):
    """Text of a file (``.gz`` decompressed); a UTF-8 byte-order mark (Excel, Windows tools) is skipped."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


class _BrokenFile(Exception):
    """The bytes of a file stopped making sense (truncated or corrupt gzip stream) after ``lines`` lines."""

    def __init__(self, lines: int, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.lines = lines


# what a cut or damaged gzip stream raises while it is read (gzip.BadGzipFile is an OSError)
_GZIP_ERRORS = (EOFError, OSError, zlib.error)


def _byte_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of every line; a broken compressed stream raises :class:`_BrokenFile`
    after the lines that decompressed cleanly were yielded."""
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    with opener(path, "rb") as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, raw
        except _GZIP_ERRORS as exc:
            raise _BrokenFile(lineno, exc) from None


def _decode_line(raw: bytes, lineno: int) -> str:
    """UTF-8 text of one line (a byte-order mark allowed on line 1); UnicodeDecodeError otherwise."""
    return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")


def read_rows(path, *, split: str = "train", errors: str = "raise") -> Iterator[Row]:
    """Yield every row of ``path`` (file, folder or hub dataset name) as a :class:`Row`."""
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    p = Path(path).expanduser()
    if p.is_dir():
        for file in _split_files(p, split):
            yield from _read_file(file, errors)
    elif p.is_file():
        yield from _read_file(p, errors)
    elif _looks_like_path(str(path)):
        raise FileNotFoundError(f"data file or folder not found: {path}")
    else:
        yield from _read_hub(str(path), split)


class JsonlRecords(list):
    """The objects of a JSONL file; ``torn_tail`` is True when an unparseable last line was dropped."""

    torn_tail: bool = False


def read_jsonl(path, *, drop_torn_tail: bool = False) -> JsonlRecords:
    """Every object of the JSONL file ``path`` (blank lines skipped), read by :func:`read_rows`.

    With ``drop_torn_tail``, an unparseable LAST line (a write cut short by a kill) is dropped with a
    warning and ``torn_tail`` set: what incremental writers (predictions, metrics) need on resume. Any
    other bad line raises :class:`DataError` naming the file and line."""
    rows = list(read_rows(path, errors="collect"))
    out = JsonlRecords()
    if drop_torn_tail and rows and rows[-1].error and rows[-1].error.startswith("invalid JSON"):
        logger.warning("%s: dropping a torn last line %d (cut while writing)", rows[-1].source, rows[-1].line)
        rows, out.torn_tail = rows[:-1], True
    for row in rows:
        if row.error:
            raise DataError(f"{location(row.source, row.line)}: {row.error}", source=row.source, line=row.line)
        out.append(row.data)
    return out


def _looks_like_path(text: str) -> bool:
    name = text.removesuffix(".gz")
    return (
        name.lower().endswith(SUFFIXES)
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or "\\" in text
    )


def _split_of(file: Path, root: Path) -> str | None:
    """Split a file belongs to, from its sub-folder or its name (``train.jsonl``, ``test-0000.parquet``)."""
    rel = file.relative_to(root)
    if len(rel.parts) > 1 and rel.parts[0].lower() in SPLIT_NAMES:
        return rel.parts[0].lower()
    stem = rel.name.split(".")[0].lower()
    for name in SPLIT_NAMES:
        if stem == name or stem.startswith((f"{name}-", f"{name}_")):
            return name
    return None


def _split_files(folder: Path, split: str) -> list[Path]:
    """Data files of ``folder`` (and split sub-folders), sorted; only ``split``'s when files name splits."""
    files = sorted(
        f for f in folder.rglob("*")
        if f.is_file() and _suffix(f) in SUFFIXES and len(f.relative_to(folder).parts) <= 2
    )
    files = [f for f in files if len(f.relative_to(folder).parts) == 1 or _split_of(f, folder)]
    if not files:
        raise FileNotFoundError(f"{folder}: no data files ({', '.join(SUFFIXES)}, optionally .gz)")
    splits = {f: _split_of(f, folder) for f in files}
    if not any(splits.values()):
        return files
    chosen = [f for f in files if splits[f] == split.lower()]
    if not chosen:
        available = sorted({s for s in splits.values() if s})
        raise FileNotFoundError(f"{folder}: no files for split {split!r}; splits present: {', '.join(available)}")
    return chosen


def _read_file(path: Path, errors: str) -> Iterator[Row]:
    suffix = _suffix(path)
    logger.info("reading %s", path)
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if suffix == ".tsv" else ",", errors)
    elif suffix == ".json" and _starts_with_bracket(path):
        yield from _read_json_array(path, errors)
    elif suffix in (".json", ".jsonl"):
        yield from _read_jsonl(path, errors)
    else:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)} (optionally .gz)",
                        source=str(path))


def _starts_with_bracket(path: Path) -> bool:
    with _open_text(path) as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _bad(errors: str, source: str, line: int, message: str) -> Row:
    """Raise (errors='raise') or return a collected bad row."""
    if errors == "raise":
        raise DataError(f"{location(source, line)}: {message}", source=source, line=line)
    return Row(source, line, {}, error=message)


def _json_error(exc: json.JSONDecodeError, n_read: int) -> str:
    """``invalid JSON (msg at column C, near '...')`` with the text around the break."""
    near = exc.doc[max(0, exc.pos - 15): exc.pos + 15].strip()
    return f"invalid JSON ({exc.msg} at column {exc.colno}, near {near!r}); {n_read} rows were read before it"


def _read_jsonl(path: Path, errors: str) -> Iterator[Row]:
    source, n_read, lineno = str(path), 0, 0
    try:
        for lineno, raw in _byte_lines(path):
            # 1. decode (BOM, CRLF fine); 2. skip blank lines; 3. parse; 4. require an object
            try:
                text = _decode_line(raw, lineno)
            except UnicodeDecodeError as exc:
                yield _bad(errors, source, lineno, f"undecodable bytes: not UTF-8 at byte {exc.start + 1} of the "
                                                   f"line; {n_read} rows were read before it")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield _bad(errors, source, lineno, _json_error(exc, n_read))
                continue
            if not isinstance(obj, dict):
                yield _bad(errors, source, lineno, f"expected a JSON object, got {type(obj).__name__}")
                continue
            n_read += 1
            yield Row(source, lineno, obj)
    except _BrokenFile as exc:
        yield _bad(errors, source, exc.lines + 1, f"truncated or corrupt compressed file ({exc}) after line "
                                                  f"{exc.lines}; the {n_read} rows before it were read")


def _read_json_array(path: Path, errors: str) -> Iterator[Row]:
    """Objects of a JSON array, each with the file line where it starts."""
    source = str(path)
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except (UnicodeDecodeError, *_GZIP_ERRORS) as exc:
        raise DataError(f"{source}: cannot read the JSON array ({type(exc).__name__}: {exc})", source=source) from None
    decoder, pos, line = json.JSONDecoder(), text.index("[") + 1, 1
    line += text.count("\n", 0, pos)
    while True:
        # 1. skip whitespace and separators, counting lines; 2. stop at "]"; 3. decode one value
        start = pos
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        if pos >= len(text):
            raise DataError(f"{source} line {line}: invalid JSON (the array is not closed with ']')",
                            source=source, line=line)
        if text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})",
                            source=source, line=exc.lineno) from None
        if isinstance(obj, dict):
            yield Row(source, line, obj)
        else:
            yield _bad(errors, source, line, f"expected a JSON object, got {type(obj).__name__}")
        line += text.count("\n", pos, end)
        pos = end


def _read_csv(path: Path, delimiter: str, errors: str) -> Iterator[Row]:
    source, n_read = str(path), 0
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for record in reader:
                # 1. the record started on the line after the previous one ended; 2. check its width
                line, start = start, reader.line_num + 1
                if not record:
                    continue
                if len(record) != len(header):
                    yield _bad(errors, source, line,
                               f"expected {len(header)} fields ({', '.join(header)}), got {len(record)}")
                    continue
                n_read += 1
                yield Row(source, line, dict(zip(header, record)))
        except UnicodeDecodeError:
            yield _bad(errors, source, start, f"undecodable bytes (not UTF-8) at or after this line; the {n_read} "
                                              "rows before it were read")
        except _GZIP_ERRORS as exc:
            yield _bad(errors, source, start, f"truncated or corrupt compressed file ({type(exc).__name__}: {exc}); "
                                              f"the {n_read} rows before it were read")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    source, index = str(path), 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield Row(source, index, obj)
            index += 1


def _read_hub(name: str, split: str) -> Iterator[Row]:
    import datasets

    logger.info("loading hub dataset %s (split %s)", name, split)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # any failure: re-raised with the context a user needs
        raise FileNotFoundError(
            f"{name!r} is not an existing file or folder, and loading it as a hub dataset failed: {exc}"
        ) from exc
    source = f"hub:{name}[{split}]"
    for index, obj in enumerate(dataset):
        yield Row(source, index, dict(obj))


# ----------------------------------------------------------------------------------------------
# Row-level validation shared by the preference and SFT loaders.

ROLES = ("system", "user", "assistant", "tool")


class RowProblem(Exception):
    """Raised by a row parser: ``field`` is the offending field (``chosen[1].content``), ``message`` why."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message

    @classmethod
    def merge(cls, problems: list[RowProblem]) -> RowProblem:
        """One problem naming every bad field: ``field`` "chosen, rejected", each field's reason in turn."""
        if len(problems) == 1:
            return problems[0]
        return cls(", ".join(str(p.field) for p in problems), "; ".join(f"{p.field}: {p.message}" for p in problems))


def each_field(names, read) -> list:
    """``[read(name) for name in names]``, with the RowProblem of EVERY bad field raised together."""
    values, problems = [], []
    for name in names:
        try:
            values.append(read(name))
        except RowProblem as problem:
            problems.append(problem)
    if problems:
        raise RowProblem.merge(problems)
    return values


def check_not_empty(fields: dict) -> None:
    """RowProblem naming every empty (whitespace-only) text among ``{name: str or message list}``."""
    empty = [bad for bad in (empty_field(v, k) for k, v in fields.items()) if bad]
    if empty:
        raise RowProblem.merge([RowProblem(name, "empty text") for name in empty])


@dataclass(frozen=True)
class Malformed:
    """A row that could not be used, with the field at fault (None for whole-record problems)."""

    source: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = location(self.source, self.line)
        if not self.field:
            return f"{where}: {self.message}"
        if ", " in self.field:  # several fields (RowProblem.merge): each reason names its field
            return f"{where}: fields {self.field}: {self.message}"
        return f"{where}: field {self.field!r}: {self.message}"

    def to_dict(self) -> dict:
        return {"source": self.source, "line": self.line, "field": self.field, "message": self.message}


class LoadedRows(list):
    """The loaded rows (a plain list) plus what loading found along the way.

    ``format``: the format used (detected or given); ``rows_read``: records seen, bad ones included;
    ``malformed``: :class:`Malformed` rows (``errors="collect"``); ``skipped``: ``{reason: [(source, line)]}``
    for rows left out on purpose (e.g. multi-turn HH transcripts); ``locations``: ``(source, line)`` per row.
    """

    def __init__(self, items=(), *, format: str = "", rows_read: int = 0):
        super().__init__(items)
        self.format = format
        self.rows_read = rows_read
        self.malformed: list[Malformed] = []
        self.skipped: dict[str, list[tuple[str, int]]] = {}
        self.locations: list[tuple[str, int]] = []


def problem_to_error(row: Row, problem: RowProblem) -> DataError:
    """The exception raised for ``problem`` in ``row`` (errors='raise')."""
    text = str(Malformed(row.source, row.line, problem.field, problem.message))
    return DataError(text, source=row.source, line=row.line, field=problem.field)


def parsed_rows(path, parse, out: LoadedRows, *, split: str = "train", errors: str = "raise",
                limit: int | None = None) -> Iterator[tuple[Row, object]]:
    """``(row, parse(row.data))`` for every usable record of ``path``: the loop the row loaders share.

    Counts each record into ``out.rows_read`` and stops after ``limit`` records; a bad record or a
    :class:`RowProblem` from ``parse`` raises (``errors="raise"``) or is collected into ``out.malformed``."""
    for row in read_rows(path, split=split, errors=errors):
        # 1. count (stop at the limit); 2. collect bad records; 3. parse, collecting or raising its problem
        if limit is not None and out.rows_read >= limit:
            break
        out.rows_read += 1
        if row.error:
            out.malformed.append(Malformed(row.source, row.line, None, row.error))
            continue
        try:
            parsed = parse(row.data)
        except RowProblem as problem:
            if errors == "raise":
                raise problem_to_error(row, problem) from None
            out.malformed.append(Malformed(row.source, row.line, problem.field, problem.message))
            continue
        yield row, parsed


def apply_columns(data: dict, columns: dict | None, allowed: tuple[str, ...]) -> dict:
    """Copy of ``data`` with ``columns`` ({canonical: source column}) mapped onto the canonical names."""
    if not columns:
        return data
    unknown = sorted(set(columns) - set(allowed))
    if unknown:
        raise ValueError(f"columns: unknown target(s) {unknown}; map onto {', '.join(allowed)}")
    out = dict(data)
    for canonical, column in columns.items():
        if column not in data:
            raise RowProblem(column, f"missing (mapped to {canonical!r}); columns present: {', '.join(map(str, data))}")
        out[canonical] = data[column]
    return out


def get_text(data: dict, name: str, label: str | None = None) -> str:
    """``data[name]`` as a string, or a RowProblem naming the field."""
    label = label or name
    if name not in data or data[name] is None:
        raise RowProblem(label, "missing" if name not in data else "is null")
    value = data[name]
    if not isinstance(value, str):
        raise RowProblem(label, f"expected a string, got {type(value).__name__}")
    return value


def is_messages(value) -> bool:
    """True for a non-empty list whose first item is a dict with a role (TRL's conversational test)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def get_messages(data: dict, name: str) -> list[dict]:
    """``data[name]`` as a validated message list [{"role", "content"}] (other keys dropped)."""
    if name not in data or data[name] is None:
        raise RowProblem(name, "missing" if name not in data else "is null")
    value = data[name]
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type(value).__name__
        raise RowProblem(name, f"expected a non-empty list of messages, got {what}")
    out = []
    for i, msg in enumerate(value):
        # 1. a dict; 2. a known role; 3. string content
        if not isinstance(msg, dict):
            raise RowProblem(f"{name}[{i}]", f"expected a message dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise RowProblem(f"{name}[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": get_text(msg, "content", f"{name}[{i}].content")})
    return out


def empty_field(value, name: str) -> str | None:
    """Name of the first empty (whitespace-only) text in a string or message list, else None."""
    if isinstance(value, str):
        return name if not value.strip() else None
    if not value:
        return name
    for i, msg in enumerate(value):
        if not msg["content"].strip():
            return f"{name}[{i}].content"
    return None
