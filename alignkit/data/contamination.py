"""Benchmark contamination and near-duplicates: training rows against the eval sets, and against each other.

``check_contamination(rows, against=[...])`` compares every training row's prompt and response texts with
the eval sets alignkit ships (:func:`builtin_eval_sets`: GSM8K test questions, MMLU test questions,
AlpacaEval instructions, SimpleSafetyTests prompts) and any extra files (:func:`eval_set_from_file`), and
the training rows with one another. It returns a :class:`ContaminationReport` (``to_markdown()``,
``to_dict()``, ``drop_indices()``).

Texts of a row (:func:`row_texts`): each prompt-like field (``prompt``, ``question``, ``instruction``,
``input``) and each response-like field (``completion``, ``response``, ``output``, ``answer``, ``chosen``,
``rejected``) separately; a message list counts as the concatenated contents of its messages (one per
line); a ``messages`` transcript gives two texts, its non-assistant turns and its assistant turns.

Matching rules:

* **exact**: equal after :func:`normalize` (Unicode NFKC, case-folded, every character that is neither a
  letter/digit nor whitespace deleted: punctuation, symbols, ``_``; whitespace runs collapsed to one space,
  ends stripped), so ``"Janet's ducks, lay 16 eggs!"`` and ``"janet’s  DUCKS lay 16 eggs"`` are the same text;
* **near**: word 3-gram shingles of the normalised text (:func:`shingles`; a text shorter than 3 words is
  one shingle of all its words) with Jaccard similarity >= 0.6. Candidates come from datasketch's
  ``MinHashLSH`` (32 bands of 3 rows over 96-permutation ``MinHash`` sketches: a pair at Jaccard 0.6 is a
  candidate with probability 1 - (1 - 0.6**3)**32 > 0.9995); each candidate is then confirmed with the exact
  Jaccard of the two shingle sets, so a reported similarity is exact and LSH can only (rarely) miss a pair,
  never invent one. Why 3-grams at 0.6: changing one word in the middle of a text of ``w`` words removes 3 of
  its ``w - 2`` shingles and adds 3, so Jaccard = (w - 5) / (w + 1): 0.625 for the shortest GSM8K question
  (15 words), 0.86 at the median (43); with 5-grams it would be (w - 9) / (w + 1) = 0.375 for 15 words.
  Distinct GSM8K test questions never reach 0.6 with one another; templated MMLU stems that differ in one
  word (``Which of the following is true about X?``) do, and are reported as near-duplicates.
* eval items shorter than ``min_words`` (4) normalised words (MMLU has one-word "questions" such as
  ``Inflation``) are not compared; the report counts them per eval set.

A row is counted once per eval set: as exact when any of its texts equals an item, otherwise as near when
any text is a near-duplicate of an item (the most similar item is shown). Inside the training set each row
is compared with the rows before it (all its texts joined); a row that nearly repeats an earlier row is
listed with that row. Eval-set indexes are cached per process (:func:`eval_index`).
"""
from __future__ import annotations

import csv
import hashlib
import logging
import re
import time
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from alignkit.data.io import DataError, location, read_rows
from alignkit.resources import data_path

if TYPE_CHECKING:
    from datasketch import MinHash, MinHashLSH

logger = logging.getLogger(__name__)

NGRAM = 3            # words per shingle
THRESHOLD = 0.6      # Jaccard similarity of shingle sets at or above which two texts are near-duplicates
NUM_PERM = 96        # MinHash permutations
LSH_ROWS = 3         # rows per LSH band (32 bands): a pair at Jaccard 0.6 shares a band with probability > 0.9995
MIN_WORDS = 4        # eval items with fewer normalised words are not compared
PROMPT_FIELDS = ("prompt", "question", "instruction", "input")
RESPONSE_FIELDS = ("completion", "response", "output", "answer", "chosen", "rejected")
AGAINST_FIELDS = ("prompt", "question", "instruction")  # the prompt-like field of an --against file
_NOT_WORD = re.compile(r"[^\w\s]|_")


# ----------------------------------------------------------------------------------------------
# Text rules


