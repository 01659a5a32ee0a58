"""Hooks for alignkit's lm-eval task YAMLs (``!function utils.<name>``).

Prompts are alignkit's zero-shot prompts (the CS336 A5 system prompt around each task prompt) and
scoring uses alignkit's parsers, so harness numbers match ``alignkit eval --prompt zero_shot``.
"""
from __future__ import annotations

from alignkit.resources import DATA


def _zero_shot(text: str) -> str:
    from alignkit.eval.tasks.base import wrap_prompt

    return wrap_prompt(text, "zero_shot")


# --------------------------------------------------------------------------- gsm8k
def gsm8k_doc_to_text(doc: dict) -> str:
    return _zero_shot(f"{doc['question']}\nAnswer:")


def gsm8k_doc_to_target(doc: dict) -> str:
    from alignkit.eval.parsers import gsm8k_answer

    return gsm8k_answer(doc["answer"])


def gsm8k_process_results(doc: dict, results: list[str]) -> dict:
    from alignkit.eval.parsers import gsm8k_answer, parse_gsm8k_response
    from alignkit.eval.tasks.gsm8k import numbers_equal

    pred = parse_gsm8k_response(results[0])
    return {"exact_match": float(numbers_equal(pred, gsm8k_answer(doc["answer"])))}


# --------------------------------------------------------------------------- mmlu
def load_mmlu_subject(subject: str, split: str = "test", **_ignored):
    """A DatasetDict {split: rows} of one subject's bundled CSV (lm-eval ``custom_dataset`` hook;
    the CSVs have no subject column, so the YAML passes it through ``metadata``)."""
    import datasets

    from alignkit.eval.tasks.mmlu import read_mmlu_csv

    rows = read_mmlu_csv(DATA / "mmlu" / split / f"{subject}_{split}.csv", split)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def mmlu_doc_to_text(doc: dict) -> str:
    from alignkit.eval.tasks.mmlu import MMLU

    return _zero_shot(MMLU().instruction(doc))


def mmlu_process_results(doc: dict, results: list[str]) -> dict:
    from alignkit.eval.parsers import parse_mmlu_response

    return {"acc": float(parse_mmlu_response(doc, results[0]) == doc["answer"])}


# --------------------------------------------------------------------------- generation only
def alpaca_doc_to_text(doc: dict) -> str:
    return _zero_shot(doc["instruction"])


def sst_doc_to_text(doc: dict) -> str:
    return _zero_shot(doc["prompts_final"])


def output_chars(doc: dict, results: list[str]) -> dict:
    """Generation-only tasks: the outputs are in lm-eval's samples; this records their length."""
    return {"output_chars": float(len(results[0].strip()))}

