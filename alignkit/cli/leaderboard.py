"""``alignkit leaderboard RUN_DIR... --judge SPEC [--output DIR] [--names a,b,c] [--bootstrap N] [--seed S]``:
rank eval runs by their AlpacaEval outputs, judged pairwise.

Every pair of runs is judged on their shared AlpacaEval instructions in both orders (the runs must
have answered the same instructions: same ids, same text). Each example gives one battle per pair
(a win, a loss, or a tie when the two orders disagree); Bradley-Terry ratings on the Elo scale with
95% bootstrap intervals rank the runs. Written into ``--output`` (default: ``leaderboard/`` beside
the first run): ``leaderboard.md``, ``leaderboard.json``, ``leaderboard.png``, ``battles.jsonl`` and
``verdicts.jsonl``, the verdict cache a rerun reads so that no judge call is repeated.

``--judge`` takes a generator spec: ``hf:PATH``, ``vllm:PATH`` or ``http(s)://HOST:PORT/v1#MODEL``.
Exit status: 0 done, 2 usage or data error (missing outputs, runs without shared instructions, a judge
that gave no valid verdict).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.eval.judge import Judge, JudgeError
from alignkit.eval.leaderboard import run_leaderboard
from alignkit.generation.factory import SPEC_FORMS, make_generator

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit leaderboard",
                                description="Rank eval runs by pairwise-judged AlpacaEval outputs (Bradley-Terry).")
    p.add_argument("runs", nargs="+", help="output folders of `alignkit eval --tasks alpaca_eval` (two or more)")
    p.add_argument("--judge", required=True, help=f"judge model, a generator spec: {SPEC_FORMS}")
    p.add_argument("--output", default=None, help="folder for the table, plot and verdict cache "
                                                  "(default: leaderboard/ beside the first run)")
    p.add_argument("--names", default=None, help="comma-separated labels for the runs (default: folder names)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicas of the rating intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p


def default_output(first_run: Path) -> Path:
    """``leaderboard/`` beside the first run folder (``runs/eval_base`` -> ``runs/leaderboard``)."""
    return first_run.resolve().parent / "leaderboard"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dirs = [Path(r) for r in args.runs]
    names = args.names.split(",") if args.names else None
    out = Path(args.output) if args.output else default_output(dirs[0])
    try:
        judge = Judge(make_generator(args.judge))
        board = run_leaderboard(dirs, judge, out, names=names, n_bootstrap=args.bootstrap, seed=args.seed)
    except (FileNotFoundError, ValueError, JudgeError) as err:
        print(f"alignkit leaderboard: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(board.markdown())
    print(f"{board.new_verdicts} new judge verdicts ({out / 'verdicts.jsonl'} holds them all)")
    print(f"wrote {out / 'leaderboard.md'}, {out / 'leaderboard.json'} and {out / 'leaderboard.png'}")
    return 0
