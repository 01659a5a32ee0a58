"""Hooks of alignkit's generated lm-eval task YAMLs (``!function utils.<name>``).

:func:`alignkit.eval.harness.task_dir` writes one YAML per task spec plus this file into a folder.
Every YAML uses the same three hooks, which call the runner's own :class:`~alignkit.eval.tasks.base.Task`:
``load_docs`` reads the data with the task's loader (the docs are the runner's examples, tagged with
the task name), ``doc_to_text`` is the task's zero-shot prompt and ``process_results`` scores the
cleaned output with the task's parser and grader. So harness numbers match
``alignkit eval --prompt zero_shot`` by construction.
"""
from __future__ import annotations

from functools import cache

from alignkit.eval.tasks import Task, get_task
from alignkit.eval.tasks.base import clean_output
from alignkit.eval.tasks.spec import HARNESS_STYLE as STYLE

TASK_FIELD = "alignkit_task"  # the doc field naming the alignkit task a doc belongs to


@cache
def _task(name: str) -> Task:
    return get_task(name)


def load_docs(alignkit_task: str, data_files: dict, **_metadata):
    """lm-eval ``custom_dataset`` hook: a DatasetDict ``{"test": examples}`` of one task, read from
    ``data_files["test"]`` by the task's own loader; each doc carries ``alignkit_task``."""
    import datasets

    examples = get_task(alignkit_task, data_path=data_files["test"]).load()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{**example, TASK_FIELD: alignkit_task} for example in examples])})


def doc_to_text(doc: dict) -> str:
    """The task's zero-shot prompt of one doc."""
    return _task(doc[TASK_FIELD]).format_prompt(doc, STYLE)


def process_results(doc: dict, results: list[str]) -> dict:
    """``{metric: value}`` of one generation, cleaned as the runner cleans it, scored by the task."""
    return _task(doc[TASK_FIELD]).harness_metrics(doc, clean_output(results[0], STYLE))