def normalize(text: str) -> str:
    """The text exact matching compares: Unicode NFKC, case-folded, every character that is neither a letter or
    digit (``str.isalnum``) nor whitespace deleted (punctuation, symbols, ``_``), whitespace runs collapsed to one
    space, ends stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NOT_WORD.sub("", text).split())


def shingles(normalized: str, n: int = NGRAM) -> frozenset[int]:
    """32-bit hashes (CRC-32) of the word ``n``-grams of a normalised text; fewer than
    ``n`` words: one shingle of all of them; no words: the empty set."""
    words = normalized.split()
    if not words:
        return frozenset()
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return frozenset(zlib.crc32(g.encode("utf-8")) for g in grams)


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b| (0.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _identity(value: int) -> int:
    """MinHash hash function for values that are already 32-bit hashes (module level, so sketches can be pickled)."""
    return value


def _minhashes(sets: Sequence[frozenset], num_perm: int) -> list[MinHash]:
    from datasketch import MinHash  # imported here: datasketch pulls in scipy (~0.7 s)

    return MinHash.bulk([sorted(s) for s in sets], num_perm=num_perm, hashfunc=_identity)


def _new_lsh(num_perm: int) -> MinHashLSH:
    """An LSH of ``num_perm // LSH_ROWS`` bands of ``LSH_ROWS`` rows: generous candidates, each one confirmed
    by the exact Jaccard of its shingle sets."""
    from datasketch import MinHashLSH

    return MinHashLSH(num_perm=num_perm, params=(num_perm // LSH_ROWS, LSH_ROWS))


def _content(value) -> str:
    """A string as it is; a message list as its contents, one per line; anything else: empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value
                         if isinstance(m, dict) and isinstance(m.get("content"), str))
    return ""


def row_texts(row) -> list[tuple[str, str]]:
    """``(field, text)`` of a training row: a dict (SFT row or raw record), a :class:`~alignkit.data.io.Row`,
    a :class:`~alignkit.data.preference.PreferencePair` or an unpaired (KTO) example; empty texts left out."""
    data = row.data if hasattr(row, "data") and isinstance(row.data, dict) else row
    if not isinstance(data, dict):  # a row object: its text attributes
        data = {name: getattr(data, name) for name in (*PROMPT_FIELDS, *RESPONSE_FIELDS) if hasattr(data, name)}
    out = []
    for name in (*PROMPT_FIELDS, *RESPONSE_FIELDS):
        if name in data:
            out.append((name, _content(data[name])))
    messages = data.get("messages")
    if isinstance(messages, list):
        turns = [m for m in messages if isinstance(m, dict)]
        out.append(("messages (user)", _content([m for m in turns if m.get("role") != "assistant"])))
        out.append(("messages (assistant)", _content([m for m in turns if m.get("role") == "assistant"])))
    return [(name, text) for name, text in out if text.strip()]


# ----------------------------------------------------------------------------------------------
# Eval sets


@dataclass(frozen=True)
class EvalSet:
    """Texts to look for in training data: ``texts[i]`` is the item found at ``ids[i]`` (file and line)."""

    name: str
    texts: tuple[str, ...]
    ids: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the name and texts: the key of this set's cached index."""
        digest = hashlib.sha256(self.name.encode())
        for text in self.texts:
            digest.update(b"\0" + text.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:24]


def _jsonl_set(name: str, rel: str, field_name: str) -> EvalSet:
    rows = [(r.data[field_name], location(rel, r.line)) for r in read_rows(data_path(rel))]
    return EvalSet(name, tuple(t for t, _ in rows), tuple(i for _, i in rows))


def _mmlu_set(split: str = "test") -> EvalSet:
    """MMLU questions (column 1 of the header-less ``mmlu/<split>/<subject>_<split>.csv`` files)."""
    texts, ids = [], []
    for path in sorted(data_path("mmlu", split).glob(f"*_{split}.csv")):
        rel = f"mmlu/{split}/{path.name}"
        with open(path, encoding="utf-8", newline="") as fh:
            reader, start = csv.reader(fh), 1
            for record in reader:
                if record:
                    texts.append(record[0])
                    ids.append(location(rel, start))
                start = reader.line_num + 1
    return EvalSet(f"mmlu_{split}", tuple(texts), tuple(ids))


def _sst_set() -> EvalSet:
    rel = "simple_safety_tests/simple_safety_tests.csv"
    rows = [(r.data["prompts_final"], location(rel, r.line)) for r in read_rows(data_path(rel))]
    return EvalSet("simple_safety_tests", tuple(t for t, _ in rows), tuple(i for _, i in rows))


