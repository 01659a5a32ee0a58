"""The data check: what a training run would see, before it runs.

``check_preference(pairs, ...)`` / ``check_sft(rows, ...)`` count rows read, kept and dropped (and why),
list malformed rows (loaded with ``errors="collect"``) by file, line and field, and measure lengths
after templating, the way TRL's trainers tokenize:

* conversational rows: the tokenizer's chat template (prompt with the generation prompt, then
  prompt + reply); the reply's length is what follows the common prefix (``trl.data_utils.common_prefix_length``);
* plain text: ``template`` (a string with ``{instruction}``/``{prompt}``/``{question}`` and optionally
  ``{response}``, or a bundled prompt name such as ``"alpaca_sft"``) or plain concatenation, plus EOS
  as TRL adds it; ``template="chat"``: plain text as a user/assistant exchange through the chat template
  (what ``data.template: chat`` trains on);
* no tokenizer: lengths in characters (and no max-length check).

Drop reasons, first match wins: ``empty text``, ``chosen == rejected`` (preference), ``duplicate`` (exact
repeat of an earlier row), ``over max length`` (prompt + reply longer than ``max_length`` tokens, the rule of
TRL's RewardTrainer; with ``drop_over_length=False`` such rows are kept and counted as would-be truncated,
as DPOTrainer's collator truncates them). Length statistics cover rows that passed the content checks.

``run_check(opts, tokenizer=...)`` is what ``alignkit data check`` (:mod:`alignkit.cli.data`) runs.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.data.contamination import ContaminationReport, check_contamination
from alignkit.data.io import (
    DataError,
    Malformed,
    empty_field,
    location,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)
from alignkit.data.preference import load_preference_rows
from alignkit.data.sft_rows import load_sft_rows
from alignkit.data.unpaired import load_unpaired_rows
from alignkit.resources import prompt as bundled_prompt

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "drop")  # what a malformed row does: stop the run, or leave the row out
CONTAMINATED = "contaminated (overlaps an eval set)"  # with data.decontaminate
EMPTY, IDENTICAL, DUPLICATE, TOO_LONG = "empty text", "chosen == rejected", "duplicate", "over max length"
CONFLICT = "labelled both ways"  # unpaired: the same prompt + completion is desirable in one row, not in another
_PROMPT_SLOT = re.compile(r"\{(instruction|prompt|question)\}")
_REPLY_SLOTS = ("{response}", "{completion}")


@dataclass
class DataReport:
    """Outcome of a data check. ``kept`` holds the clean rows, in input order."""

    kind: str                                   # "preference" | "sft" | "unpaired"
    rows_read: int = 0
    kept: list = field(default_factory=list)
    dropped: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    malformed: list[Malformed] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    unit: str = "tokens"                        # "tokens" | "chars"
    max_length: int | None = None
    over_max_length: int = 0
    drop_over_length: bool = True
    format: str = ""
    source: str = ""
    contamination: ContaminationReport | None = None  # overlap with eval sets (alignkit.data.contamination)

    @property
    def rows_kept(self) -> int:
        return len(self.kept)

    @property
    def rows_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def drop(self, reason: str, source: str, line: int) -> None:
        self.dropped.setdefault(reason, []).append((source, line))

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """{series: {n, min, mean, p50, p95, max}} (percentiles: numpy's linear interpolation)."""
        import numpy as np

        out = {}
        for name, values in self.lengths.items():
            if values:
                arr = np.asarray(values, dtype=np.float64)
                out[name] = {"n": int(arr.size), "min": int(arr.min()), "mean": float(arr.mean()),
                             "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                             "max": int(arr.max())}
        return out

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "format": self.format, "source": self.source,
            "rows_read": self.rows_read, "rows_kept": self.rows_kept, "rows_dropped": self.rows_dropped,
            "dropped": {r: [{"source": s, "line": n} for s, n in v] for r, v in self.dropped.items()},
            "malformed": [m.to_dict() for m in self.malformed],
            "lengths": self.stats, "unit": self.unit, "max_length": self.max_length,
            "over_max_length": self.over_max_length, "drop_over_length": self.drop_over_length,
            "contamination": self.contamination.to_dict() if self.contamination is not None else None,
        }

    def to_markdown(self, max_listed: int = 20) -> str:
        """Readable report: counts, dropped and malformed rows (first ``max_listed`` each), length table."""
        title = f"## Data check: {self.kind}" + (f" ({self.source})" if self.source else "")
        lines = [title, ""]
        if self.format:
            lines += [f"Format: `{self.format}`", ""]
        lines += ["| rows | count |", "|---|---:|", f"| read | {self.rows_read} |", f"| kept | {self.rows_kept} |"]
        lines += [f"| dropped: {reason} | {len(where)} |" for reason, where in self.dropped.items()]
        lines += [f"| malformed | {len(self.malformed)} |", ""]
        lines += self._markdown_details(max_listed)
        if self.contamination is not None:
            lines += ["", self.contamination.to_markdown()]
        return "\n".join(lines).rstrip() + "\n"

    def _markdown_details(self, max_listed: int) -> list[str]:
        lines = []
        for reason, where in self.dropped.items():
            by_source: dict[str, list[int]] = {}
            for source, line in where[:max_listed]:
                by_source.setdefault(source, []).append(line)
            shown = "; ".join(f"{location(src, nums[0]).rsplit(' ', 1)[0]}s {', '.join(map(str, nums))}"
                              if len(nums) > 1 else location(src, nums[0]) for src, nums in by_source.items())
            more = f" (and {len(where) - max_listed} more)" if len(where) > max_listed else ""
            lines += [f"- dropped, {reason}: {shown}{more}"]
        if self.dropped:
            lines.append("")
        if self.malformed:
            lines += ["### Malformed rows", "", "| file | line/row | field | problem |", "|---|---:|---|---|"]
            lines += [f"| {m.source} | {m.line} | {m.field or '-'} | {m.message.replace('|', '/')} |"
                      for m in self.malformed[:max_listed]]
            if len(self.malformed) > max_listed:
                lines.append(f"\n(and {len(self.malformed) - max_listed} more)")
            lines.append("")
        stats = self.stats
        if stats:
            lines += [f"### Lengths ({self.unit})", "", "| | n | min | mean | p50 | p95 | max |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {k} | {s['n']} | {s['min']} | {s['mean']:.1f} | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']} |"
                      for k, s in stats.items()]
            lines.append("")
        if self.max_length is not None:
            action = "dropped" if self.drop_over_length else "kept, would be truncated"
            lines.append(f"Over max_length {self.max_length}: {self.over_max_length} rows ({action}).")
        return lines

    def histogram_png(self, path) -> Path:
        """Write one length histogram per series (prompt, chosen, ...) to ``path`` (PNG, Agg backend)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        series = {k: v for k, v in self.lengths.items() if v}
        fig = Figure(figsize=(4 * max(1, len(series)), 3.2))
        FigureCanvasAgg(fig)
        for i, (name, values) in enumerate(series.items(), start=1):
            ax = fig.add_subplot(1, len(series), i)
            ax.hist(values, bins=min(30, max(1, len(set(values)))))
            if self.max_length is not None and name in ("total", "chosen_total", "rejected_total"):
                ax.axvline(self.max_length, color="red", linestyle="--", label=f"max_length {self.max_length}")
                ax.legend(fontsize=7)
            ax.set_title(name)
            ax.set_xlabel(self.unit)
        if not series:
            fig.text(0.5, 0.5, "no rows kept", ha="center")
        fig.tight_layout()
        return save_figure_atomic(fig, path)

    def verdict(self, on_error: str = "raise", report_path: str | None = None) -> DataReport:
        """The one policy check and training share: malformed rows stop the run (``on_error="raise"``) or are
        left out and counted (``"drop"``); rows dropped for a reason (empty text, chosen == rejected,
        duplicate, over max length) are always left out. Raises DataError (one line) or returns self."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if self.malformed and on_error == "raise":
            full = f" (full list: {report_path})" if report_path else ""
            first = self.malformed[0]
            raise DataError(f"{len(self.malformed)} malformed data rows, first: {first}{full}; "
                            "fix them, or set data.on_error=drop to leave them out",
                            source=first.source, line=first.line, field=first.field)
        return self.raise_if_empty()

    def raise_if_empty(self) -> DataReport:
        """Raise DataError (a ValueError) with the report's counts when no row is kept."""
        if not self.kept:
            reasons = ", ".join(f"{len(v)} {r}" for r, v in self.dropped.items()) or "none dropped"
            raise DataError(f"data check ({self.kind}{', ' + self.source if self.source else ''}): no rows kept "
                             f"of {self.rows_read} read ({reasons}; {len(self.malformed)} malformed)")
        return self


# ----------------------------------------------------------------------------------------------
# Lengths after templating


def resolve_template(template: str | None) -> str | None:
    """None, "chat", a template string, or the text of a bundled prompt named ``template``."""
    if template is None or template == "chat" or "{" in template:
        return template
    return bundled_prompt(template)


def render(template: str | None, prompt: str, reply: str | None = None) -> str:
    """Prompt text (``reply`` None) or prompt + reply, through a text ``template`` when given.

    The prompt is the template up to its ``{response}`` slot (anything after the slot, such as a final
    newline, is not part of training sequences); without a slot the reply follows the whole template.
    """
    if template is None:
        return prompt if reply is None else prompt + reply
    if not _PROMPT_SLOT.search(template):
        raise ValueError("template needs an {instruction}, {prompt} or {question} placeholder")
    slot = next((s for s in _REPLY_SLOTS if s in template), None)
    head = template.split(slot, 1)[0] if slot else template
    text = _PROMPT_SLOT.sub(lambda _: prompt, head)
    return text if reply is None else text + reply


class LengthMeter:
    """Token (or character) lengths of a prompt and its replies, as TRL's trainers tokenize them."""

    def __init__(self, tokenizer=None, template: str | None = None):
        self.tokenizer, self.template = tokenizer, resolve_template(template)
        self.unit = "tokens" if tokenizer is not None else "chars"

    def measure(self, prompt, replies: list) -> tuple[int, list[int], list[int]]:
        """(prompt length, reply lengths, prompt+reply lengths)."""
        if self.template == "chat" and isinstance(prompt, str):  # plain text as one user/assistant exchange
            prompt = [{"role": "user", "content": prompt}]
            replies = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in replies]
        if self.tokenizer is None:
            p = _chars(prompt)
            return p, [_chars(r) for r in replies], [p + _chars(r) for r in replies]
        from trl.data_utils import common_prefix_length

        p_ids, full = self._ids(prompt, replies)
        p_len = min(common_prefix_length(p_ids, ids) for ids in full)  # where the replies start (TRL DPO)
        return p_len, [len(ids) - p_len for ids in full], [len(ids) for ids in full]

    def _ids(self, prompt, replies):
        tok = self.tokenizer
        if isinstance(prompt, list):
            if not getattr(tok, "chat_template", None):
                raise ValueError("conversational rows need a tokenizer with a chat template")
            cont = prompt[-1]["role"] == "assistant"
            p_ids = _input_ids(tok.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                       add_generation_prompt=not cont, continue_final_message=cont))
            full = [_input_ids(tok.apply_chat_template(prompt + r, tokenize=True, return_dict=True)) for r in replies]
            return p_ids, full
        if self.template == "chat":
            raise ValueError("template 'chat' needs conversational rows or plain-text prompt/reply pairs")
        eos = getattr(tok, "eos_token", None) or ""
        texts = [render(self.template, prompt, r) for r in replies]
        texts = [t if not eos or t.endswith(eos) else t + eos for t in texts]
        return _input_ids(tok(render(self.template, prompt))), [_input_ids(tok(t)) for t in texts]

    def measure_messages(self, messages: list[dict]) -> int:
        """Length of a whole chat transcript (SFT ``messages`` rows)."""
        if self.tokenizer is None:
            return _chars(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages rows need a tokenizer with a chat template")
        return len(_input_ids(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)))


