"""``alignkit train RECIPE.yaml [key=value ...] [--restart] [--print-config]``: run one stage or a chain.

Rerunning the same command continues where it stopped (docs/resume.md); ``--restart`` starts over."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

import yaml

from alignkit.config import RecipeError, load_recipe
from alignkit.data.io import DataError
from alignkit.eval.runner import EvalIncomplete, SettingsChanged
from alignkit.pipeline import EXIT_INTERRUPTED, StageConfigChanged, run_recipe

EXIT_DATA = 1  # the data is wrong (as `alignkit data check` exits)
EXIT_INCOMPLETE = 4  # as `alignkit eval`: some eval examples failed, every other one is saved


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit train", description="Run a training recipe (one stage or a chain). "
                                "Rerunning the same command continues an interrupted stage from its newest "
                                "checkpoint and skips finished ones.")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-6 lora.r=32")
    p.add_argument("--restart", action="store_true",
                   help="start over: the first step whose config changed (else the first step) and every later "
                        "one train again; each old folder is kept as <folder>.prev (an older .prev is replaced)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def continue_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the same recipe and overrides, without ``--restart``."""
    return shlex.join(["alignkit", "train", args.recipe, *args.overrides])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # flags anywhere
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"alignkit train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict(), default=str)), sort_keys=False))
        return 0
    try:
        return run_recipe(recipe, restart=args.restart, command=continue_command(args))
    except (StageConfigChanged, SettingsChanged) as e:  # a rerun that would mix two configs: the diff
        print(f"alignkit train: {e}", file=sys.stderr)
        return 2
    except EvalIncomplete as e:  # the eval step's failed examples are recorded; a rerun retries only them
        print(f"alignkit train: eval step: {e}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        print(f"alignkit train: interrupted (no checkpoint written by this stop); rerun to continue from the "
              f"newest checkpoint: {continue_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, FileNotFoundError) as e:  # bad or missing data: one line naming file, line and field
        print(f"alignkit train: {e}", file=sys.stderr)
        return EXIT_DATA
