"""Parsers from model output to a gradable answer (CS336 A5 supplement sections 2.1 and 2.2).

MMLU (:func:`parse_mmlu_response`) returns "A"-"D" or ``None``; GSM8K (:func:`parse_gsm8k_response`) returns the
last number (or fraction) of the text as a canonical string or ``None``; :func:`gsm8k_answer` extracts the gold
number. Whether a parsed answer is correct is the task's grader's call (:mod:`alignkit.eval.tasks.graders`).
"""
from __future__ import annotations

import re

__all__ = [
    "canonical_number",
    "gsm8k_answer",
    "lists_options_inline",
    "parse_gsm8k_response",
    "parse_mmlu_response",
    "strip_option_list",
]

LETTERS = ("A", "B", "C", "D")

# "answer is B", "Answer: (C)", "the correct answer is: **D**", "answer is option A"; the letter must be
# uppercase and not start a word ("answer is a virus" and "answer is Bob" do not match).
_ANSWER_IS = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:(?i:option|choice|letter)\s+)?[*(\[\s]*([A-D])(?![A-Za-z0-9])"
)
# The output starts with the letter: "B", "B.", "(B)", "B) text", "B: text", "B - text", "B\n..."
_LEADING = re.compile(r"^[*(\[]*([A-D])(?:[*)\]]*(?:[.:,)]|$|\s*\n|\s+[-\u2013\u2014]))")
_PARENTHESISED = re.compile(r"\(([A-D])\)")
_ECHO_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
# One line of an option list: "A. Paris", "B) London", "(C) Berlin", "D: Madrid", "- **A.** Paris", "A."
_OPTION_LINE = re.compile(r"^[\s>*-]*[*(\[]*([A-D])(?:[*)\]]+[.:]?|\**\s*[.:)])\**(?:\s.*)?$")


def _normalise_text(text: str) -> str:
    return " ".join(text.strip().strip("*\"'`").rstrip(".").split()).lower()


def strip_option_list(text: str) -> tuple[str, bool]:
    """``(text without its option-list lines, whether it had a list)``.

    A list is two or more lines that each start with an option letter and a separator ("A. Paris",
    "B) London", "(C) Berlin", "D:"), with at least two distinct letters: the model repeating the
    options (in full or in part), which is not an answer. One such line ("B. London") is an answer and
    is kept. Other lines (e.g. a closing "The correct answer is C") are kept, in order.
    """
    lines = text.splitlines()
    marked = {i: m.group(1) for i, line in enumerate(lines) if (m := _OPTION_LINE.match(line))}
    if len(marked) < 2 or len(set(marked.values())) < 2:
        return text, False
    return "\n".join(line for i, line in enumerate(lines) if i not in marked), True


def lists_options_inline(text: str, options) -> bool:
    """True when two or more options appear as "<letter><separator> <option text>" in the text ("A. Paris
    B. London ..." on one line): the option list repeated, not an answer."""
    listed = set()
    for letter, option in zip(LETTERS, options):
        option = str(option).strip()
        marker = rf"(?<![A-Za-z0-9])[(\[]?{letter}[.:)\]]+\s*(?i:{re.escape(option)})"
        if option and re.search(marker, text):
            listed.add(letter)
    return len(listed) >= 2


def parse_mmlu_response(mmlu_example: dict, model_output: str) -> str | None:
    """The predicted letter of an MMLU answer, or ``None``.

    An echoed option list ("A. ...\nB. ...", see :func:`strip_option_list`) is removed first: an output
    that is only such a list is ``None`` (unparsed), not "A"; a list followed by "The correct answer is C"
    is "C". The rest is read by these rules, first match wins (after rule 1, options listed on one line,
    :func:`lists_options_inline`, are ``None`` too):

    1. an explicit statement: "The correct answer is B", "Answer: (C)", "answer is option D", "**A**";
    2. the output starts with the letter: "B", "B.", "(B)", "B) Paris", "B: Paris" (not "A virus ...");
    3. exactly one distinct parenthesised letter "(C)" anywhere in the output (several distinct ones,
       "(A) or (B)", without an explicit statement give ``None``);
    4. the option text echoed as the whole answer (case/space-insensitive, optionally after
       "The correct answer is"), e.g. "Paris." when option C is "Paris".

    Only uppercase letters count (the article "a" is not option A). Anything else -- no letter, a number that
    is not an option ("The correct answer is 10000 polymerases"), several different "(X)" -- is ``None``.
    ``mmlu_example`` has ``options`` (four strings); other keys (subject, question, answer) are not used.
    """
    text = strip_option_list(model_output.strip())[0].strip()
    explicit = _ANSWER_IS.search(text)
    if explicit:
        return explicit.group(1)
    options = mmlu_example.get("options") or []
    if lists_options_inline(text, options):
        return None
    distinct = set(_PARENTHESISED.findall(text))
    if len(distinct) > 1:
        return None
    leading = _LEADING.search(text)
    if leading:
        return leading.group(1)
    if distinct:
        return distinct.pop()
    answer_text = _normalise_text(_ECHO_PREFIX.sub("", text))
    echoed = [letter for letter, option in zip(LETTERS, options) if _normalise_text(str(option)) == answer_text]
    return echoed[0] if len(echoed) == 1 and answer_text else None


# A number not glued to a preceding word or decimal point: optional minus, then either digits with
# thousands separators (groups of exactly three: "1,234,567") or plain digits, then an optional fraction.
# A fraction of two plain integers ("1/2", "-3/4"), tried first at each position, is one answer; a date-like
# run ("12/25/2020") is not a fraction.
_NUMBER = re.compile(r"(?<![\w./])(-)?(\d+)/(\d+)(?![\w/]|\.\d)"
                     r"|(?<![\w.])(-)?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?|(?<![\w.])(-)?(\.\d+)")


def canonical_number(sign: str, integer: str, fraction: str) -> str:
    """``("-", "1,234", ".50")`` -> ``"-1234.5"``: no separators, no leading zeros, no trailing ``.0``s."""
    value = str(int(integer.replace(",", "") or "0"))
    frac = fraction.rstrip("0").rstrip(".") if fraction else ""
    result = f"{sign}{value}{frac}"
    return "0" if result == "-0" else result


def parse_gsm8k_response(model_output: str) -> str | None:
    """The last number (or fraction) in the text as a canonical string, or ``None`` if there is none.

    Accepted: ``1,234`` -> ``"1234"`` (commas only as thousands separators, groups of exactly three
    digits), decimals (``3.50`` -> ``"3.5"``, ``18.00`` -> ``"18"``, ``.5`` -> ``"0.5"``), negatives
    (``-7``, also U+2212), ``$`` (``$1,000`` -> ``"1000"``), trailing periods (``"is 18."`` -> ``"18"``).
    Lists are not merged: ``1,2,3`` and ``1, 2, 3`` give ``"3"`` (a list of three-digit numbers written
    without spaces, ``100,200``, reads as 100200). A minus after a digit or letter is a hyphen, not a
    sign (``10-3`` gives ``"3"``); digits glued after letters (``x2``) are skipped; scientific notation is
    not interpreted. A fraction of plain integers is kept as one answer (``1/2`` -> ``"1/2"``, ``-06/08`` ->
    ``"-6/8"``; the grader decides that it equals ``0.5``); slashes in a run like ``12/25/2020`` are not
    fractions (``"2020"``).
    """
    text = model_output.replace("$", "").replace("\u2212", "-")
    last = None
    for last in _NUMBER.finditer(text):  # 1. keep the last match
        pass
    if last is None:
        return None
    if last.group(2):  # "1/2"
        numerator = canonical_number(last.group(1) or "", last.group(2), "")
        return numerator if numerator == "0" else f"{numerator}/{int(last.group(3))}"
    if last.group(8):  # ".5"
        return canonical_number(last.group(7) or "", "0", last.group(8))
    return canonical_number(last.group(4) or "", last.group(5), last.group(6) or "")


def gsm8k_answer(example_answer_text: str) -> str:
    """The gold answer of a GSM8K solution: the text after ``####``, canonicalised like
    :func:`parse_gsm8k_response` when it is a number (``"#### 1,000"`` -> ``"1000"``), else stripped."""
    if "####" not in example_answer_text:
        raise ValueError(f"GSM8K answer has no '####' marker: {example_answer_text[-80:]!r}")
    gold = example_answer_text.rsplit("####", 1)[1].strip()
    number = parse_gsm8k_response(gold)
    bare = gold.replace("$", "").replace(",", "").rstrip(".")
    return number if number is not None and re.fullmatch(r"-?\d*\.?\d+", bare) else gold
