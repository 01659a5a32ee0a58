"""`alignkit` command line: a thin dispatcher.

Each sub-command lives in the module that owns it and exposes ``main(argv) -> int``; this file
only routes, so importing the CLI stays cheap (no torch import until a command runs).
"""
from __future__ import annotations

import importlib
import sys

# name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("alignkit.pipeline", "run a recipe: alignkit train RECIPE.yaml [key=value ...]"),
    "eval": ("alignkit.eval.cli", "score a model: alignkit eval --model M --tasks mmlu,gsm8k,..."),
    "data": ("alignkit.data.check", "inspect data: alignkit data check RECIPE.yaml"),
    "compare": ("alignkit.eval.report", "compare eval runs side by side: alignkit compare RUN_DIR..."),
    "merge": ("alignkit.models", "merge a LoRA adapter into its base: alignkit merge ADAPTER_DIR OUT_DIR"),
    "bench": ("benchmarks.run", "run the benchmarks: alignkit bench [--suite cpu] [--size smoke]"),
}


def _usage() -> str:
    lines = ["usage: alignkit COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"alignkit: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
