"""Graders: ``(answer, gold) -> correct``. Each task names one in its spec (``TaskSpec.grader``), and that
one function decides correctness for the eval score, the RL reward and the quickstart metrics.

* :func:`answers_equivalent` (GSM8K, and the r1-zero reward's answers): mathematical equivalence,
  exact, then numeric (``"1,000" == "1000.0"``, ``"$5" == "5"``, ``"18." == "18"``), then
  ``math_verify`` (``0.5 == 1/2 == \\frac{1}{2}``, ``\\boxed{7} == 7``);
* :func:`exact` (MMLU letters): string equality.

An unparseable answer (``None``) or an empty one is never correct.
"""
from __future__ import annotations

import math
import re
import threading

__all__ = ["answers_equivalent", "exact"]

_NUMBER_RE = re.compile(r"^-?\d+(?:\.\d+)?$")


def _as_number(text: str) -> float | None:
    text = text.strip().replace(",", "").lstrip("$").rstrip(".")
    return float(text) if _NUMBER_RE.match(text) else None


def answers_equivalent(predicted: str | None, gold: str) -> bool:
    """Mathematical equivalence of two answer strings (exact, then numeric, then ``math_verify``)."""
    if predicted is None:
        return False
    predicted, gold = predicted.strip(), gold.strip()
    if not predicted:
        return False
    if predicted == gold:
        return True
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    from math_verify import parse, verify  # sympy-based, slow to import: only when a symbolic check is needed

    # math_verify times out with SIGALRM, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(gold, parsing_timeout=timeout)
    pred_parsed = parse(predicted, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def exact(predicted: str | None, gold: str) -> bool:
    """String equality (``None`` is never correct)."""
    return predicted is not None and predicted == gold
