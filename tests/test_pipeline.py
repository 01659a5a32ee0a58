"""Pipeline: chains, restart at the first unfinished stage, recorded-config refusal, --restart/.prev, resume=false,
interrupt message, eval before/after table and checks."""
from __future__ import annotations

import json
import types
from dataclasses import dataclass, field

import pytest

from alignkit import pipeline
from alignkit.config import load_recipe
from alignkit.train import STAGES, common
from alignkit.train.callbacks import CHECKPOINT_MARKER


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


# ------------------------------------------------------------------------------------------------
# rerun with another config: refuse with the diff, --restart keeps .prev, resume=false starts over
# ------------------------------------------------------------------------------------------------
def _single(tmp_path, *extra):
    path = tmp_path / "one.yaml"
    path.write_text("stage: sft\nmodel: {name_or_path: base-model}\ndata: {path: a.jsonl}\n")
    return load_recipe(path, [f"output_dir={tmp_path / 'run'}", *extra])


def test_finished_stage_with_the_same_config_is_skipped(tmp_path, fake_stages, caplog):
    assert pipeline.run_recipe(_single(tmp_path)) == 0 and fake_stages == [("sft", None)]
    fake_stages.clear()
    caplog.set_level("INFO", logger="alignkit.pipeline")
    assert pipeline.run_recipe(_single(tmp_path, "resume=false")) == 0  # resume is not compared
    assert fake_stages == []
    assert "step sft already done with the same config" in caplog.text


def test_changed_config_refuses_with_one_line_per_key(tmp_path, fake_stages):
    assert pipeline.run_recipe(_single(tmp_path)) == 0
    fake_stages.clear()
    with pytest.raises(pipeline.StageConfigChanged) as info:
        pipeline.run_recipe(_single(tmp_path, "train.seed=7", "data.path=b.jsonl"))
    run = tmp_path / "run"
    lines = str(info.value).splitlines()
    assert lines[0] == f"{run} was run with another config (2 key(s) changed, recorded -> now):"
    assert lines[1:3] == ['  data.path: "a.jsonl" -> "b.jsonl"', "  train.seed: 0 -> 7"]
    assert lines[3] == (f"rerun with --restart to start over (the old folder is kept as {run}.prev), "
                        f"or give a new output_dir")
    assert fake_stages == [] and (run / "DONE").exists()  # nothing ran, nothing moved


def test_restart_keeps_the_old_folder_as_prev_replacing_an_older_one(tmp_path, fake_stages):
    run = tmp_path / "run"
    assert pipeline.run_recipe(_single(tmp_path)) == 0
    (run / "first.txt").write_text("1")
    assert pipeline.run_recipe(_single(tmp_path, "train.seed=7"), restart=True) == 0
    assert (run / "DONE").exists() and (run.with_name("run.prev") / "first.txt").read_text() == "1"
    (run / "second.txt").write_text("2")
    assert pipeline.run_recipe(_single(tmp_path, "train.seed=7"), restart=True) == 0  # same config: over again
    prev = run.with_name("run.prev")
    assert (prev / "second.txt").exists() and not (prev / "first.txt").exists()
    assert fake_stages == [("sft", None)] * 3


def test_chain_restart_starts_at_the_first_changed_stage(tmp_path, fake_stages):
    assert pipeline.run_recipe(_chain(tmp_path)) == 0
    fake_stages.clear()
    with pytest.raises(pipeline.StageConfigChanged, match="2_dpo was run with another config"):
        pipeline.run_recipe(_chain(tmp_path, "dpo.train.seed=3"))
    assert pipeline.run_recipe(_chain(tmp_path, "dpo.train.seed=3"), restart=True) == 0
    run = tmp_path / "run"
    assert fake_stages == [("dpo", str(run / "1_sft" / "model"))]  # sft kept
    assert (run / "2_dpo.prev" / "DONE").exists() and not (run / "1_sft.prev").exists()


def test_unfinished_stage_without_a_checkpoint_takes_the_new_config(tmp_path, fake_stages):
    with pytest.raises(RuntimeError, match="sft failed"):
        pipeline.run_recipe(_single(tmp_path, "train.fail=true"))
    assert pipeline.run_recipe(_single(tmp_path)) == 0  # nothing to lose: starts over, old folder kept
    assert (tmp_path / "run.prev" / "resolved_config.yaml").exists()


def test_unfinished_stage_with_a_checkpoint_refuses_a_new_config(tmp_path, fake_stages):
    code = pipeline.run_recipe(_single(tmp_path, "train.interrupt=true"))
    assert code == pipeline.EXIT_INTERRUPTED
    attempt = common.start_attempt(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / CHECKPOINT_MARKER).write_text(json.dumps({"attempt": attempt, "step": 2}))
    with pytest.raises(pipeline.StageConfigChanged, match="train.interrupt: true -> false"):
        pipeline.run_recipe(_single(tmp_path))


def test_resume_false_starts_an_interrupted_stage_over(tmp_path, fake_stages):
    assert pipeline.run_recipe(_single(tmp_path, "train.interrupt=true")) == pipeline.EXIT_INTERRUPTED
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert pipeline.run_recipe(_single(tmp_path, "train.interrupt=true", "resume=false")) == 130
    assert (tmp_path / "run.prev" / "metrics.jsonl").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_interrupt_message_names_checkpoint_and_command(tmp_path, monkeypatch, capsys):
    mod = _fake_module("sft")
    monkeypatch.setitem(STAGES, "sft", mod)
    monkeypatch.setattr(mod, "run", lambda recipe, d, m: {"interrupted": True, "global_step": 4,
                                                          "checkpoint": str(d / "checkpoint-4")})
    code = pipeline.run_recipe(_single(tmp_path), command="alignkit train one.yaml output_dir=run")
    assert code == 130
    err = capsys.readouterr().err.splitlines()
    assert err == [f"alignkit train: sft interrupted at step 4; checkpoint {tmp_path / 'run' / 'checkpoint-4'}",
                   "continue with: alignkit train one.yaml output_dir=run"]
