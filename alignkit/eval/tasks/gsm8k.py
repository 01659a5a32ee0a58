"""GSM8K (Cobbe et al., 2021): the final number of the generation, graded by answer equivalence.

Data: ``gsm8k/test.jsonl`` rows ``{"question", "answer"}`` where the answer ends ``#### <number>``.
Prompt and metric: CS336 A5 supplement section 2.2. The grader (:func:`answers_equivalent`:
``"1,000" == "1000.0"``, ``"1/2" == "0.5"``) is the one the GRPO rewards ``gsm8k`` and ``r1_zero``
(:mod:`alignkit.rl.rewards`) and the quickstart metrics call, through :meth:`GSM8K.grade`.
"""
from __future__ import annotations

from alignkit.eval.parsers import gsm8k_answer, parse_gsm8k_response
from alignkit.eval.tasks.base import Task, accuracy_summary, read_jsonl
from alignkit.eval.tasks.graders import answers_equivalent
from alignkit.eval.tasks.spec import TaskSpec

# The earlier name of the GSM8K grader (numeric equality: "1,000" == "1000.0", "$18.00" == "18").
numbers_equal = answers_equivalent


def parse_answer(example: dict, text: str) -> str | None:
    """The GSM8K parser in the spec's ``(example, text)`` form: the last number (or fraction) of ``text``."""
    return parse_gsm8k_response(text)


def gold_answer(ground_truth: str) -> str:
    """The gold answer of a ground-truth string: after ``####`` for a GSM8K solution
    (:func:`~alignkit.eval.parsers.gsm8k_answer`), else the string itself, stripped."""
    return gsm8k_answer(ground_truth) if "####" in ground_truth else ground_truth.strip()


SPEC = TaskSpec(name="gsm8k", data="gsm8k/{split}.jsonl", prompt="{question}\nAnswer:", max_new_tokens=256,
                metric="exact_match", target="gold", parser=parse_answer, grader=answers_equivalent,
                description="GSM8K test, final number graded by answer equivalence")


class GSM8K(Task):
    spec = SPEC

    def __init__(self, data_path=None, split: str = "test"):
        super().__init__(data_path or SPEC.data_file(split))

    @staticmethod
    def example_for(ground_truth: str) -> dict:
        """The minimal example :meth:`score`/:meth:`reward` need for a ground-truth string (RL data rows)."""
        return {"gold": gold_answer(ground_truth)}

    def _load_all(self) -> list[dict]:
        rows = read_jsonl(self.data_path, ("question", "answer"))
        return [{"id": str(i), "question": r["question"], "answer": r["answer"], "gold": gsm8k_answer(r["answer"])}
                for i, r in enumerate(rows)]

    def aggregate(self, records: list[dict]) -> dict:
        """Exact match = correct / all (unparseable counts as wrong)."""
        return accuracy_summary(records)
