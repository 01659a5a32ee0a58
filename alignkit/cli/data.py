"""``alignkit data check [RECIPE.yaml [key=value ...]] [--data PATH] [options]``: what training would see.

Options come from the recipe's training stage (read with :func:`alignkit.config.load_recipe`, so the
check sees the same data section, template, tokenizer and max length as ``alignkit train``) and are
overridden by flags. Exit status 1 when rows are malformed or none is kept, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer
from trl import DPOConfig, KTOConfig, SFTConfig

from alignkit.config import load_recipe
from alignkit.data import masks
from alignkit.data.check import ON_ERROR, parse_columns, run_check, write_outputs
from alignkit.data.io import write_text_atomic
from alignkit.models import DEFAULT_MODEL, load_tokenizer
from alignkit.train import common, dpo, sft
from alignkit.train.quickstart import materialize_data


def _trl_default(config_class, name: str):
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


KINDS = {"sft": "sft", "dpo": "preference", "reward": "preference", "kto": "unpaired"}  # stage -> data kind
# without a recipe, the max_length the trainers default to (TRL's SFTConfig / DPOConfig)
DEFAULT_MAX_LENGTH = {"sft": _trl_default(SFTConfig, "max_length"),
                      "preference": _trl_default(DPOConfig, "max_length"),
                      "unpaired": _trl_default(KTOConfig, "max_length")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit data check", description=(
        "Check a recipe's training data: rows kept/dropped and why, malformed rows, token lengths. "
        "Exit status 1 when rows are malformed or none is kept."))
    p.add_argument("recipe", nargs="?", help="recipe YAML (its data, model and max_length are used)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    p.add_argument("--stage", default=None, help="which training stage of a chain recipe (default: the first)")
    p.add_argument("--data", help="data file, folder or hub dataset name (overrides the recipe)")
    p.add_argument("--split", default=None)
    p.add_argument("--kind", choices=("preference", "sft", "unpaired"), default=None,
                   help="what the rows are (default: from the recipe's stage; preference without one)")
    p.add_argument("--format", default=None, help="auto | prompt_chosen_rejected | conversational | hh")
    p.add_argument("--columns", default=None, help="column mapping, e.g. prompt=question,chosen=good,rejected=bad")
    p.add_argument("--multi-turn", choices=("drop", "keep"), default=None, help="HH multi-turn rows")
    p.add_argument("--tokenizer", "--model", dest="tokenizer", default=None,
                   help="model (or tokenizer) whose tokenizer measures token lengths; default: the recipe's "
                        f"model, else {DEFAULT_MODEL} (characters when it cannot be loaded)")
    p.add_argument("--max-rows", type=int, default=None, help="read only the first N records")
    p.add_argument("--against", action="append", default=[], metavar="FILE",
                   help="also compare with this eval file (repeatable); the bundled GSM8K, MMLU, AlpacaEval and "
                        "SimpleSafetyTests test sets are always compared")
    p.add_argument("--against-field", default=None,
                   help="the text field of --against files (default: prompt, question or instruction)")
    p.add_argument("--no-contamination", action="store_true", help="skip the eval-set overlap check")
    p.add_argument("--on-error", choices=ON_ERROR, default=None,
                   help="malformed rows: raise (exit 1, as training stops) or drop (left out, as training does "
                        "with data.on_error=drop); default: the recipe's data.on_error, else raise")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--template", default=None, help="prompt template string or bundled prompt name")
    p.add_argument("--keep-over-length", action="store_true", help="count over-length rows, don't drop them")
    p.add_argument("--output", default=None, help="folder for report.md, report.json, lengths.png")
    p.add_argument("--show-rows", type=int, default=0, metavar="N",
                   help="print the first N rows as the recipe's trainer sees them (TRL's template, truncation "
                        "and collation), loss tokens between [[ and ]] (needs a recipe)")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="write those rows (or the first 10) to FILE as HTML, loss tokens highlighted (needs a recipe)")
    return p


def _lookup(obj, dotted: str):
    """``recipe["data"]["path"]`` or ``recipe.data.path``; None when absent."""
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def _first(obj, *names):
    return next((v for v in (_lookup(obj, n) for n in names) if v is not None), None)


def recipe_options(path: str, overrides: list[str], stage: str | None = None) -> dict:
    """Data options of one training stage of a recipe (``quickstart:`` data built into a temp folder)."""
    recipe = load_recipe(path, overrides)
    stages = getattr(recipe, "stages", None)
    if isinstance(stages, dict) and stages:
        stage = stage or next(iter(stages))
        if stage not in stages:
            raise ValueError(f"{path}: no stage {stage!r}; training stages: {', '.join(stages)}")
        recipe = stages[stage]
    stage = stage or _first(recipe, "stage")
    kind = KINDS.get(str(stage))
    if kind is None:
        raise ValueError(f"{path}: the data check covers the {', '.join(KINDS)} stages, not {stage!r}")
    data = _first(recipe, "data")
    data_path = _first(data, "path")
    if isinstance(data_path, str) and data_path.startswith("quickstart:") and not isinstance(data, dict):
        materialize_data(data, Path(tempfile.mkdtemp(prefix="alignkit-data-check-")))
    return {
        "data": _first(data, "path"), "split": _first(data, "split"), "format": _first(data, "format"),
        "columns": _first(data, "columns"), "multi_turn": _first(data, "multi_turn"),
        "template": _first(data, "template"), "kind": kind,
        "tokenizer": _first(recipe, "model.name_or_path", "model.path", "model.name"),
        "max_length": _first(data, "max_length") or _first(recipe, "train.max_length"),
        "max_rows": _first(data, "max_rows"), "on_error": _first(data, "on_error"),
        "decontaminate": _first(data, "decontaminate"),
        "recipe": recipe if hasattr(recipe, "train") else None,  # the StageRecipe, for the trainer's view
    }


def options(args) -> dict:
    """The recipe's options (if one is given) with every flag that was set on top."""
    opts = recipe_options(args.recipe, args.overrides, args.stage) if args.recipe else {}
    cli = {"data": args.data, "split": args.split, "format": args.format, "columns": parse_columns(args.columns),
           "multi_turn": args.multi_turn, "tokenizer": args.tokenizer, "max_length": args.max_length,
           "template": args.template, "kind": args.kind, "max_rows": args.max_rows, "on_error": args.on_error,
           "against": args.against or None, "against_field": args.against_field}
    opts.update({k: v for k, v in cli.items() if v is not None})
    if not opts.get("data"):
        raise ValueError("no data: pass a recipe with a data section, or --data PATH")
    opts["contamination"] = not args.no_contamination
    packed = getattr(opts.get("recipe"), "stage", None) == "sft" and sft.check_max_length(opts["recipe"]) is None
    if not opts.get("max_length") and not (packed and args.max_length is None):  # packed: training drops no row
        opts["max_length"] = DEFAULT_MAX_LENGTH[opts.get("kind") or "preference"]
    if packed and args.max_length is None:
        opts["max_length"] = None
    if isinstance(opts.get("columns"), str):
        opts["columns"] = parse_columns(opts["columns"])
    return opts


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
    try:
        return load_tokenizer(DEFAULT_MODEL)
    except (OSError, ValueError) as exc:
        print(f"alignkit data check: no tokenizer ({exc}); lengths are in characters, no max-length check "
              "(pass --model)", file=sys.stderr)
        return None


