"""``alignkit compare RUN_DIR... [--output DIR] [--samples N] [--names a,b]``: eval runs side by side."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.eval.report import load_run, write_comparison


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit compare", description="Compare eval runs side by side.")
    p.add_argument("runs", nargs="+", help="output folders of `alignkit eval` (each has results.json)")
    p.add_argument("--output", default=None, help="where to write comparison.md/.png (default: first run dir)")
    p.add_argument("--samples", type=int, default=3, help="sampled wrong/unsafe examples per run and task")
    p.add_argument("--names", default=None, help="comma-separated labels for the runs (default: folder names)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dirs = [Path(r) for r in args.runs]
        names = args.names.split(",") if args.names else [d.name or str(d) for d in dirs]
        if len(names) != len(dirs) or len(set(names)) != len(names):
            raise ValueError(f"--names needs {len(dirs)} distinct labels, got {names}")
        runs = {name: load_run(d) for name, d in zip(names, dirs)}
    except (FileNotFoundError, ValueError) as err:
        print(f"alignkit compare: {err}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else dirs[0]
    table, chart = write_comparison(runs, dirs, out, args.samples)
    print(table)
    print(f"wrote {out / 'comparison.md'} and {chart}")
    return 0
