"""RESULTS.md (one table: path, alignkit, baseline, ratio, target, met?) and PNG plots."""
from __future__ import annotations

import math
from pathlib import Path

from .common import Plot, Row, fit_exponent


def _num(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def write_markdown(doc: dict, path: Path, json_path: Path, analysis: Path | None = None) -> None:
    lines = [
        "# alignkit benchmarks", "",
        (f"Run {doc['date']} on `{doc['machine']}` ({doc['threads']} torch threads), size `{doc['size']}`, "
        f"model: {doc['model']}; torch {doc['versions']['torch']}, transformers {doc['versions']['transformers']}, "
        f"trl {doc['versions']['trl']}. Took {doc['total_s']:.0f} s. Raw values: `{json_path.name}`."), "",
        ("Each row measures alignkit's path and the baseline in the same process on the same model, data and "
        "settings. **ratio > 1 means alignkit is better** (alignkit/baseline for throughputs, baseline/alignkit "
        "for times and memory). Absolute numbers on a shared CPU are noise; ratios are what the targets are "
        "about. *agree* is the check that both paths compute the same values (losses, log-probs, texts)."), "",
        "| path | alignkit | baseline | unit | ratio | target | met? | agree | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        agree = "—" if not r["agreement"] else ("yes" if r["agreement"].get("ok") else "**NO**")
        target = f">= {r['target']}x" if r["target"] else "—"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "—"
        notes = str(r["notes"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['path']} | {_num(r['alignkit'])} | {_num(r['baseline'])} | {r['unit']} | {ratio} | "
                     f"{target} | {_num(r['met'])} | {agree} | {notes} |")
    if doc["errors"]:
        lines += ["", "## Errors", ""] + [f"- `{k}`: {v}" for k, v in doc["errors"].items()]
    if doc.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}](results/{Path(p).name})" for p in doc["plots"]]
    if analysis is not None and analysis.exists():
        lines += ["", analysis.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")


def write_plots(plots: list[Plot], rows: list[Row], out: Path) -> list[str]:
    """One PNG per :class:`Plot`, plus ``ratios.png`` (every row with a ratio, target marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for plot in plots:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, (xs, ys) in plot.series.items():
            if plot.loglog:
                k = fit_exponent(xs, ys)
                line, = ax.plot(xs, ys, marker="o", label=f"{label} (fitted exponent {k:.2f})")
                c = math.exp(sum(math.log(y) - k * math.log(x) for x, y in zip(xs, ys)) / len(xs))
                ax.plot(xs, [c * x ** k for x in xs], ls="--", color=line.get_color(), alpha=0.6)
            else:
                ax.plot(xs, ys, marker="o", label=label)
        if plot.logx or plot.loglog:
            ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in plot.series[label][0]) else 10)
        ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
        if plot.loglog:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{plot.name}.png", dpi=100)
        plt.close(fig)
        written.append(str(out / f"{plot.name}.png"))
    with_ratio = [r for r in rows if r.ratio is not None]
    if with_ratio:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(with_ratio) + 1.2))
        names = [r.path if len(r.path) <= 64 else r.path[:44] + "…" + r.path[-19:] for r in with_ratio]
        colors = ["tab:green" if r.met else "tab:red" if r.met is False else "tab:gray" for r in with_ratio]
        ax.barh(range(len(with_ratio)), [r.ratio for r in with_ratio], color=colors)  # one bar per row
        ax.set_yticks(range(len(with_ratio)), names)
        for i, r in enumerate(with_ratio):
            if r.target:
                ax.plot([r.target, r.target], [i - 0.4, i + 0.4], color="black")
        ax.axvline(1.0, color="gray", ls="--")
        ax.set_xscale("log")
        ax.set(xlabel="ratio (> 1: alignkit better; black tick: target)", title="alignkit vs baseline")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "ratios.png", dpi=100)
        plt.close(fig)
        written.append(str(out / "ratios.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report RESULTS_JSON [MD]``: redraw the plots and rewrite the table (default
    ``benchmarks/RESULTS.md``) from a saved run, with the current ``analysis.md``; no re-measuring."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("md", type=Path, nargs="?", default=Path(__file__).parent / "RESULTS.md")
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    plots = [Plot(**{**p, "series": {k: tuple(v) for k, v in p["series"].items()}}) for p in doc.get("plot_data", [])]
    doc["plots"] = write_plots(plots, [Row.from_dict(r) for r in doc["rows"]], args.json.parent)
    write_markdown(doc, args.md, args.json, analysis=Path(__file__).parent / "analysis.md")
    print(f"wrote {args.md} from {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