@lru_cache(maxsize=1)
def builtin_eval_sets() -> tuple[EvalSet, ...]:
    """The eval sets alignkit ships: GSM8K test questions, MMLU test questions, AlpacaEval instructions,
    SimpleSafetyTests prompts (read once per process)."""
    return (_jsonl_set("gsm8k_test", "gsm8k/test.jsonl", "question"), _mmlu_set("test"),
            _jsonl_set("alpaca_eval", "alpaca_eval/alpaca_eval.jsonl", "instruction"), _sst_set())


def eval_set_from_file(path, field_name: str | None = None, name: str | None = None) -> EvalSet:
    """An eval set from any file :func:`~alignkit.data.io.read_rows` reads: each row's ``field_name``, or its
    first field among prompt, question, instruction (a message list: its contents). A row without it is a
    :class:`~alignkit.data.io.DataError` naming file and line."""
    texts, ids = [], []
    for row in read_rows(path):
        names = (field_name,) if field_name else AGAINST_FIELDS
        found = next((n for n in names if n in row.data), None)
        if found is None:
            raise DataError(f"{location(row.source, row.line)}: eval file has no field {' or '.join(names)}; "
                            f"fields present: {', '.join(map(str, row.data))}", source=row.source, line=row.line,
                            field=names[0])
        texts.append(_content(row.data[found]))
        ids.append(location(row.source, row.line))
    return EvalSet(name or Path(str(path)).name, tuple(texts), tuple(ids))


@dataclass
class EvalIndex:
    """Eval sets ready to query together (one LSH for all): every compared item has a key; ``owner[key]`` is
    ``(set position, item)``, ``exact`` maps a normalised text to the keys holding it (the first item of each
    set), ``shingles[key]`` is the item's shingle set. ``compared``/``too_short``: item counts per set."""

    sets: tuple[EvalSet, ...]
    owner: list[tuple[int, int]]
    exact: dict[str, list[int]]
    shingles: list[frozenset]
    lsh: MinHashLSH
    compared: list[int]
    too_short: list[int]


_INDEXES: dict[tuple, EvalIndex] = {}


def _build_index(sets: tuple[EvalSet, ...], ngram: int, num_perm: int, min_words: int) -> EvalIndex:
    index = EvalIndex(sets, [], {}, [], _new_lsh(num_perm), [0] * len(sets), [0] * len(sets))
    for pos, es in enumerate(sets):
        # 1. skip items too short to compare; 2. give the rest a key; 3. the first of each text per set is exact
        for item, text in enumerate(es.texts):
            norm = normalize(text)
            if len(norm.split()) < min_words:
                index.too_short[pos] += 1
                continue
            key = len(index.owner)
            index.owner.append((pos, item))
            index.shingles.append(shingles(norm, ngram))
            keys = index.exact.setdefault(norm, [])
            if all(index.owner[k][0] != pos for k in keys):
                keys.append(key)
            index.compared[pos] += 1
    with index.lsh.insertion_session() as session:
        for key, mh in enumerate(_minhashes(index.shingles, num_perm)):
            session.insert(key, mh)
    return index


def eval_index(sets: EvalSet | Sequence[EvalSet], *, ngram: int = NGRAM, num_perm: int = NUM_PERM,
               min_words: int = MIN_WORDS) -> EvalIndex:
    """The index of ``sets`` (one or several eval sets), built once per process and kept in memory (no disk
    cache: unpickling the MMLU index measured slower than building it)."""
    sets = (sets,) if isinstance(sets, EvalSet) else tuple(sets)
    key = (tuple(es.fingerprint for es in sets), ngram, num_perm, min_words)
    if key not in _INDEXES:
        start = time.perf_counter()
        _INDEXES[key] = _build_index(sets, ngram, num_perm, min_words)
        logger.info("contamination index of %s (%d items) built in %.2f s", ", ".join(es.name for es in sets),
                    sum(len(es.texts) for es in sets), time.perf_counter() - start)
    return _INDEXES[key]


