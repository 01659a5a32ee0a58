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
