"""``alignkit leaderboard``: three fake run folders judged by a scripted judge whose verdicts are known,
so the battles (and their Bradley-Terry ratings) are computed here by hand; the verdict cache makes a rerun
ask the judge nothing."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from conftest import ReplyGenerator

from alignkit import resources
from alignkit.cli import leaderboard as leaderboard_cli
from alignkit.eval.judge import Judge, JudgeError
from alignkit.eval.leaderboard import bradley_terry, run_leaderboard
from alignkit.eval.runner import run_eval
from alignkit.generation.base import Completion

# quality of each run's answer to instruction i; the judge prefers the higher quality, answers "[[A]]"
# (the first position) on equal quality, so the two orders disagree and the battle is a tie, and gives
# no verdict at all when an answer has quality 0.
QUALITY = {
    "strong": [3, 3, 2, 3, 1, 3],
    "mid": [2, 2, 2, 1, 2, 0],
    "weak": [1, 2, 1, 1, 3, 1],
}
INSTRUCTIONS = [f"Instruction number {i}: explain topic {i}." for i in range(6)]


class ScriptedJudge:
    """A Generator stand-in that reads both outputs' quality from the pairwise prompt."""

    def __init__(self, invalid: bool = False):
        self.name, self.prompts, self.calls, self.invalid = "scripted-judge", [], 0, invalid

    def verdict(self, prompt: str) -> str:
        qa, qb = (int(q) for q in re.findall(r"# Output \([ab]\):\n\S+ quality=(\d)", prompt))
        if self.invalid or 0 in (qa, qb):
            return "I cannot decide."
        return "[[B]]" if qb > qa else "[[A]]"

    def generate(self, prompts, params):
        self.calls += 1
        self.prompts += list(prompts)
        return [Completion(self.verdict(p)) for p in prompts]

    def chat(self, conversations, params):
        return self.generate([c[-1]["content"] for c in conversations], params)

    def update_weights(self, model):
        pass


def write_run(root: Path, name: str, quality: list[int], instructions=INSTRUCTIONS, official=False) -> Path:
    folder = root / name / "alpaca_eval"
    folder.mkdir(parents=True)
    outputs = [f"{name}-answer-{i} quality={q}" for i, q in enumerate(quality)]
    if official:  # the alpaca_eval CLI's format only
        rows = [{"instruction": ins, "output": out, "generator": name, "dataset": "x"}
                for ins, out in zip(instructions, outputs)]
        (folder / "alpaca_eval_outputs.json").write_text(json.dumps(rows))
    else:
        rows = [{"id": str(i), "example": {"instruction": ins, "reference": "ref"}, "output": out}
                for i, (ins, out) in enumerate(zip(instructions, outputs))]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / name


def expected_battles(names: list[str]) -> list[tuple[str, str, float]]:
    """By hand from the script: a wins (1) / loses (0) on higher / lower quality, ties (0.5) on equal,
    no battle when a quality is 0."""
    battles = []
    for a, b in itertools.combinations(names, 2):
        for qa, qb in zip(QUALITY[a], QUALITY[b]):
            if 0 not in (qa, qb):
                battles.append((a, b, 1.0 if qa > qb else 0.0 if qa < qb else 0.5))
    return battles


@pytest.fixture
def run_dirs(tmp_path):
    return [write_run(tmp_path / "runs", name, q) for name, q in QUALITY.items()]


