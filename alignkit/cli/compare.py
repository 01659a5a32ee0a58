"""``alignkit compare RUN_DIR... [--output DIR] [--samples N] [--names a,b] [--seed S]
[--fail-on-regression TASK/METRIC=DELTA ...]``: eval runs side by side, with n and 95% intervals.

Every value is shown with its n and a 95% interval: Wilson for proportions (accuracy, format_rate,
proportion_safe, refusal_rate: the run's own counts), a seeded percentile bootstrap over the
per-example judgments in the run folder for win rates. A metric a run did not measure is written
"not measured" (and left as a labelled gap in the chart), never 0.

``--fail-on-regression gsm8k/accuracy=0.02`` (repeatable, or comma-separated) gates a CI: the LAST
run is compared with the FIRST and the command exits 1 when the metric got worse by more than DELTA
(worse = lower for higher-is-better metrics, higher for refusal_rate). Exit status: 0 no regression,
1 regression, 2 usage or data error (a missing results.json, an unknown metric, or a metric the
first or the last run did not measure).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.eval.report import compared_metrics, load_run, write_comparison

EXIT_REGRESSION = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit compare", description="Compare eval runs side by side.")
    p.add_argument("runs", nargs="+", help="output folders of `alignkit eval` (each has results.json)")
    p.add_argument("--output", default=None, help="where to write comparison.md/.png/.json (default: first run dir)")
    p.add_argument("--samples", type=int, default=3, help="sampled wrong/unsafe examples per run and task")
    p.add_argument("--names", default=None, help="comma-separated labels for the runs (default: folder names)")
    p.add_argument("--seed", type=int, default=0, help="seed of the win-rate bootstrap intervals")
    known = ", ".join(f"{t}/{m}" for t, m in compared_metrics())
    p.add_argument("--fail-on-regression", action="append", default=[], metavar="TASK/METRIC=DELTA",
                   help="exit 1 when the last run is worse than the first by more than DELTA on TASK/METRIC "
                        f"(repeatable or comma-separated); metrics: {known}")
    return p


def parse_thresholds(specs: list[str]) -> dict[str, float]:
    """``["gsm8k/accuracy=0.02,mmlu/accuracy=0"]`` -> ``{"gsm8k/accuracy": 0.02, "mmlu/accuracy": 0.0}``."""
    out = {}
    for item in (part.strip() for spec in specs for part in spec.split(",")):
        if not item:
            continue
        key, sep, delta = item.partition("=")
        key = key.strip()
        if not sep or "/" not in key:
            raise ValueError(f"--fail-on-regression {item!r}: expected TASK/METRIC=DELTA, e.g. gsm8k/accuracy=0.02")
        try:
            out[key] = float(delta)
        except ValueError:
            raise ValueError(f"--fail-on-regression {item!r}: DELTA {delta.strip()!r} is not a number") from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dirs = [Path(r) for r in args.runs]
        names = args.names.split(",") if args.names else [d.name or str(d) for d in dirs]
        if len(names) != len(dirs) or len(set(names)) != len(names):
            raise ValueError(f"--names needs {len(dirs)} distinct labels, got {names}")
        thresholds = parse_thresholds(args.fail_on_regression)
        runs = {name: load_run(d) for name, d in zip(names, dirs)}
        out = Path(args.output) if args.output else dirs[0]
        table, chart, checks = write_comparison(runs, dirs, out, args.samples, seed=args.seed,
                                                thresholds=thresholds)
    except (FileNotFoundError, ValueError) as err:
        print(f"alignkit compare: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(table)
    for check in checks:
        print(check.line(names[0], names[-1]))
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {chart}")
    return EXIT_REGRESSION if any(c.regressed for c in checks) else 0