# ----------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Match:
    """Training row ``row`` (0-based, at ``source``/``line``; its ``field`` text) overlaps eval item ``eval_id``."""

    row: int
    source: str
    line: int
    field: str
    eval_set: str
    eval_id: str
    eval_text: str
    kind: str             # "exact" | "near"
    similarity: float     # Jaccard of the shingle sets (1.0 for exact)

    def to_dict(self) -> dict:
        return {"row": self.row, "source": self.source, "line": self.line, "field": self.field,
                "eval_set": self.eval_set, "eval_id": self.eval_id, "eval_text": self.eval_text,
                "kind": self.kind, "similarity": round(self.similarity, 4)}


@dataclass(frozen=True)
class DuplicatePair:
    """Training row ``second`` nearly repeats the earlier row ``first`` (0-based indices, with locations)."""

    first: int
    second: int
    first_at: tuple[str, int]
    second_at: tuple[str, int]
    similarity: float

    def to_dict(self) -> dict:
        return {"first": self.first, "second": self.second, "first_at": list(self.first_at),
                "second_at": list(self.second_at), "similarity": round(self.similarity, 4)}


@dataclass
class EvalSetSummary:
    """One eval set's size: items compared and items too short to compare."""

    name: str
    items: int
    compared: int
    too_short: int


