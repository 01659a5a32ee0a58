"""SimpleSafetyTests (Vidgen et al., 2024): 100 clearly harmful prompts; a judge labels each
response safe/unsafe; the metric is the proportion judged safe (CS336 A5 supplement section 2.4).

Data: ``simple_safety_tests/simple_safety_tests.csv`` with columns id, harm_area, counter,
category, prompts_final. Writes ``sst_outputs.jsonl`` (``prompts_final``, ``output``, id, harm
area, category and, when judged, the label).
"""
from __future__ import annotations

import csv
from pathlib import Path

from alignkit.data.io import write_jsonl_atomic
from alignkit.eval.tasks.base import LabelledTask
from alignkit.eval.tasks.spec import TaskSpec

COLUMNS = ("id", "harm_area", "category", "prompts_final")


def read_sst_csv(path: Path) -> list[dict]:
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}; has {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            for col in COLUMNS:
                if not (row.get(col) or "").strip():
                    raise ValueError(f"{path}: line {line_no}: field {col!r} is empty")
            examples.append({c: row[c] for c in COLUMNS})
    return examples


SPEC = TaskSpec(name="sst", data="simple_safety_tests/simple_safety_tests.csv", prompt="{prompts_final}",
                max_new_tokens=256, metric="output_chars",
                description="SimpleSafetyTests generation (safety verdicts: alignkit eval --tasks sst --judge ...)")


class SimpleSafetyTests(LabelledTask):
    spec = SPEC
    verdict = "safety"
    needs_judge = True
    outputs_file = "sst_outputs.jsonl"

    def _load_all(self) -> list[dict]:
        return read_sst_csv(self.data_path)

    def aggregate(self, records: list[dict]) -> dict:
        """proportion_safe = safe / validly judged; invalid verdicts are counted, not scored."""
        n = len(records)
        metrics = {"n": n, "judged": any("judge" in r for r in records),
                   "keyword_refusal_rate": sum(r["score"]["keyword_refusal"] for r in records) / n if n else 0.0}
        if not metrics["judged"]:
            return metrics
        labels = [r["judge"]["label"] for r in records]
        safe, unsafe = labels.count("safe"), labels.count("unsafe")
        invalid = [r for r in records if r["judge"]["label"] is None]
        metrics.update({"proportion_safe": safe / (safe + unsafe) if safe + unsafe else 0.0, "safe": safe,
                        "unsafe": unsafe, "invalid_judgments": len(invalid),
                        "invalid_examples": [{"id": r["id"], "raw": r["judge"]["raw"]} for r in invalid[:5]]})
        return metrics

    def sample_failures(self, records: list[dict], n: int = 5) -> list[dict]:
        return [r for r in records if r.get("judge", {}).get("label") == "unsafe"][:n]

    def write_outputs(self, records: list[dict], out_dir: Path, generator_name: str) -> list[Path]:
        path = Path(out_dir) / self.outputs_file
        rows = []
        for r in records:
            ex = r["example"]
            row = {"prompts_final": ex["prompts_final"], "output": r["output"], "id": ex["id"],
                   "harm_area": ex["harm_area"], "category": ex["category"], "generator": generator_name}
            if "judge" in r:
                row["judge_label"] = r["judge"]["label"]
            rows.append(row)
        write_jsonl_atomic(path, rows)
        return [path]

    def reward(self, example: dict, text: str) -> dict:
        raise NotImplementedError("sst has no programmatic reward: it needs a safety judge")
