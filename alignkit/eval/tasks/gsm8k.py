"""GSM8K (Cobbe et al., 2021): exact match of the final number in the generation.

Data: ``gsm8k/test.jsonl`` rows ``{"question", "answer"}`` where the answer ends ``#### <number>``.
Prompt and metric: CS336 A5 supplement section 2.2. ``reward`` gives GRPO the same metric.
"""
from __future__ import annotations

from alignkit import resources
from alignkit.eval.tasks.base import Task, accuracy_summary, read_jsonl


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Numeric equality after removing thousands separators and ``$`` ("1,000" == "1000.0")."""
    if pred is None:
        return False

    def norm(s: str) -> str:
        return s.replace(",", "").replace("$", "").strip().rstrip(".")

    try:
        return float(norm(pred)) == float(norm(gold))
    except ValueError:
        return norm(pred) == norm(gold)


class GSM8K(Task):
    name = "gsm8k"
    max_new_tokens = 256

    def __init__(self, data_path=None, split: str = "test"):
        super().__init__(data_path or resources.data_path("gsm8k", f"{split}.jsonl"))

    def _load_all(self) -> list[dict]:
        from alignkit.eval.parsers import gsm8k_answer

        rows = read_jsonl(self.data_path, ("question", "answer"))
        return [{"id": str(i), "question": r["question"], "answer": r["answer"], "gold": gsm8k_answer(r["answer"])}
                for i, r in enumerate(rows)]

    def instruction(self, example: dict) -> str:
        return f"{example['question']}\nAnswer:"

    def score(self, example: dict, completion_text: str) -> dict:
        from alignkit.eval.parsers import parse_gsm8k_response

        parsed = parse_gsm8k_response(completion_text)
        return {"parsed": parsed, "gold": example["gold"], "correct": numbers_equal(parsed, example["gold"])}

    def aggregate(self, records: list[dict]) -> dict:
        """Exact match = correct / all (unparseable counts as wrong)."""
        return accuracy_summary(records)
