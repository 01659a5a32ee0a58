"""Pipeline: chains, restart at the first unfinished stage, eval before/after table and checks, CLI codes."""
from __future__ import annotations

import json
import types
from dataclasses import dataclass, field

import pytest

from alignkit import pipeline
from alignkit.config import load_recipe
from alignkit.train import STAGES


@dataclass
class FakeArgs:
    output_dir: str = field(default="x", metadata={"help": "out"})
    seed: int = field(default=0, metadata={"help": "seed"})
    fail: bool = field(default=False, metadata={"help": "raise in run"})
    interrupt: bool = field(default=False, metadata={"help": "report an interruption"})


CALLS: list[tuple[str, str | None]] = []


def _fake_module(name):
    mod = types.ModuleType(f"fake_stage_{name}")
    mod.ARGS_CLASS = FakeArgs

    def run(recipe, stage_dir, model_path):
        CALLS.append((name, model_path))
        if recipe.train.fail:
            raise RuntimeError(f"{name} failed")
        out = stage_dir / "model"
        out.mkdir(parents=True, exist_ok=True)
        return {"model_dir": str(out), "metrics": {"train_loss": 1.0}, "model_source": {"path": model_path},
                "interrupted": recipe.train.interrupt}

    mod.run = run
    return mod


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    for name in ("sft", "dpo"):
        monkeypatch.setitem(STAGES, name, _fake_module(name))
    return CALLS


def _chain(tmp_path, *extra):
    path = tmp_path / "chain.yaml"
    path.write_text("stages: [sft, dpo]\nmodel: {name_or_path: base-model}\n"
                    "sft: {data: {path: a.jsonl}}\ndpo: {data: {path: b.jsonl}}\n")
    return load_recipe(path, [f"output_dir={tmp_path / 'run'}", *extra])


def test_chain_feeds_models_and_restarts_at_first_unfinished(tmp_path, fake_stages):
    # 1. the second stage fails: the first is marked done, the second is not
    with pytest.raises(RuntimeError, match="dpo failed"):
        pipeline.run_recipe(_chain(tmp_path, "dpo.train.fail=true"))
    run = tmp_path / "run"
    assert (run / "1_sft" / "DONE").exists() and not (run / "2_dpo" / "DONE").exists()
    assert json.loads((run / "1_sft" / "state.json").read_text())["status"] == "done"
    assert (run / "2_dpo" / "resolved_config.yaml").exists()  # written before the stage ran
    # 2. rerun: sft is skipped, dpo starts from sft's output model
    fake_stages.clear()
    assert pipeline.run_recipe(_chain(tmp_path)) == 0
    assert fake_stages == [("dpo", str(run / "1_sft" / "model"))]
    # 3. a third run does nothing
    fake_stages.clear()
    assert pipeline.run_recipe(_chain(tmp_path)) == 0 and fake_stages == []


def test_interrupted_stage_exits_130_without_done(tmp_path, fake_stages):
    code = pipeline.run_recipe(_chain(tmp_path, "sft.train.interrupt=true"))
    assert code == pipeline.EXIT_INTERRUPTED
    assert not (tmp_path / "run" / "1_sft" / "DONE").exists()
    assert fake_stages == [("sft", None)]  # dpo never started


def test_before_after_table_and_claims():
    cols = {"before": {"fmt": 0.0, "acc": 0.5}, "after": {"fmt": 0.75, "acc": 0.25}}
    table = pipeline.before_after_table(cols)
    assert "| fmt | 0.000 | 0.750 | +0.750 |" in table
    assert "| acc | 0.500 | 0.250 | -0.250 |" in table
    assert pipeline.check_claims(cols, {"fmt": "rise", "acc": ">0.2"}) == []
    assert "unknown rule '~1'" in pipeline.check_claims(cols, {"fmt": "~1"})[0]
    failures = pipeline.check_claims(cols, {"acc": "rise", "fmt": "<0.5", "nope": "rise"})
    assert len(failures) == 3 and "acc did not rise: before 0.500, after 0.250" in failures[0]
    assert "fmt = 0.750, expected <0.5" in failures[1] and "nope: not measured" in failures[2]


def test_eval_step_scores_base_and_final_and_fails_checks(tmp_path, fake_stages, monkeypatch, capsys):
    seen = []

    def fake_score(model, ev, out_dir, base, seed, beta=None):
        seen.append((model, base))
        return {"gsm8k_format_rate": 0.5 if model == "base-model" else 0.25}

    monkeypatch.setattr(pipeline, "score", fake_score)
    path = tmp_path / "c.yaml"
    path.write_text("stages: [sft, eval]\nmodel: {name_or_path: base-model}\nsft: {data: {path: a.jsonl}}\n"
                    "eval: {quickstart: true, checks: {gsm8k_format_rate: rise}}\n")
    code = pipeline.run_recipe(load_recipe(path, [f"output_dir={tmp_path / 'run'}"]))
    final = str(tmp_path / "run" / "1_sft" / "model")
    assert seen == [("base-model", "base-model"), (final, "base-model")]
    assert code == 1  # the claim failed
    assert "| gsm8k_format_rate | 0.500 | 0.250 | -0.250 |" in capsys.readouterr().out
    assert (tmp_path / "run" / "2_eval" / "before_after.md").exists()
