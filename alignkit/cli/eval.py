"""``alignkit eval``: score a model on the bundled tasks and/or lm-eval harness tasks.

    alignkit eval --model PATH_OR_NAME --tasks mmlu,gsm8k,alpaca_eval,sst[,over_refusal]
                  [--prompt zero_shot|alpaca|chat] [--limit N] [--output DIR]
                  [--backend hf|vllm|http] [--base-url URL] [--judge SPEC] [--batch-size N]
                  [--max-new-tokens N] [--resume] [--harness mmlu,gsm8k,hellaswag] [--device D]
                  [--timeout S] [--max-retries N] [--max-concurrency N] [--api-key-env NAME] [--task-dir]

Every flag but ``--task-dir`` is generated from a field of :class:`alignkit.eval.config.EvalConfig`
(``base_url`` -> ``--base-url``; its help and default come from the field). A flag the selected path
would not read (``--judge`` with only ``--harness``, ``--timeout`` without ``--backend http``) is
refused. Exit status 2 for usage errors (missing model path, unknown task/style/backend, ignored flag).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

from alignkit.eval.config import EvalConfig, default, problems
from alignkit.eval.harness import task_dir
from alignkit.eval.report import HEADLINE
from alignkit.eval.runner import run_eval_config


def flag(name: str) -> str:
    """``base_url`` -> ``--base-url``."""
    return "--" + name.replace("_", "-")


def _arg_type(hint):
    """The argparse ``type`` of a field hint: ``X | None`` -> X; ``list[str]`` -> str (split by EvalConfig)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return str if typing.get_origin(hint) is list else hint


def build_parser() -> argparse.ArgumentParser:
    """One flag per EvalConfig field; flags not given stay absent (EvalConfig's defaults apply)."""
    p = argparse.ArgumentParser(prog="alignkit eval", argument_default=argparse.SUPPRESS,
                                description="Evaluate a model (CS336 A5 benchmarks, lm-eval tasks).")
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        help_, value = f.metadata["help"], default(f)
        if "choices" in f.metadata:
            help_ += f" One of: {', '.join(f.metadata['choices'])}."
        if hints[f.name] is bool:
            p.add_argument(flag(f.name), action="store_true", help=help_)
            continue
        shown = ",".join(value) if isinstance(value, list) else value
        p.add_argument(flag(f.name), type=_arg_type(hints[f.name]), metavar=f.name.upper(),
                       help=help_ + (f" (default: {shown})" if shown not in (None, "") else ""))
    p.add_argument("--task-dir", action="store_true", help="print the folder of alignkit's lm-eval YAMLs and exit")
    return p


def _check_model(model: str | None, backend: str) -> str | None:
    """An error message for a model path that cannot exist, else None."""
    if not model:
        return "--model is required"
    if backend == "http":
        return None
    looks_like_path = model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path and not Path(model).expanduser().exists():
        return f"model path {model!r} does not exist"
    return None


def usage_error(cfg: EvalConfig) -> str | None:
    """The first usage error of ``cfg`` as the command line spells it, else None."""
    error = _check_model(cfg.model, cfg.backend)
    if error is None and not cfg.tasks and not cfg.harness:
        error = "give --tasks and/or --harness"
    return error or next(iter(problems(cfg, key=flag)), None)


def summary_table(results: dict) -> str:
    """One row per bundled task: headline metric, n, examples/s, tokens/s."""
    lines = [f"{'task':<14} {'metric':<16} {'value':>8} {'n':>6} {'ex/s':>8} {'tok/s':>8}"]
    for task, m in results["metrics"].items():
        key = HEADLINE.get(task, ("n", True))[0]
        value = m.get(key)
        t = results["throughput"][task]
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        lines.append(f"{task:<14} {key:<16} {shown:>8} {m.get('n', ''):>6} {t['examples_per_s']:>8.2f} "
                     f"{t['tokens_per_s']:>8.1f}")
    return "\n".join(lines)


def _print_results(cfg: EvalConfig, results: dict) -> None:
    if cfg.tasks:
        print(summary_table(results))
        print(f"results: {Path(cfg.output) / 'results.json'}")
    for task, metrics in (results.get("harness") or {}).get("results", {}).items():
        print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def main(argv: list[str] | None = None) -> int:
    try:
        values = vars(build_parser().parse_args(argv))
    except SystemExit as exit_:  # argparse printed the usage line (2) or --help (0)
        return int(exit_.code or 0)
    if values.pop("task_dir", False):
        print(task_dir())
        return 0
    cfg = EvalConfig(**values)
    error = usage_error(cfg)
    if error:
        print(f"alignkit eval: {error}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        results = run_eval_config(cfg)
    except (FileNotFoundError, OSError) as err:
        print(f"alignkit eval: {err}", file=sys.stderr)
        return 2
    _print_results(cfg, results)
    return 0
