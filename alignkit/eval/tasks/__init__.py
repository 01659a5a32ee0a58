"""Evaluation tasks and their registry: ``get_task("mmlu")``; an unknown name lists the valid ones.

Each task is defined once by its :class:`~alignkit.eval.tasks.spec.TaskSpec` (``SPECS``), from which
the runner's Task and the lm-eval YAML (:func:`alignkit.eval.harness.task_dir`) both come.
"""
from __future__ import annotations

from alignkit.eval.tasks.alpaca_eval import AlpacaEval
from alignkit.eval.tasks.base import STYLES, Task, clean_output, wrap_prompt
from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.eval.tasks.mmlu import MMLU
from alignkit.eval.tasks.over_refusal import OverRefusal
from alignkit.eval.tasks.safety import Safety
from alignkit.eval.tasks.spec import TaskSpec
from alignkit.eval.tasks.sst import SimpleSafetyTests

TASKS: dict[str, type[Task]] = {
    "mmlu": MMLU,
    "gsm8k": GSM8K,
    "alpaca_eval": AlpacaEval,
    "sst": SimpleSafetyTests,
    "over_refusal": OverRefusal,
    "safety": Safety,
}
SPECS: dict[str, TaskSpec] = {name: cls.spec for name, cls in TASKS.items()}


def get_task(name: str, **kwargs) -> Task:
    """A task instance by name (kwargs go to its constructor, e.g. ``data_path``)."""
    return get_task_class(name)(**kwargs)


def parse_task_list(spec: str | list[str]) -> list[str]:
    """"mmlu,gsm8k" or a list -> validated names (unknown ones raise KeyError listing valid names)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise KeyError(f"no eval task given; valid tasks: {', '.join(TASKS)}")
    for n in names:
        get_task_class(n)
    return names


def get_task_class(name: str) -> type[Task]:
    """The Task class registered as ``name`` (KeyError listing the valid names)."""
    if name not in TASKS:
        raise KeyError(f"unknown eval task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = [
    "GSM8K",
    "MMLU",
    "SPECS",
    "STYLES",
    "TASKS",
    "AlpacaEval",
    "OverRefusal",
    "Safety",
    "SimpleSafetyTests",
    "Task",
    "TaskSpec",
    "clean_output",
    "get_task",
    "get_task_class",
    "parse_task_list",
    "wrap_prompt",
]
