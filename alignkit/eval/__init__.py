"""Evaluation: tasks (MMLU, GSM8K, AlpacaEval, SimpleSafetyTests, over-refusal), an LLM judge,
reports and lm-eval tasks. ``run_eval`` is the entry point; ``alignkit eval`` its CLI.

The parsers (``parse_mmlu_response``, ``parse_gsm8k_response``, ``gsm8k_answer``) live in
:mod:`alignkit.eval.parsers` and are re-exported here lazily, like ``run_eval``, so that importing
``alignkit.eval`` stays cheap.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "parse_mmlu_response": "alignkit.eval.parsers",
    "parse_gsm8k_response": "alignkit.eval.parsers",
    "gsm8k_answer": "alignkit.eval.parsers",
    "run_eval": "alignkit.eval.runner",
    "get_task": "alignkit.eval.tasks",
    "TASKS": "alignkit.eval.tasks",
    "Judge": "alignkit.eval.judge",
}

__all__ = [
    "TASKS",
    "Judge",
    "get_task",
    "gsm8k_answer",
    "parse_gsm8k_response",
    "parse_mmlu_response",
    "run_eval",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignkit.eval' has no attribute {name!r}")
