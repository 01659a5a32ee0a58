"""alignkit train (alignkit.cli.train): exit codes and --print-config."""
from __future__ import annotations

from alignkit.cli import train


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

