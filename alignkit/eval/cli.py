"""``alignkit eval``: score a model on the bundled tasks and/or lm-eval harness tasks.

    alignkit eval --model PATH_OR_NAME --tasks mmlu,gsm8k,alpaca_eval,sst[,over_refusal]
                  [--prompt zero_shot|alpaca|chat] [--limit N] [--output DIR]
                  [--backend hf|vllm|http] [--base-url URL] [--judge SPEC] [--batch-size N]
                  [--max-new-tokens N] [--resume] [--harness mmlu,gsm8k,hellaswag] [--task-dir]

Exit status 2 for usage errors (missing model path, unknown task/style/backend).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("alignkit.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit eval", description="Evaluate a model (CS336 A5 benchmarks).")
    p.add_argument("--model", help="model folder, hub name, .gguf file, or served model name (--backend http)")
    p.add_argument("--tasks", default=None, help="comma-separated: mmlu,gsm8k,alpaca_eval,sst,over_refusal")
    p.add_argument("--prompt", default="zero_shot", help="prompt style: zero_shot | alpaca | chat")
    p.add_argument("--limit", type=int, default=None, help="examples per task (MMLU: seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="eval_out", help="output folder (default: eval_out)")
    p.add_argument("--backend", default="hf", help="hf | vllm | http")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--judge", default=None,
                   help="judge model: 'self', or a generator spec (hf:PATH, vllm:PATH, http://HOST:PORT/v1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's default")
    p.add_argument("--resume", action="store_true", help="skip examples already in predictions.jsonl")
    p.add_argument("--harness", default=None, help="lm-eval tasks to run, e.g. mmlu,gsm8k,hellaswag,alignkit_gsm8k")
    p.add_argument("--device", default=None, help="device for --harness (default: cuda if available, else cpu)")
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


def summary_table(results: dict) -> str:
    from alignkit.eval.report import HEADLINE

    lines = [f"{'task':<14} {'metric':<16} {'value':>8} {'n':>6} {'ex/s':>8} {'tok/s':>8}"]
    for task, m in results["metrics"].items():
        key = HEADLINE.get(task, ("n", True))[0]
        value = m.get(key)
        t = results["throughput"][task]
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        lines.append(f"{task:<14} {key:<16} {shown:>8} {m.get('n', ''):>6} {t['examples_per_s']:>8.2f} "
                     f"{t['tokens_per_s']:>8.1f}")
    return "\n".join(lines)


def _run(args) -> int:
    from alignkit.eval.runner import run_eval

    results = run_eval(args.model, args.tasks, args.output, limit=args.limit, prompt=args.prompt,
                       backend=args.backend, judge=args.judge, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, resume=args.resume, seed=args.seed, base_url=args.base_url)
    print(summary_table(results))
    print(f"results: {Path(args.output) / 'results.json'}")
    return 0


def _run_harness(args) -> int:
    from alignkit.eval.harness import run_harness

    results = run_harness(args.model, args.harness.split(","), Path(args.output) / "harness", limit=args.limit,
                          batch_size=args.batch_size, device=args.device)
    for task, metrics in results["results"].items():
        print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.task_dir:
        from alignkit.eval.harness import TASK_DIR

        print(TASK_DIR)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    error = _check_model(args.model, args.backend)
    if error is None and args.backend not in ("hf", "vllm", "http"):
        error = f"unknown --backend {args.backend!r}; valid: hf, vllm, http"
    if error is None and not args.tasks and not args.harness:
        error = "give --tasks and/or --harness"
    if error is None and args.tasks:
        from alignkit.eval.tasks import STYLES, parse_task_list

        try:
            parse_task_list(args.tasks)
        except KeyError as err:
            error = err.args[0]
        if args.prompt not in STYLES:
            error = f"unknown --prompt {args.prompt!r}; valid: {', '.join(STYLES)}"
    if error:
        print(f"alignkit eval: {error}", file=sys.stderr)
        return 2
    try:
        rc = _run(args) if args.tasks else 0
        return _run_harness(args) if args.harness and rc == 0 else rc
    except (FileNotFoundError, OSError) as err:
        print(f"alignkit eval: {err}", file=sys.stderr)
        return 2
