"""alignkit.notebook helpers (fast): model choice, toy data, recipe round trip, curves, accuracy, meter."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from alignkit import notebook as nb
from alignkit.models import DEFAULT_MODEL


def test_pick_model_on_cpu_is_packaged_smollm2_without_4bit(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_NOTEBOOK_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = nb.pick_model()
    assert (choice.name, choice.quantization) == (DEFAULT_MODEL, None)
    assert nb.pick_model(cpu_quantization="4bit").quantization == "4bit"
    monkeypatch.setenv("ALIGNKIT_NOTEBOOK_MODEL", "some/model")
    assert nb.pick_model().name == "some/model"


def test_pick_model_on_gpu_uses_4bit_and_the_hub_model(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_NOTEBOOK_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nb, "hub_reachable", lambda timeout=3.0: True)
    assert (nb.pick_model().name, nb.pick_model().quantization) == (nb.GPU_MODEL, "4bit")
    monkeypatch.setattr(nb, "hub_reachable", lambda timeout=3.0: False)
    assert nb.pick_model().name != nb.GPU_MODEL  # offline GPU: packaged model, still 4-bit
    assert nb.pick_model().quantization == "4bit"


def test_hub_reachable_is_false_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert nb.hub_reachable() is False


def test_arithmetic_rows_are_correct_sums():
    sft_rows = nb.arithmetic_sft_rows(20, seed=3)
    assert sft_rows == nb.arithmetic_sft_rows(20, seed=3) and sft_rows != nb.arithmetic_sft_rows(20, seed=4)
    for row in sft_rows:
        a, b = map(int, re.findall(r"\d+", row["prompt"]))
        assert row["completion"].endswith(f"The answer is {a + b}.")
    pairs = nb.arithmetic_pairs(20, seed=3)
    for i, p in enumerate(pairs):
        a, b = map(int, re.findall(r"\d+", p["prompt"]))
        assert p["chosen"] == f"{a} + {b} = {a + b}. The answer is {a + b}."
        got = nb.ANSWER_RE.search(p["rejected"])
        if i % 2 == 0:  # wrong sum, same format
            assert got is not None and int(got.group(1)) != a + b
        else:  # right sum, no format
            assert got is None and str(a + b) in p["rejected"]


def test_write_recipe_round_trips_through_load_recipe(tmp_path):
    rows = nb.write_jsonl(nb.arithmetic_pairs(4), tmp_path / "d.jsonl")
    assert [json.loads(x) for x in rows.read_text().splitlines()] == nb.arithmetic_pairs(4)
    recipe = nb.write_recipe({"stage": "dpo", "output_dir": str(tmp_path / "out"),
                              "data": {"path": str(rows)}, "train": {"beta": 0.25, "report_to": "none"}},
                             tmp_path / "r.yaml")
    stage = recipe.stages["dpo"]
    assert stage.train.beta == 0.25 and stage.data.path == str(rows)
    assert Path(stage.train.output_dir) == tmp_path / "out"


def test_series_and_plot(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.5, "x": True},
        {"step": 4, "other": 1}]) + "\n")
    assert nb.series(log, "loss") == [(1, 2.0), (3, 1.5)]
    assert nb.series(log, "x") == []
    png = nb.plot_series({"loss": [(log, "loss")], "missing": [(log, "nope")]}, tmp_path / "f" / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="not written"):
        nb.show_png(tmp_path / "absent.png")


def test_preference_accuracy_matches_a_float64_reimplementation(tiny_model_dir):
    """Independent check: score each reply with a plain float64 log-softmax over the tiny model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = nb.arithmetic_pairs(6, seed=1)

    def mean_logp(prompt: str, reply: str) -> float:
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=True)["input_ids"]
        full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": reply}], tokenize=True)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)  # (T, V)
        vals = [logp[t - 1, full[t]].item() for t in range(len(p), len(full))]
        return math.fsum(vals) / len(vals)

    expected = sum(mean_logp(x["prompt"], x["chosen"]) > mean_logp(x["prompt"], x["rejected"]) for x in pairs)
    assert nb.preference_accuracy(model, tok, pairs) == pytest.approx(expected / len(pairs))
    with pytest.raises(ValueError, match="plain-text"):
        nb.preference_accuracy(model, tok, [{"prompt": [], "chosen": [], "rejected": []}])


def test_meter_reports_machine_time_and_memory():
    summary = nb.Meter().summary()
    assert summary["seconds"] >= 0 and summary["peak_rss_gib"] > 0.01
    assert summary["machine"].endswith(")") or "x " in summary["machine"]
    assert str(os.cpu_count()) in summary["machine"] or torch.cuda.is_available()
