"""``alignkit`` command line (APP layer): every sub-command's ``main(argv) -> int`` lives in this package.

    alignkit train RECIPE.yaml [key=value ...]     alignkit.cli.train
    alignkit eval --model M --tasks ...            alignkit.cli.eval
    alignkit data check RECIPE.yaml                alignkit.cli.data
    alignkit compare RUN_DIR...                    alignkit.cli.compare
    alignkit merge ADAPTER_DIR OUT_DIR             alignkit.cli.merge
    alignkit judge ANNOTATIONS.json                alignkit.cli.judge
    alignkit leaderboard RUN_DIR... --judge SPEC   alignkit.cli.leaderboard

The benchmarks are not part of the installed package: run ``python -m benchmarks.run`` from a source
checkout (benchmarks/RESULTS.md there has the measured ratios).
"""
from __future__ import annotations

import sys

from alignkit.cli import compare, data, judge, leaderboard, merge, train
from alignkit.cli import eval as eval_cli

# name -> (main function, one-line help)
COMMANDS = {
    "train": (train.main, "run a recipe: alignkit train RECIPE.yaml [key=value ...]"),
    "eval": (eval_cli.main, "score a model: alignkit eval --model M --tasks mmlu,gsm8k,..."),
    "data": (data.main, "inspect data: alignkit data check RECIPE.yaml"),
    "compare": (compare.main, "compare eval runs side by side: alignkit compare RUN_DIR..."),
    "merge": (merge.main, "merge a LoRA adapter into its base: alignkit merge ADAPTER_DIR OUT_DIR"),
    "judge": (judge.main, "score an alpaca_eval annotations file: alignkit judge ANNOTATIONS.json"),
    "leaderboard": (leaderboard.main, "rank runs by judged AlpacaEval pairs: alignkit leaderboard RUN_DIR..."),
}


def usage() -> str:
    lines = ["usage: alignkit COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"alignkit: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(COMMANDS[name][0](rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
