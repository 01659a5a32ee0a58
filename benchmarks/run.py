"""Run the benchmarks: ``python -m benchmarks.run [--suite cpu|gpu|NAME[,NAME]] [--size smoke|full]``.

Writes ``<out>/<date>-<machine>-<suite>-<size>.json`` (every row, with both paths' values and the
agreement checks), PNG plots in ``<out>``, and a Markdown table (path, alignkit, baseline, ratio,
target, met?) to ``benchmarks/RESULTS.md`` (or ``<out>/RESULTS.md`` when ``--out`` is given). The text
of ``benchmarks/analysis.md`` (hand-written explanations of unmet targets) is appended to it.
Exit status 1 when a benchmark raised or a path's values disagree with the baseline's.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_name, _value)  # offline and quiet, before transformers is imported

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks")


def _registry() -> dict:
    from . import (
        gpu,
        suite_dpo,
        suite_generation,
        suite_grpo,
        suite_logprobs,
        suite_memory,
        suite_rl_data,
        suite_scaling,
        suite_sft,
    )

    return {
        "sft": suite_sft.bench_sft_throughput,
        "dpo": suite_dpo.bench_dpo,
        "logprobs": suite_logprobs.bench_logprobs,
        "generation": suite_generation.bench_eval_generation,
        "http": suite_generation.bench_http,
        "grpo": suite_grpo.bench_grpo,
        "data": suite_rl_data.bench_data_loading,
        "memory": suite_memory.bench_memory,
        "scaling": suite_sft.bench_sft_scaling,
        "scaling_rl": suite_scaling.bench_rl_scaling,
        "gpu": gpu.bench_gpu,
    }


SUITES = {"cpu": ["logprobs", "data", "memory", "sft", "dpo", "generation", "http", "grpo", "scaling",
                  "scaling_rl"],
          "gpu": ["gpu"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cpu", help="cpu | gpu | a benchmark name, or several joined by commas")
    p.add_argument("--size", default="smoke", choices=["smoke", "full"])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--machine", default=None, help="machine label in the file name (default: arch-Ncpu[-gpu])")
    return p


def _names(suite: str, registry: dict) -> list[str]:
    names = SUITES.get(suite) or [n.strip() for n in suite.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"benchmarks: unknown benchmark(s) {', '.join(unknown)}; suites: "
                         f"{', '.join(SUITES)}; benchmarks: {', '.join(registry)}")
    return names


def machine_label() -> str:
    import torch

    label = f"{platform.machine()}-{os.cpu_count()}cpu"
    if torch.cuda.is_available():
        label += "-" + torch.cuda.get_device_name(0).replace(" ", "_")
    return label


def run(names: list[str], size: str, out: Path, machine: str) -> dict:
    """Run the named benchmarks; return the results document (also written to ``out``)."""
    import torch
    import transformers
    import trl

    from .common import Context, Row, set_threads

    registry = _registry()
    threads = set_threads()
    ctx = Context(size=size, workdir=Path(tempfile.mkdtemp(prefix="alignkit-bench-")))
    rows, durations, errors = [], {}, {}
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{machine}-{'_'.join(names) if len(names) < 3 else 'all'}-{size}"

    def document() -> dict:
        return {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine, "size": size,
                "benchmarks": names, "threads": threads, "platform": platform.platform(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "trl": trl.__version__, "python": platform.python_version()},
                "model": ("tiny random Llama (2 layers, hidden 32)" if size == "smoke"
                          else "SmolLM2-135M-Instruct fp32"),
                "rows": [r.to_dict() for r in rows], "durations_s": durations, "errors": errors,
                "plot_data": [dataclasses.asdict(p) for p in ctx.plots],
                "total_s": time.perf_counter() - started}

    for i, name in enumerate(names, 1):
        # 1. run one benchmark; an exception becomes an error row, the others still run
        logger.info("[%d/%d] %s (%s) ...", i, len(names), name, size)
        t0 = time.perf_counter()
        try:
            new = registry[name](ctx)
        except Exception as err:
            logger.exception("benchmark %s failed", name)
            errors[name] = f"{type(err).__name__}: {err}"
            new = [Row(f"{name}: FAILED", None, None, "", notes=errors[name][:300])]
        # 2. record and report progress
        durations[name] = time.perf_counter() - t0
        for row in new:
            row.details.setdefault("benchmark", name)
        rows += new
        logger.info("[%d/%d] %s done in %.1fs: %s", i, len(names), name, durations[name],
                    "; ".join(f"{r.path}: ratio {r.ratio:.2f}" if r.ratio else r.path for r in new))
        # 3. save what is measured so far (a killed run keeps its finished benchmarks)
        (out / f"{stem}.json").write_text(json.dumps(document(), indent=1, default=str))
    doc = document()
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    from .report import write_markdown, write_plots

    doc["plots"] = write_plots(ctx.plots, rows, out)
    md = HERE / "RESULTS.md" if out.resolve() == (HERE / "results").resolve() else out / "RESULTS.md"
    write_markdown(doc, md, out / f"{stem}.json", analysis=HERE / "analysis.md")
    logger.info("wrote %s, %s and %d plots; %d rows, %d errors, %.0fs in all", out / f"{stem}.json", md,
                len(doc["plots"]), len(rows), len(errors), doc["total_s"])
    return doc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    names = _names(args.suite, _registry())
    out = Path(args.out) if args.out else HERE / "results"
    doc = run(names, args.size, out, args.machine or machine_label())
    disagree = [r["path"] for r in doc["rows"] if r["agreement"] and not r["agreement"].get("ok", True)]
    for path in disagree:
        logger.error("values disagree: %s", path)
    met = [r for r in doc["rows"] if r["met"] is not None]
    print(f"benchmarks: {len(doc['rows'])} rows, targets met {sum(r['met'] for r in met)}/{len(met)}, "
          f"{len(doc['errors'])} errors, {len(disagree)} disagreements, {doc['total_s']:.0f}s")
    return 1 if doc["errors"] or disagree else 0


if __name__ == "__main__":
    raise SystemExit(main())