def _chars(value) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _input_ids(encoded) -> list:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)


def _key(*values) -> str:
    return json.dumps(values, sort_keys=True, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Checks


def _start(kind: str, rows, max_length, tokenizer, drop_over_length) -> DataReport:
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer (lengths are otherwise counted in characters)")
    report = DataReport(kind=kind, rows_read=getattr(rows, "rows_read", 0) or len(rows), max_length=max_length,
                        drop_over_length=drop_over_length, format=getattr(rows, "format", ""))
    report.malformed = list(getattr(rows, "malformed", []))
    for reason, where in getattr(rows, "skipped", {}).items():
        for source, line in where:
            report.drop(reason, source, line)
    return report


def _length_filter(report: DataReport, totals: list[int]) -> bool:
    """Count an over-length row; True when it must be dropped."""
    if report.max_length is None or max(totals) <= report.max_length:
        return False
    report.over_max_length += 1
    return report.drop_over_length


def check_preference(pairs, *, tokenizer=None, max_length: int | None = None, template: str | None = None,
                     drop_over_length: bool = True) -> DataReport:
    """Check preference pairs (from :func:`alignkit.data.preference.load_preference_rows`)."""
    report = _start("preference", pairs, max_length, tokenizer, drop_over_length)
    meter, seen = LengthMeter(tokenizer, template), set()
    report.unit = meter.unit
    for name in ("prompt", "chosen", "rejected", "chosen_total", "rejected_total"):
        report.lengths[name] = []
    for pair in pairs:
        # 1. content checks, first failing reason wins
        key = _key(pair.prompt, pair.chosen, pair.rejected)
        if any(empty_field(getattr(pair, f), f) for f in ("prompt", "chosen", "rejected")):
            reason = EMPTY
        elif pair.chosen == pair.rejected:
            reason = IDENTICAL
        elif key in seen:
            reason = DUPLICATE
        else:
            reason = None
        seen.add(key)
        if reason:
            report.drop(reason, pair.source, pair.line)
            continue
        # 2. lengths after templating; 3. the max-length rule
        p_len, (c_len, r_len), totals = meter.measure(pair.prompt, [pair.chosen, pair.rejected])
        for name, value in zip(report.lengths, (p_len, c_len, r_len, *totals)):
            report.lengths[name].append(value)
        if _length_filter(report, totals):
            report.drop(TOO_LONG, pair.source, pair.line)
            continue
        report.kept.append(pair)
    logger.info("data check: %d read, %d kept, %d dropped, %d malformed", report.rows_read, report.rows_kept,
                report.rows_dropped, len(report.malformed))
    return report


def check_sft(rows, *, tokenizer=None, max_length: int | None = None, template: str | None = None,
              drop_over_length: bool = True) -> DataReport:
    """Check SFT rows (from :func:`alignkit.data.sft_rows.load_sft_rows`): ``{"prompt", "completion"}``
    or ``{"messages"}`` dicts; locations come from ``rows.locations`` when present."""
    report = _start("sft", rows, max_length, tokenizer, drop_over_length)
    meter, seen = LengthMeter(tokenizer, template), set()
    report.unit = meter.unit
    report.lengths = {"prompt": [], "completion": [], "total": []}
    locations = getattr(rows, "locations", None) or [("<memory>", i) for i in range(len(rows))]
    for row, (source, line) in zip(rows, locations):
        # 1. content checks
        key = _key(row)
        empty = any(empty_field(v, k) for k, v in row.items() if k in ("prompt", "completion", "messages"))
        reason = EMPTY if empty else DUPLICATE if key in seen else None
        seen.add(key)
        if reason:
            report.drop(reason, source, line)
            continue
        # 2. lengths; 3. the max-length rule
        if "messages" in row:
            totals = [meter.measure_messages(row["messages"])]
        else:
            p_len, (c_len,), totals = meter.measure(row["prompt"], [row["completion"]])
            report.lengths["prompt"].append(p_len)
            report.lengths["completion"].append(c_len)
        report.lengths["total"].append(totals[0])
        if _length_filter(report, totals):
            report.drop(TOO_LONG, source, line)
            continue
        report.kept.append(row)
    return report


def check_unpaired(examples, *, tokenizer=None, max_length: int | None = None, template: str | None = None,
                   drop_over_length: bool = True) -> DataReport:
    """Check unpaired KTO examples (from :func:`alignkit.data.unpaired.load_unpaired_rows`).

    Drop reasons, first match wins: ``empty text``; ``labelled both ways`` (every row whose prompt and
    completion also appear with the other label: a pair with chosen == rejected, or contradicting ratings);
    ``duplicate`` (same prompt, completion and label as an earlier row); ``over max length``."""
    report = _start("unpaired", examples, max_length, tokenizer, drop_over_length)
    meter, seen = LengthMeter(tokenizer, template), set()
    report.unit = meter.unit
    report.lengths = {"prompt": [], "completion": [], "total": []}
    labels: dict[str, set] = {}
    for ex in examples:
        labels.setdefault(_key(ex.prompt, ex.completion), set()).add(ex.label)
    for ex in examples:
        # 1. content checks; 2. lengths after templating; 3. the max-length rule
        text_key = _key(ex.prompt, ex.completion)
        key = _key(ex.prompt, ex.completion, ex.label)
        if empty_field(ex.prompt, "prompt") or empty_field(ex.completion, "completion"):
            reason = EMPTY
        elif len(labels[text_key]) > 1:
            reason = CONFLICT
        else:
            reason = DUPLICATE if key in seen else None
        seen.add(key)
        if reason:
            report.drop(reason, ex.source, ex.line)
            continue
        p_len, (c_len,), totals = meter.measure(ex.prompt, [ex.completion])
        for name, value in zip(report.lengths, (p_len, c_len, totals[0])):
            report.lengths[name].append(value)
        if _length_filter(report, totals):
            report.drop(TOO_LONG, ex.source, ex.line)
            continue
        report.kept.append(ex)
    up = sum(ex.label for ex in report.kept)
    logger.info("data check (unpaired): %d read, %d kept (%d desirable, %d undesirable), %d dropped, %d malformed",
                report.rows_read, report.rows_kept, up, report.rows_kept - up, report.rows_dropped,
                len(report.malformed))
    return report


# ----------------------------------------------------------------------------------------------
# Running a check from options (what `alignkit data check` does)


def parse_columns(text: str | None) -> dict | None:
    """``"prompt=question,chosen=good"`` -> ``{"prompt": "question", "chosen": "good"}``."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--columns: expected target=column pairs separated by commas, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def run_check(opts: dict, *, tokenizer=None, drop_over_length: bool = True) -> DataReport:
    """Load ``opts["data"]`` (errors collected) and check it with ``tokenizer`` (None: lengths in characters).

    The one loader ``alignkit data check`` and every training stage use, so they reach the same verdict
    (:meth:`DataReport.verdict`). ``opts``: data, split, kind (preference | sft), format, columns,
    multi_turn, max_length, template, max_rows (read only the first N records); contamination (compare with
    the bundled eval sets and ``against`` files, field ``against_field``), decontaminate (and drop overlaps).
    Kind ``unpaired`` (KTO): prompt/completion/label rows, or preference pairs unpaired on the fly
    (:mod:`alignkit.data.unpaired`)."""
    split, kind = opts.get("split") or "train", opts.get("kind") or "preference"
    common = {"tokenizer": tokenizer, "max_length": opts.get("max_length"), "template": opts.get("template"),
                  "drop_over_length": drop_over_length}
    if kind == "sft":
        rows = load_sft_rows(opts["data"], split=split, columns=opts.get("columns"), errors="collect",
                             allow_empty=True, limit=opts.get("max_rows"))
        report = check_sft(rows, **common)
    elif kind == "unpaired":
        rows = load_unpaired_rows(opts["data"], split=split, format=opts.get("format") or "auto",
                                  columns=opts.get("columns"), errors="collect", allow_empty=True,
                                  multi_turn=opts.get("multi_turn") or "drop", limit=opts.get("max_rows"))
        report = check_unpaired(rows, **common)
    else:
        rows = load_preference_rows(opts["data"], split=split, format=opts.get("format") or "auto",
                                    columns=opts.get("columns"), errors="collect", allow_empty=True,
                                    multi_turn=opts.get("multi_turn") or "drop", limit=opts.get("max_rows"))
        report = check_preference(rows, **common)
    report.source = str(opts["data"])
    if opts.get("contamination") or opts.get("decontaminate"):
        _contamination(report, rows, opts)
    return report


def _contamination(report: DataReport, rows, opts: dict) -> None:
    """Compare the loaded rows with the bundled eval sets (and ``opts["against"]`` files); with
    ``opts["decontaminate"]`` the kept rows that overlap an eval set are dropped (reason CONTAMINATED)."""
    report.contamination = check_contamination(rows, locations=rows.locations, against=opts.get("against") or (),
                                                against_field=opts.get("against_field"))
    if not opts.get("decontaminate"):
        return
    hits = report.contamination.drop_indices(eval_sets=True, internal=False)
    dropped = {id(rows[i]): rows.locations[i] for i in hits}
    for source, line in dropped.values():
        report.drop(CONTAMINATED, source, line)
    report.kept = [row for row in report.kept if id(row) not in dropped]


def write_outputs(report: DataReport, out_dir) -> Path:
    """``report.md``, ``report.json`` and ``lengths.png`` in ``out_dir``; returns the folder."""
    out = Path(out_dir)
    write_text_atomic(out / "report.md", report.to_markdown())
    write_json_atomic(out / "report.json", report.to_dict())
    report.histogram_png(out / "lengths.png")
    return out
