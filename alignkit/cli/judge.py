"""``alignkit judge ANNOTATIONS.json [--model output_2|output_1] [--l2 X] [--json]``: score an alpaca_eval
annotations file with alignkit's win rate and length-controlled win rate (:mod:`alignkit.eval.judge`).

The file is alpaca_eval's ``annotations.json`` (a JSON list of ``instruction``/``output_1``/``output_2``/
``preference`` records; 1 = output_1 preferred, 2 = output_2, 1.5 = tie, null = not annotated). The model
is ``output_2`` by alpaca_eval's convention (``output_1`` is the reference). Exit status 2 for a missing
or malformed file (the message names the file, line and field) or one without an annotated record.
"""
from __future__ import annotations

import argparse
import json
import sys

from alignkit.eval.judge import (
    ALPACA_EVAL_OUTPUTS,
    read_alpaca_eval_annotations,
    score_alpaca_eval_annotations,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit judge",
                                description="Win rate and length-controlled win rate of an alpaca_eval "
                                            "annotations file.")
    p.add_argument("annotations", help="alpaca_eval annotations file (a JSON list of records)")
    p.add_argument("--model", default="output_2", choices=list(ALPACA_EVAL_OUTPUTS),
                   help="which output is the evaluated model's (default: output_2, alpaca_eval's convention)")
    p.add_argument("--l2", type=float, default=1e-3, help="ridge of the length-controlled GLM (default: 1e-3)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def format_scores(m: dict) -> str:
    """The metrics as a few human-readable lines."""
    return "\n".join([
        f"model: {m['model']} ({m['generator']}); annotators: {', '.join(m['annotators']) or 'none'}",
        (f"annotated: {m['n']} (not annotated: {m['not_annotated']}); "
         f"wins {m['wins']}, ties {m['ties']}, losses {m['losses']}"),
        f"win rate: {100 * m['win_rate']:.2f}%",
        (f"length-controlled win rate: {100 * m['lc_win_rate']:.2f}% (alignkit's GLM: theta {m['theta']:.4f}, "
         f"phi {m['phi']:.4f})"),
    ])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse printed the usage line (2) or --help (0)
        return int(exit_.code or 0)
    try:
        metrics = score_alpaca_eval_annotations(read_alpaca_eval_annotations(args.annotations), model=args.model,
                                                l2=args.l2)
    except (FileNotFoundError, ValueError) as err:
        print(f"alignkit judge: {err}", file=sys.stderr)
        return 2
    if metrics["n"] == 0:
        print(f"alignkit judge: {args.annotations} has no annotated record ({metrics['not_annotated']} with "
              "preference null)", file=sys.stderr)
        return 2
    print(json.dumps(metrics) if args.json else format_scores(metrics))
    return 0
