"""``alignkit eval``: score a model on the bundled tasks and/or lm-eval harness tasks.

    alignkit eval --model PATH_OR_NAME --tasks mmlu,gsm8k,alpaca_eval,sst[,over_refusal]
                  [--prompt zero_shot|alpaca|chat] [--limit N] [--output DIR]
                  [--backend hf|vllm|http] [--base-url URL] [--judge SPEC] [--batch-size N]
                  [--max-new-tokens N] [--resume | --fresh] [--harness mmlu,gsm8k,hellaswag] [--device D]
                  [--http-timeout S] [--http-retries N] [--http-retry-timeouts] [--concurrency N]
                  [--api-key-env NAME] [--task-dir]

Every flag but ``--task-dir`` is generated from a field of :class:`alignkit.eval.config.EvalConfig`
(``base_url`` -> ``--base-url``; its help and default come from the field; ``--timeout``,
``--max-retries`` and ``--max-concurrency`` are accepted as the old spellings of ``--http-timeout``,
``--http-retries`` and ``--concurrency``). A flag the selected path would not read (``--judge`` with
only ``--harness``, ``--http-timeout`` without ``--backend http``) is refused.

A rerun continues (finished examples are kept and skipped); ``--fresh`` starts over, moving the old
files aside. Exit status (:data:`EXIT_CODES`): 0 done; 2 usage error (missing model path, unknown
task/style/backend, ignored flag, settings that differ from the recorded predictions' without
``--fresh``); 3 a generation request failed for good on a whole batch (server down, 401, redirect: one
line with the URL, credentials redacted, and the request); 4 the run finished but some examples
failed (each recorded in ``<output>/<task>/failures.jsonl``; rerun to retry them); 130 Ctrl-C (one
line: how many examples are saved and the command that continues).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import types
import typing
from pathlib import Path

from alignkit.eval.config import EvalConfig, default, problems
from alignkit.eval.harness import task_dir
from alignkit.eval.report import HEADLINE, PredictionLog
from alignkit.eval.runner import EvalIncomplete, SettingsChanged, run_eval_config
from alignkit.eval.tasks import parse_task_list
from alignkit.generation.openai_http import GenerationHTTPError

EXIT_OK, EXIT_USAGE, EXIT_HTTP, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
EXIT_CODES = {EXIT_OK: "done", EXIT_USAGE: "usage error", EXIT_HTTP: "generation request failed",
              EXIT_INCOMPLETE: "some examples failed", EXIT_INTERRUPTED: "interrupted (Ctrl-C)"}
ALIASES = {"http_timeout": "--timeout", "http_retries": "--max-retries", "concurrency": "--max-concurrency"}


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
        names = [flag(f.name), *([ALIASES[f.name]] if f.name in ALIASES else [])]
        if _arg_type(hints[f.name]) is bool:  # bool and bool | None: a switch
            p.add_argument(*names, dest=f.name, action="store_true", help=help_)
            continue
        shown = ",".join(value) if isinstance(value, list) else value
        p.add_argument(*names, dest=f.name, type=_arg_type(hints[f.name]), metavar=f.name.upper(),
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


def continue_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments without ``--fresh``."""
    return shlex.join(["alignkit", "eval", *(a for a in argv if a != "--fresh")])


def saved_examples(cfg: EvalConfig) -> dict[str, int]:
    """Examples saved so far per bundled task (lines of <output>/<task>/predictions.jsonl)."""
    out = {}
    for name in parse_task_list(cfg.tasks) if cfg.tasks else []:
        path = Path(cfg.output) / name / "predictions.jsonl"
        out[name] = len(PredictionLog(path).read()) if path.exists() else 0
    return out


def _interrupted(cfg: EvalConfig, argv: list[str]) -> int:
    saved = saved_examples(cfg)
    per_task = ", ".join(f"{k} {v}" for k, v in saved.items())
    print(f"alignkit eval: interrupted; {sum(saved.values())} examples saved in {cfg.output}"
          + (f" ({per_task})" if per_task else "") + f"; continue with: {continue_command(argv)}",
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _run(cfg: EvalConfig, argv: list[str]) -> int:
    """run_eval_config with every way it can end mapped to one line and an exit code."""
    try:
        results = run_eval_config(cfg)
    except KeyboardInterrupt:
        return _interrupted(cfg, argv)
    except SettingsChanged as err:
        print(f"alignkit eval: {err}", file=sys.stderr)
        return EXIT_USAGE
    except GenerationHTTPError as err:
        hint = (f" (the key is read from ${cfg.api_key_env}: is it set? --api-key-env NAME)"
                if " HTTP 401" in str(err) or " HTTP 403" in str(err) else "")
        print(f"alignkit eval: generation failed: {err}{hint}; finished examples are saved, rerun the same "
              "command to continue", file=sys.stderr)
        return EXIT_HTTP
    except EvalIncomplete as err:
        _print_results(cfg, err.results)
        print(f"alignkit eval: incomplete: {err}; rerun the same command to retry them", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (FileNotFoundError, OSError) as err:
        print(f"alignkit eval: {err}", file=sys.stderr)
        return EXIT_USAGE
    _print_results(cfg, results)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        return EXIT_USAGE
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return _run(cfg, argv)