def test_ranking_ratings_and_tallies_follow_the_script(run_dirs, tmp_path):
    script = ScriptedJudge()
    board = run_leaderboard(run_dirs, Judge(script), tmp_path / "lb", n_bootstrap=200)
    assert [r["model"] for r in board.table] == ["strong", "mid", "weak"] and [r["rank"] for r in board.table] == [1, 2, 3]
    battles = expected_battles(list(QUALITY))
    assert len(battles) == 16  # 3 pairs x 6 instructions, less mid's unjudgeable answer in two pairs
    expected = bradley_terry(battles)
    for row in board.table:
        assert row["rating"] == pytest.approx(expected[row["model"]], abs=1e-9)
        assert row["lo"] <= row["rating"] <= row["hi"]
    # strong: 3W 1T 1L vs mid, 5W 1L vs weak; mid: 1W 1T 3L vs strong, 2W 2T 1L vs weak
    tally = {r["model"]: (r["games"], r["wins"], r["ties"], r["losses"]) for r in board.table}
    assert tally == {"strong": (11, 8, 1, 2), "mid": (10, 3, 3, 4), "weak": (11, 2, 2, 7)}
    assert board.invalid == 2 and board.examples == 6
    assert len(script.prompts) == 36  # every pair, every instruction, both orders: asked once each
    assert all(p.count("# Output (a):") == 1 for p in script.prompts)


def test_both_orders_are_asked(run_dirs, tmp_path):
    script = ScriptedJudge()
    run_leaderboard(run_dirs[:2], Judge(script), tmp_path / "lb", n_bootstrap=50)
    firsts = [re.search(r"# Output \(a\):\n(\S+)-answer-(\d)", p).groups() for p in script.prompts]
    assert sorted(firsts) == sorted((n, str(i)) for n in ("strong", "mid") for i in range(6))


def test_rerun_reuses_every_verdict_and_writes_the_same_table(run_dirs, tmp_path):
    out = tmp_path / "lb"
    run_leaderboard(run_dirs, Judge(ScriptedJudge()), out, n_bootstrap=100)
    first = json.loads((out / "leaderboard.json").read_text())
    again = ScriptedJudge()
    board = run_leaderboard(run_dirs, Judge(again), out, n_bootstrap=100)
    assert again.calls == 0 and again.prompts == [] and board.new_verdicts == 0
    assert json.loads((out / "leaderboard.json").read_text()) == first
    # a fourth run: only its three new pairs are judged (6 instructions x 2 orders each)
    quality_new = [2, 1, 3, 2, 2, 2]
    fourth = write_run(tmp_path / "runs", "new", quality_new)
    more = ScriptedJudge()
    board = run_leaderboard([*run_dirs, fourth], Judge(more), out, n_bootstrap=100)
    assert len(more.prompts) == 36 and board.new_verdicts == 36
    assert all("new-answer" in p for p in more.prompts)
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 72


def test_files_written(run_dirs, tmp_path):
    import matplotlib.image

    out = tmp_path / "lb"
    board = run_leaderboard(run_dirs, Judge(ScriptedJudge()), out, n_bootstrap=100)
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["judge"] == "scripted-judge" and data["battles"] == 16 and data["invalid_judgments"] == 2
    assert [r["model"] for r in data["table"]] == ["strong", "mid", "weak"]
    md = (out / "leaderboard.md").read_text()
    top = board.table[0]
    assert f"| 1 | strong | {top['rating']:.1f} | [{top['lo']:.1f}, {top['hi']:.1f}] | 11 | 8 | 1 | 2 |" in md
    battles = [json.loads(x) for x in (out / "battles.jsonl").read_text().splitlines()]
    assert [(b["model_a"], b["model_b"], b["outcome"]) for b in battles if b["outcome"] is not None] == \
        expected_battles(list(QUALITY))
    img = matplotlib.image.imread(out / "leaderboard.png")
    assert img.ndim == 3 and img.shape[0] > 100


def test_official_outputs_file_is_read_too(tmp_path):
    dirs = [write_run(tmp_path / "runs", "strong", QUALITY["strong"], official=True),
            write_run(tmp_path / "runs", "weak", QUALITY["weak"])]
    board = run_leaderboard(dirs, Judge(ScriptedJudge()), tmp_path / "lb", n_bootstrap=50)
    assert [r["model"] for r in board.table] == ["strong", "weak"]
    assert board.table[0]["rating"] == pytest.approx(bradley_terry(expected_battles(["strong", "weak"]))["strong"])


