"""AlpacaEval (Li et al., 2023): instruction following, judged pairwise against reference outputs.

Data: ``alpaca_eval/alpaca_eval.jsonl`` rows ``{"instruction", "output", "generator", "dataset"}``
(``output`` = the reference answer, here from ``text_davinci_003``). Prompt: the bare instruction
(CS336 A5 supplement section 2.3). Writes ``alpaca_eval_outputs.json``, a JSON array of
``{"instruction", "output", "generator", "dataset"}`` ready for the official ``alpaca_eval`` CLI,
and, given a judge, the both-orders win rate and the length-controlled win rate of
:mod:`alignkit.eval.judge`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from alignkit.data.io import write_json_atomic
from alignkit.eval.judge import length_controlled_win_rate, pairwise_preference, require_some_valid, win_rate
from alignkit.eval.tasks.base import Task, read_jsonl
from alignkit.eval.tasks.spec import TaskSpec

SPEC = TaskSpec(name="alpaca_eval", data="alpaca_eval/alpaca_eval.jsonl", prompt="{instruction}", max_new_tokens=512,
                metric="output_chars", target="reference",
                description="AlpacaEval generation (win rates need a judge: alignkit eval --judge)")


class AlpacaEval(Task):
    spec = SPEC
    needs_judge = True
    uses_judge = True
    outputs_file = "alpaca_eval_outputs.json"

    def _load_all(self) -> list[dict]:
        rows = read_jsonl(self.data_path, ("instruction", "output", "generator", "dataset"))
        return [{"id": str(i), "instruction": r["instruction"], "reference": r["output"],
                 "reference_generator": r["generator"], "dataset": r["dataset"]} for i, r in enumerate(rows)]

    def score(self, example: dict, completion_text: str) -> dict:
        """No local metric: the output itself (None when empty) and its length in characters."""
        return {"parsed": completion_text or None, "chars": len(completion_text)}

    def judge(self, records: list[dict], judge) -> None:
        """Judge each record in both orders; adds ``record["judge"]`` with the preference for the model."""
        ins = [(r["example"]["instruction"], r["output"], r["example"]["reference"]) for r in records]
        model_first = judge.pairwise(ins)
        reference_first = judge.pairwise([(i, ref, out) for i, out, ref in ins])
        require_some_valid(model_first + reference_first, "pairwise")
        for r, v1, v2 in zip(records, model_first, reference_first):
            r["judge"] = {"model_first": v1.label, "reference_first": v2.label, "raw": [v1.raw, v2.raw],
                          "preference": pairwise_preference(v1.label, v2.label)}

    def aggregate(self, records: list[dict]) -> dict:
        lengths = [len(r["output"]) for r in records]
        metrics = {"n": len(records), "judged": any("judge" in r for r in records),
                   "mean_output_chars": float(np.mean(lengths)) if lengths else 0.0,
                   "empty_outputs": sum(1 for r in records if not r["output"])}
        if not metrics["judged"]:
            return metrics
        valid = [r for r in records if r["judge"]["preference"] is not None]
        invalid = [r for r in records if r["judge"]["preference"] is None]
        prefs = [r["judge"]["preference"] for r in valid]
        metrics.update(win_rate(prefs))
        metrics["n"] = len(records)
        metrics["n_judged"] = len(valid)
        lc = length_controlled_win_rate(prefs, [len(r["output"]) for r in valid],
                                        [len(r["example"]["reference"]) for r in valid])
        metrics.update(lc)
        metrics["invalid_judgments"] = len(invalid)
        metrics["invalid_examples"] = [{"id": r["id"], "raw": r["judge"]["raw"]} for r in invalid[:5]]
        return metrics

    def sample_failures(self, records: list[dict], n: int = 5) -> list[dict]:
        return [r for r in records if r.get("judge", {}).get("preference") == 0.0][:n]

    def write_outputs(self, records: list[dict], out_dir: Path, generator_name: str) -> list[Path]:
        rows = [{"instruction": r["example"]["instruction"], "output": r["output"], "generator": generator_name,
                 "dataset": r["example"]["dataset"]} for r in records]
        path = Path(out_dir) / self.outputs_file
        write_json_atomic(path, rows)
        return [path]

    def reward(self, example: dict, text: str) -> dict:
        raise NotImplementedError("alpaca_eval has no programmatic reward: it needs a judge or a reward model")