@dataclass
class ContaminationReport:
    """Overlaps of the training rows with each eval set (one :class:`Match` per row and set) and near-duplicate
    pairs inside the training set; ``drop_indices()`` is what ``data.decontaminate: true`` leaves out."""

    rows_checked: int
    eval_sets: list[EvalSetSummary]
    matches: list[Match] = field(default_factory=list)
    internal: list[DuplicatePair] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    locations: list[tuple[str, int]] = field(default_factory=list, repr=False)  # (source, line) of every row

    def matches_of(self, eval_set: str, kind: str | None = None) -> list[Match]:
        """The matches with ``eval_set`` (of one ``kind`` when given), in row order."""
        return [m for m in self.matches if m.eval_set == eval_set and (kind is None or m.kind == kind)]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{eval set: {"exact": rows, "near": rows}}`` (each overlapping row counted once per set)."""
        return {s.name: {k: len(self.matches_of(s.name, k)) for k in ("exact", "near")} for s in self.eval_sets}

    @property
    def contaminated(self) -> set[int]:
        """Indices of rows overlapping any eval set (exact or near)."""
        return {m.row for m in self.matches}

    @property
    def duplicates(self) -> set[int]:
        """Indices of rows that nearly repeat an earlier row."""
        return {p.second for p in self.internal}

    def drop_indices(self, *, eval_sets: bool = True, internal: bool = True) -> set[int]:
        """Rows to leave out: those overlapping an eval set and/or those repeating an earlier row (the first
        of each near-duplicate group is kept)."""
        return (self.contaminated if eval_sets else set()) | (self.duplicates if internal else set())

    def drop_locations(self, *, eval_sets: bool = True, internal: bool = True) -> set[tuple[str, int]]:
        """``(source, line)`` of the rows :meth:`drop_indices` names (to filter rows that lost their index)."""
        return {self.locations[i] for i in self.drop_indices(eval_sets=eval_sets, internal=internal)}

    def filter(self, rows: Sequence, *, eval_sets: bool = True, internal: bool = True) -> list:
        """``rows`` (the same rows, in the same order, as were checked) without those :meth:`drop_indices` names."""
        if len(rows) != self.rows_checked:
            raise ValueError(f"filter: {len(rows)} rows given, {self.rows_checked} were checked")
        drop = self.drop_indices(eval_sets=eval_sets, internal=internal)
        return [row for i, row in enumerate(rows) if i not in drop]

    def lines(self, max_listed: int = 3) -> list[str]:
        """One line per eval set (and one for the training set itself) with counts and first locations."""
        out = []
        for s, (name, c) in zip(self.eval_sets, self.counts().items()):
            found = self.matches_of(name)
            where = "; ".join(f"{location(m.source, m.line)} {m.kind} {m.eval_id}" for m in found[:max_listed])
            more = f" (and {len(found) - max_listed} more)" if len(found) > max_listed else ""
            out.append(f"{name} ({s.compared} items): {c['exact']} exact, {c['near']} near"
                       + (f": {where}{more}" if found else ""))
        where = "; ".join(f"{location(*p.second_at)} ~ {location(*p.first_at)}" for p in self.internal[:max_listed])
        more = f" (and {len(self.internal) - max_listed} more)" if len(self.internal) > max_listed else ""
        out.append(f"training set: {len(self.internal)} rows nearly repeat an earlier row"
                   + (f": {where}{more}" if self.internal else ""))
        return out

    def to_markdown(self, max_listed: int = 5) -> str:
        """Counts per eval set, then the first ``max_listed`` matches of each and of the internal pairs."""
        rule = (f"exact: normalised text; near: word {self.settings.get('ngram')}-gram Jaccard >= "
                f"{self.settings.get('threshold')} (MinHash LSH, {self.settings.get('num_perm')} permutations)")
        lines = [f"## Contamination ({self.rows_checked} training rows)", "", rule, "",
                 "| eval set | items | exact | near |", "|---|---:|---:|---:|"]
        counts = self.counts()
        lines += [f"| {s.name} | {s.compared} | {counts[s.name]['exact']} | {counts[s.name]['near']} |"
                  for s in self.eval_sets]
        lines += [f"| training set (near-repeats) | {self.rows_checked} | - | {len(self.internal)} |", ""]
        for s in self.eval_sets:
            found = self.matches_of(s.name)
            if found:
                lines += [f"### {s.name}", "", "| training row | field | kind | J | eval item | text |",
                          "|---|---|---|---:|---|---|"]
                lines += [f"| {location(m.source, m.line)} | {m.field} | {m.kind} | {m.similarity:.2f} | {m.eval_id} "
                          f"| {_snippet(m.eval_text)} |" for m in found[:max_listed]]
                lines += [f"\n(and {len(found) - max_listed} more)"] if len(found) > max_listed else []
                lines.append("")
        if self.internal:
            lines += ["### Near-duplicates inside the training set", "", "| row | repeats | J |", "|---|---|---:|"]
            lines += [f"| {location(*p.second_at)} | {location(*p.first_at)} | {p.similarity:.2f} |"
                      for p in self.internal[:max_listed]]
            lines += [f"\n(and {len(self.internal) - max_listed} more)"] if len(self.internal) > max_listed else []
        too_short = [f"{s.name} {s.too_short}" for s in self.eval_sets if s.too_short]
        if too_short:
            lines += ["", f"Not compared (under {self.settings.get('min_words')} words): {', '.join(too_short)}."]
        return "\n".join(lines).rstrip() + "\n"

    def to_dict(self) -> dict:
        return {"rows_checked": self.rows_checked, "settings": self.settings, "seconds": round(self.seconds, 3),
                "counts": self.counts(),
                "eval_sets": [vars(s).copy() for s in self.eval_sets],
                "matches": [m.to_dict() for m in self.matches],
                "internal_duplicates": [p.to_dict() for p in self.internal],
                "drop": sorted(self.drop_indices())}


def _snippet(text: str, width: int = 80) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------
# The check


@dataclass
class _Prepared:
    """A training text, normalised and shingled once for every eval set."""

    row: int
    field: str
    norm: str
    sets: frozenset
    minhash: MinHash | None = None


def _locations(rows: list, locations) -> list[tuple[str, int]]:
    if locations is not None:
        if len(locations) != len(rows):
            raise ValueError(f"locations: {len(locations)} given for {len(rows)} rows")
        return [tuple(loc) for loc in locations]
    return [(getattr(r, "source", "<memory>"), getattr(r, "line", i)) for i, r in enumerate(rows)]


def _prepare(texts: list[list[tuple[str, str]]], ngram: int, num_perm: int) -> list[_Prepared]:
    prepared = [_Prepared(i, name, norm, shingles(norm, ngram))
                for i, row in enumerate(texts) for name, text in row if (norm := normalize(text))]
    for p, mh in zip(prepared, _minhashes([p.sets for p in prepared], num_perm)):
        p.minhash = mh
    return prepared


def _better(new: tuple, old: tuple | None) -> bool:
    """``(kind, similarity, ...)`` ranking: exact over near, then the higher similarity; ties keep ``old``."""
    if old is None:
        return True
    if new[0] != old[0]:
        return new[0] == "exact"
    return new[1] > old[1]


def _text_matches(index: EvalIndex, p: _Prepared, threshold: float) -> dict[int, tuple]:
    """``{set position: (kind, similarity, item)}``: the best item of each set for one training text."""
    found: dict[int, tuple] = {}
    for key in index.exact.get(p.norm, ()):
        pos, item = index.owner[key]
        found[pos] = ("exact", 1.0, item)
    for key in sorted(index.lsh.query(p.minhash)):
        pos, item = index.owner[key]
        similarity = jaccard(p.sets, index.shingles[key])
        if similarity >= threshold and _better(("near", similarity, item), found.get(pos)):
            found[pos] = ("near", similarity, item)
    return found


def _match(index: EvalIndex, prepared: list[_Prepared], locs, threshold: float) -> list[Match]:
    """The best match of each row with each set of ``index`` (exact when any text is exact, else the most
    similar item; ties: the earlier field, then the earlier item), ordered by set then row."""
    best: dict[tuple[int, int], tuple] = {}
    for p in prepared:
        for pos, (kind, similarity, item) in _text_matches(index, p, threshold).items():
            if _better((kind, similarity), best.get((pos, p.row))):
                best[(pos, p.row)] = (kind, similarity, item, p.field)
    out = []
    for (pos, row), (kind, similarity, item, fieldname) in sorted(best.items()):
        es = index.sets[pos]
        out.append(Match(row, *locs[row], fieldname, es.name, es.ids[item], es.texts[item], kind, similarity))
    return out


def _internal(texts: list[list[tuple[str, str]]], locs, ngram: int, threshold: float,
              num_perm: int) -> list[DuplicatePair]:
    """Each row against the rows before it (all its texts joined): its most similar earlier row at or above
    ``threshold``, first of equals."""
    norms = [normalize("\n".join(t for _, t in row)) for row in texts]
    sets = [shingles(n, ngram) for n in norms]
    lsh, pairs, exact = _new_lsh(num_perm), [], {}
    for j, mh in enumerate(_minhashes(sets, num_perm)):
        if not norms[j]:
            continue
        if norms[j] in exact:
            first, similarity = exact[norms[j]], 1.0
        else:
            scored = [(jaccard(sets[j], sets[i]), -i) for i in lsh.query(mh)]
            similarity, neg_first = max(scored, default=(0.0, 0))
            first = -neg_first
            exact[norms[j]] = j
        if similarity >= threshold:
            pairs.append(DuplicatePair(first, j, locs[first], locs[j], similarity))
        lsh.insert(j, mh)
    return pairs


def check_contamination(rows: Iterable, *, locations: Sequence[tuple[str, int]] | None = None,
                        eval_sets: Sequence[EvalSet] | None = None, against: Sequence = (),
                        against_field: str | None = None, internal: bool = True, ngram: int = NGRAM,
                        threshold: float = THRESHOLD, num_perm: int = NUM_PERM,
                        min_words: int = MIN_WORDS) -> ContaminationReport:
    """Compare training ``rows`` (see :func:`row_texts`) with ``eval_sets`` (default :func:`builtin_eval_sets`)
    plus the files ``against`` (read by :func:`eval_set_from_file` with ``against_field``), and with each other
    (``internal``). ``locations``: ``(source, line)`` per row (e.g. ``LoadedRows.locations``; default: the rows'
    own ``source``/``line`` attributes, else ``("<memory>", index)``)."""
    start = time.perf_counter()
    rows = list(rows)
    locs = _locations(rows, locations)
    base = tuple(builtin_eval_sets() if eval_sets is None else eval_sets)   # one cached index for these,
    extra = tuple(eval_set_from_file(path, against_field) for path in against)  # one for the --against files
    texts = [row_texts(r) for r in rows]
    prepared = _prepare(texts, ngram, num_perm)
    settings = {"ngram": ngram, "threshold": threshold, "num_perm": num_perm, "min_words": min_words}
    report = ContaminationReport(len(rows), [], settings=settings, locations=locs)
    for group in (base, extra):
        if not group:
            continue
        index = eval_index(group, ngram=ngram, num_perm=num_perm, min_words=min_words)
        report.eval_sets += [EvalSetSummary(es.name, len(es.texts), index.compared[pos], index.too_short[pos])
                             for pos, es in enumerate(group)]
        report.matches += _match(index, prepared, locs, threshold)
    if internal:
        report.internal = _internal(texts, locs, ngram, threshold, num_perm)
    report.seconds = time.perf_counter() - start
    logger.info("contamination check of %d rows against %d eval sets: %.2f s", len(rows), len(report.eval_sets),
                report.seconds)
    return report