def test_runs_without_shared_instructions_are_refused(run_dirs, tmp_path):
    short = write_run(tmp_path / "other", "short", [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"do not share their instructions: ids only in 'strong': 5; only in 'short'"):
        run_leaderboard([run_dirs[0], short], Judge(ScriptedJudge()), tmp_path / "lb")
    other = write_run(tmp_path / "other", "other", [1] * 6, instructions=[*INSTRUCTIONS[:3], "else", *INSTRUCTIONS[4:]])
    with pytest.raises(ValueError, match="example id 3: runs 'strong' and 'other' have different instructions"):
        run_leaderboard([run_dirs[0], other], Judge(ScriptedJudge()), tmp_path / "lb")
    with pytest.raises(FileNotFoundError, match="no alpaca_eval/predictions.jsonl"):
        run_leaderboard([run_dirs[0], tmp_path], Judge(ScriptedJudge()), tmp_path / "lb")


def test_cli_builds_the_judge_from_the_spec(run_dirs, tmp_path, monkeypatch, capsys):
    script, specs = ScriptedJudge(), []
    monkeypatch.setattr(leaderboard_cli, "make_generator", lambda spec: specs.append(spec) or script)
    args = [*map(str, run_dirs), "--judge", "hf:some/judge", "--output", str(tmp_path / "lb"), "--bootstrap", "50"]
    assert leaderboard_cli.main(args) == 0
    out = capsys.readouterr().out
    assert specs == ["hf:some/judge"] and "| 1 | strong |" in out and "36 new judge verdicts" in out
    assert leaderboard_cli.main(args) == 0 and "0 new judge verdicts" in capsys.readouterr().out
    assert len(script.prompts) == 36
    # default output: leaderboard/ beside the first run
    assert leaderboard_cli.main([*map(str, run_dirs[:2]), "--judge", "x", "--bootstrap", "20"]) == 0
    assert (run_dirs[0].parent / "leaderboard" / "leaderboard.md").exists()


def test_cli_errors_exit_2(run_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(leaderboard_cli, "make_generator", lambda spec: ScriptedJudge(invalid=True))
    assert leaderboard_cli.main([*map(str, run_dirs), "--judge", "x", "--output", str(tmp_path / "lb")]) == 2
    assert "no valid pairwise verdict" in capsys.readouterr().err
    assert leaderboard_cli.main([str(run_dirs[0]), "--judge", "x", "--output", str(tmp_path / "lb")]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert leaderboard_cli.main([*map(str, run_dirs), "--judge", "x", "--bootstrap", "0"]) == 2
    assert "n_bootstrap must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(JudgeError):
        run_leaderboard(run_dirs, Judge(ScriptedJudge(invalid=True)), tmp_path / "lb2")


def test_on_real_eval_run_folders(tmp_path):
    """Folders written by run_eval itself (generation only, no judge during eval)."""
    dirs = []
    for name, q in (("base", 1), ("sft", 2), ("dpo", 3)):
        reply = lambda p, name=name, q=q: f"{name}-answer quality={q}"
        run_eval(ReplyGenerator(reply, name), ["alpaca_eval"], str(tmp_path / name), limit=3)
        dirs.append(tmp_path / name)
    script = ScriptedJudge()
    board = run_leaderboard(dirs, Judge(script), tmp_path / "lb", n_bootstrap=50)
    assert [r["model"] for r in board.table] == ["dpo", "sft", "base"]
    assert board.examples == 3 and len(script.prompts) == 18
    instructions = [json.loads(x)["instruction"] for x in
                    (resources.data_path("alpaca_eval", "alpaca_eval.jsonl")).read_text().splitlines()[:3]]
    assert all(any(f"# Instruction:\n{ins}\n" in p for p in script.prompts) for ins in instructions)
