"""alignkit data check (alignkit.cli.data): exit codes, output files, options read from a recipe."""
from __future__ import annotations

import json

from alignkit.cli import data as data_cli
from alignkit.resources import ROOT as RESOURCES

EXAMPLES = RESOURCES / "examples"
BROKEN = EXAMPLES / "preference_broken.csv"
GPT2 = str(RESOURCES / "tokenizers" / "gpt2")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_main_exit_codes(tmp_path, capsys):
    assert data_cli.main(["check", "--data", str(BROKEN)]) == 1  # a malformed row
    assert "| malformed | 1 |" in capsys.readouterr().out
    clean = _jsonl(tmp_path / "ok.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    assert data_cli.main(["check", "--data", str(clean), "--columns", "prompt=question,chosen=good,rejected=bad"]) == 0
    same = _jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    assert data_cli.main(["check", "--data", str(same)]) == 1  # nothing kept
    assert data_cli.main(["check", "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err
    assert data_cli.main([]) == 2 and data_cli.main(["frobnicate"]) == 2


def test_main_output_files_and_tokenizer(tmp_path):
    out = tmp_path / "report"
    code = data_cli.main(["check", "--data", str(EXAMPLES / "sft_chat.jsonl"), "--kind", "sft", "--output", str(out)])
    assert code == 0
    assert json.loads((out / "report.json").read_text())["rows_kept"] == 3
    assert (out / "report.md").read_text().startswith("## Data check: sft")
    assert (out / "lengths.png").stat().st_size > 0
    assert data_cli.main(["check", "--data", str(BROKEN), "--tokenizer", GPT2, "--max-length", "20",
                 "--output", str(out)]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["unit"] == "tokens" and report["dropped"]["over max length"] == [{"source": str(BROKEN), "line": 3}]


def test_main_reads_a_recipe_through_load_recipe(tmp_path, monkeypatch):
    calls = []

    def load_recipe(path, overrides):
        calls.append((path, overrides))
        return {"stage": "dpo", "data": {"path": str(EXAMPLES / "hh_sample.jsonl"), "multi_turn": "keep"}}

    monkeypatch.setattr(data_cli, "load_recipe", load_recipe)
    out = tmp_path / "o"
    assert data_cli.main(["check", "r.yaml", "train.lr=1", "--output", str(out)]) == 0
    assert calls == [("r.yaml", ["train.lr=1"])]
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "preference" and report["rows_kept"] == 4  # multi_turn keep from the recipe


def test_main_with_a_real_recipe(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"stage: dpo\nmodel: {{name_or_path: {tiny_model_dir}}}\n"
                      f"data: {{path: {EXAMPLES / 'preference_broken.csv'}}}\ntrain: {{max_length: 20}}\n")
    out = tmp_path / "o"
    assert data_cli.main(["check", str(recipe), "--output", str(out)]) == 1  # line 9 is malformed
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["unit"] == "tokens" and report["max_length"] == 20
    assert report["dropped"]["over max length"] == [{"source": str(BROKEN), "line": 3}]
    assert data_cli.main(["check", str(recipe), "data.max_length=1000"]) == 1
    assert "| dropped: over max length |" not in capsys.readouterr().out
    assert data_cli.main(["check", str(recipe), "data.nonsense=1"]) == 1
    assert "nonsense" in capsys.readouterr().err


def test_show_rows_and_html_need_a_recipe(tmp_path, capsys):
    """--show-rows/--html show what a recipe's trainer sees: without a recipe they are refused, not ignored."""
    clean = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    for flags in (["--show-rows", "2"], ["--html", str(tmp_path / "rows.html")]):
        assert data_cli.main(["check", "--data", str(clean), "--tokenizer", GPT2, *flags]) == 1
        assert "--show-rows/--html need a recipe with an sft or dpo stage" in capsys.readouterr().err
    assert not (tmp_path / "rows.html").exists()
