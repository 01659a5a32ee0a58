"""MMLU (Hendrycks et al., 2021): zero-shot multiple choice, accuracy overall and per subject.

Data: ``mmlu/{dev,val,test}/<subject>_<split>.csv``, no header, columns question, A, B, C, D,
answer. Prompt and metric: CS336 A5 supplement section 2.1.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from alignkit.eval.parsers import parse_mmlu_response
from alignkit.eval.tasks.base import Task, accuracy_summary, first_n_per_subject, seeded_subset
from alignkit.eval.tasks.graders import exact
from alignkit.eval.tasks.spec import TaskSpec

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


SPEC = TaskSpec(
    name="mmlu",
    data="mmlu",
    prompt=PROMPT,
    max_new_tokens=128,
    metric="acc",
    target="answer",
    parser=parse_mmlu_response,
    grader=exact,
    # lm-eval: a group alignkit_mmlu of these subjects (the runner samples across all bundled subjects)
    subsets=("abstract_algebra", "anatomy", "college_computer_science", "high_school_geography"),
    subset_data="mmlu/{split}/{subset}_{split}.csv",
    description="MMLU zero-shot multiple choice, letter parsed from the answer",
)


class MMLU(Task):
    spec = SPEC
    has_subjects = True

    def __init__(self, data_path=None, split: str = "test"):
        """``data_path``: the folder with ``<split>/<subject>_<split>.csv`` files, or one such CSV."""
        super().__init__(data_path)
        self.split = split

    def _load_all(self) -> list[dict]:
        if self.data_path.is_file():
            return read_mmlu_csv(self.data_path, self.split)
        folder = self.data_path / self.split
        files = sorted(folder.glob(f"*_{self.split}.csv"))
        if not files:
            raise FileNotFoundError(f"no MMLU files *_{self.split}.csv in {folder}")
        return [ex for path in files for ex in read_mmlu_csv(path, self.split)]

    def load(self, limit=None, seed=0, limit_per_subject=None) -> list[dict]:
        """``limit_per_subject``: the first N examples of each subject, in file order; then ``limit``: a
        seeded sample of those across all subjects (not the first subject only). Both None: all."""
        return seeded_subset(first_n_per_subject(self._load_all(), limit_per_subject), limit, seed)

    def prompt_fields(self, example: dict) -> dict:
        a, b, c, d = example["options"]
        return {"subject": example["subject"].replace("_", " "), "question": example["question"],
                "a": a, "b": b, "c": c, "d": d}

    def aggregate(self, records: list[dict]) -> dict:
        """Accuracy = correct / all (unparseable counts as wrong), overall and per subject."""
        by_subject: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            by_subject[r["example"]["subject"]].append(bool(r["score"]["correct"]))
        per_subject = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items())}
        return {**accuracy_summary(records), "per_subject": per_subject}
