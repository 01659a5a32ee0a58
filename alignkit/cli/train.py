"""``alignkit train RECIPE.yaml [key=value ...] [--print-config]``: run one stage or a chain of stages."""
from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from alignkit.config import RecipeError, load_recipe
from alignkit.data.io import DataError
from alignkit.pipeline import EXIT_INTERRUPTED, run_recipe

EXIT_DATA = 1  # the data is wrong (as `alignkit data check` exits)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit train", description="Run a training recipe (one stage or a chain).")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-6 lora.r=32")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
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
        return run_recipe(recipe)
    except KeyboardInterrupt:
        print("alignkit train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, FileNotFoundError) as e:  # bad or missing data: one line naming file, line and field
        print(f"alignkit train: {e}", file=sys.stderr)
        return EXIT_DATA
