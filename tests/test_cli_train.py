"""alignkit train (alignkit.cli.train): exit codes, --print-config, --restart and the continue command."""
from __future__ import annotations

from alignkit.cli import train
from alignkit.pipeline import StageConfigChanged


def test_main_reports_bad_recipe_with_exit_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\ntrain: {learning_rat: 1}\n")
    assert train.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rat'" in err and "did you mean 'learning_rate'" in err


def test_print_config(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\ndata: {path: a.jsonl}\n")
    assert train.main([str(path), "train.learning_rate=3e-4", "--print-config"]) == 0
    assert "learning_rate: 0.0003" in capsys.readouterr().out



def test_bad_data_is_one_line_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    """A malformed row stops the run before training with the data check's one-line verdict (exit 1)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": 42, "rejected": ["r"]}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"stage: dpo\nmodel: {{name_or_path: {tiny_model_dir}}}\ndata: {{path: {data}}}\n"
                    "train: {max_steps: 1, report_to: none, save_strategy: 'no'}\n")
    assert train.main([str(path), f"output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("alignkit train:")]
    assert "Traceback" not in err and len(ours) == 1  # (transformers' own progress bars may precede it)
    assert f"{data} line 2: fields chosen, rejected:" in ours[0] and "got int" in ours[0] and "got list" in ours[0]


def test_restart_is_passed_on_and_the_continue_command_leaves_it_out(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\ndata: {path: a.jsonl}\n")
    seen = {}
    monkeypatch.setattr(train, "run_recipe", lambda recipe, **kw: seen.update(kw) or 0)
    assert train.main([str(path), "--restart", "train.learning_rate=3e-4", "seed=1"]) == 0
    assert seen == {"restart": True, "command": f"alignkit train {path} train.learning_rate=3e-4 seed=1"}
    assert train.main([str(path)]) == 0 and seen["restart"] is False


def test_changed_config_exits_2_with_the_diff(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\ndata: {path: a.jsonl}\n")

    def refuse(recipe, **kw):
        raise StageConfigChanged("out was run with another config\n  train.seed: 0 -> 7")

    monkeypatch.setattr(train, "run_recipe", refuse)
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == "alignkit train: out was run with another config\n  train.seed: 0 -> 7\n"
