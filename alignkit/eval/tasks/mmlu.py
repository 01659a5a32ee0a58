"""MMLU (Hendrycks et al., 2021): zero-shot multiple choice, accuracy overall and per subject.

Data: ``mmlu/{dev,val,test}/<subject>_<split>.csv``, no header, columns question, A, B, C, D,
answer. Prompt and metric: CS336 A5 supplement section 2.1.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from alignkit import resources
from alignkit.eval.tasks.base import Task, accuracy_summary, seeded_subset

PROMPT = (
    "Answer the following multiple choice question about {subject}. Respond with a single "
    'sentence of the form "The correct answer is _", filling the blank with the letter '
    "corresponding to the correct answer (i.e., A, B, C or D).\n\n"
    "Question: {question}\n"
    "A. {a}\nB. {b}\nC. {c}\nD. {d}\n"
    "Answer:"
)
FIELDS = ("question", "A", "B", "C", "D", "answer")


def read_mmlu_csv(path: Path, split: str) -> list[dict]:
    """Examples of one subject file; a malformed row is an error naming file, line and field."""
    subject = path.name[: -len(f"_{split}.csv")] if path.name.endswith(f"_{split}.csv") else path.stem
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != len(FIELDS):
                raise ValueError(f"{path}: row {line_no}: expected {len(FIELDS)} fields "
                                 f"({', '.join(FIELDS)}), got {len(row)}")
            if row[5].strip() not in ("A", "B", "C", "D"):
                raise ValueError(f"{path}: row {line_no}: field 'answer' must be A, B, C or D, got {row[5]!r}")
            examples.append({"id": f"{subject}/{line_no}", "subject": subject, "question": row[0],
                             "options": row[1:5], "answer": row[5].strip()})
    return examples


class MMLU(Task):
    name = "mmlu"
    max_new_tokens = 128

    def __init__(self, data_path=None, split: str = "test"):
        super().__init__(data_path or resources.data_path("mmlu"))
        self.split = split

    def _load_all(self) -> list[dict]:
        folder = self.data_path / self.split
        files = sorted(folder.glob(f"*_{self.split}.csv"))
        if not files:
            raise FileNotFoundError(f"no MMLU files *_{self.split}.csv in {folder}")
        return [ex for path in files for ex in read_mmlu_csv(path, self.split)]

    def load(self, limit=None, seed=0) -> list[dict]:
        """A seeded sample across all subjects when ``limit`` is set (not the first subject only)."""
        return seeded_subset(self._load_all(), limit, seed)

    def instruction(self, example: dict) -> str:
        a, b, c, d = example["options"]
        return PROMPT.format(subject=example["subject"].replace("_", " "), question=example["question"],
                             a=a, b=b, c=c, d=d)

    def score(self, example: dict, completion_text: str) -> dict:
        from alignkit.eval.parsers import parse_mmlu_response

        parsed = parse_mmlu_response(example, completion_text)
        return {"parsed": parsed, "gold": example["answer"], "correct": parsed == example["answer"]}

    def aggregate(self, records: list[dict]) -> dict:
        """Accuracy = correct / all (unparseable counts as wrong), overall and per subject."""
        by_subject: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            by_subject[r["example"]["subject"]].append(bool(r["score"]["correct"]))
        per_subject = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items())}
        return {**accuracy_summary(records), "per_subject": per_subject}
