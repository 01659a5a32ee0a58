"""alignkit's lm-eval task YAMLs through lm-eval's own Python API, on the tiny model, offline."""
from __future__ import annotations

import json
import re
import sys
import types

import pytest

from alignkit.eval.harness import TASK_DIR, render_task_dir, run_harness
from alignkit.resources import DATA


@pytest.fixture(autouse=True)
def parsers(monkeypatch):
    try:
        import alignkit.eval.parsers  # noqa: F401
    except ImportError:  # stand-in while alignkit/eval/parsers.py is absent
        m = types.ModuleType("alignkit.eval.parsers")
        m.parse_mmlu_response = lambda ex, t: (re.findall(r"correct answer is ([ABCD])", t) or [None])[0]
        m.parse_gsm8k_response = lambda t: (re.findall(r"-?\d[\d,]*(?:\.\d+)?", t) or [None])[-1]
        m.gsm8k_answer = lambda a: a.split("####")[-1].strip().replace(",", "")
        monkeypatch.setitem(sys.modules, "alignkit.eval.parsers", m)


def test_rendered_yamls_point_at_existing_bundled_files(tmp_path):
    out = render_task_dir(tmp_path)
    names = {p.name for p in TASK_DIR.glob("*.yaml")}
    assert {"alignkit_gsm8k.yaml", "alignkit_mmlu.yaml", "alignkit_alpaca_eval.yaml", "alignkit_sst.yaml"} <= names
    assert {p.name for p in out.glob("*.yaml")} == names and (out / "utils.py").exists()
    for p in out.glob("*.yaml"):
        for path in re.findall(r"test: (/\S+)", p.read_text()):
            assert path.startswith(str(DATA)) and __import__("os").path.exists(path), (p.name, path)


@pytest.mark.slow
def test_custom_gsm8k_task_through_lm_eval_api(tiny_model_dir, tmp_path):
    out = run_harness(str(tiny_model_dir), ["alignkit_gsm8k"], tmp_path, limit=3, batch_size=3, device="cpu",
                      gen_kwargs={"max_gen_toks": 4})
    res = out["results"]["alignkit_gsm8k"]
    assert out["n_samples"]["alignkit_gsm8k"] == {"original": 1319, "effective": 3}
    samples = [json.loads(line) for line in (tmp_path / "samples_alignkit_gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and [s["target"] for s in samples] == ["18", "3", "70000"]
    # exact_match is the mean of per-sample scores recomputed from the raw responses
    from alignkit.eval.parsers import parse_gsm8k_response
    from alignkit.eval.tasks.gsm8k import numbers_equal

    again = [numbers_equal(parse_gsm8k_response(s["filtered_resps"][0]), s["target"]) for s in samples]
    assert res["exact_match,none"] == pytest.approx(sum(again) / 3)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["device"] == "cpu" and "device" not in saved["config"]["model_args"]