def tokenizer_for(name: str | None):
    """A tokenizer-only folder directly; models, GGUF files and hub names through alignkit.models. Without a
    name: the default model's tokenizer, or None (lengths in characters, said on stderr) when it is absent."""
    if not name:
        return _default_tokenizer()
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        return AutoTokenizer.from_pretrained(path)
    return load_tokenizer(name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "check":
        print("usage: alignkit data check [RECIPE.yaml [key=value ...]] [--data PATH] [options]; "
              "see alignkit data check --help", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    args = build_parser().parse_args(argv[1:])
    try:
        opts = options(args)
        report = run_check(opts, tokenizer=tokenizer_for(opts.get("tokenizer")),
                           drop_over_length=not args.keep_over_length)
    except (ValueError, FileNotFoundError) as exc:  # DataError and RecipeError are ValueErrors
        print(f"alignkit data check: {exc}", file=sys.stderr)
        return 1
    print(report.to_markdown())
    for line in report.contamination.lines() if report.contamination is not None else []:
        print(line)
    if args.output:
        print(f"wrote {write_outputs(report, args.output)}/report.md, report.json, lengths.png")
    try:
        report.verdict(opts.get("on_error") or "raise")
        problems = trainer_view(opts, args)
    except ValueError as exc:  # the message training would stop with (MaskError is a ValueError)
        print(f"alignkit data check: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"alignkit data check: {problem}", file=sys.stderr)
    return 1 if problems else 0


def trainer_view(opts: dict, args) -> list[str]:
    """With a recipe's sft or dpo stage: the rows as its trainer sees them, checked (loss masks, cross-document
    attention); the first ``--show-rows`` printed, ``--html`` written. Returns the problems found."""
    recipe, n = opts.get("recipe"), max(0, args.show_rows or 0)
    if recipe is None or recipe.stage not in ("sft", "dpo"):
        if n or args.html:
            raise ValueError("--show-rows/--html need a recipe with an sft or dpo stage (they show what its "
                             "trainer sees)")
        return []
    tokenizer = tokenizer_for(opts.get("tokenizer"))
    if tokenizer is None:  # lengths were counted in characters; no tokens to show or check
        if n or args.html:
            raise ValueError("--show-rows/--html need the recipe's tokenizer (pass --model)")
        return []
    if tokenizer.pad_token is None:  # as common.load_for_training sets it
        tokenizer.pad_token = tokenizer.eos_token
    stage_dir = Path(tempfile.mkdtemp(prefix="alignkit-data-view-"))
    if recipe.stage == "sft":
        rows, problems = sft.trainer_view(recipe, tokenizer, stage_dir)
    else:
        pairs, _ = common.load_split(recipe.data, dpo.preference_loader(recipe, tokenizer, stage_dir), recipe.seed)
        rows = list(masks.dpo_view(dpo.to_trl_pairs(pairs, recipe.data.template), tokenizer, recipe.train))
        problems = masks.mask_problems(rows)
    shown = rows[: 2 * n if recipe.stage == "dpo" else n]
    if n:
        print(f"### First {n} rows as the {recipe.stage} trainer sees them (loss tokens between [[ and ]])\n")
        for row in shown:
            print(f"{masks.describe(row)}\n{masks.render_text(row, tokenizer)}\n")
    if args.html:
        write_text_atomic(args.html, masks.render_html(shown or rows[:10], tokenizer))
        print(f"wrote {args.html}")
    return problems
