"""Every writer of eval results: incremental predictions, atomic final files, reports, `compare`.

* :class:`PredictionLog` appends one JSON line per scored example and flushes it, so a crash at
  example 700 of 805 keeps the 699 finished lines; a torn last line is ignored on read and a rerun
  skips the ids already there. It never deletes: ``resume=False`` moves an old file aside (``.prev``).
* :func:`throughput_of`: the throughput of a whole run from its timed segments (one per invocation).
* final files go through :mod:`alignkit.data.io`'s atomic writer (tmp file + fsync + ``os.replace``).
* :func:`write_reports`: ``results.json``, ``report.md`` and ``report.html`` of one run.
* :func:`write_comparison` (what ``alignkit compare RUN_DIR...`` writes): a side-by-side table
  (the "alignment tax" table: base vs SFT vs DPO), a bar chart PNG and sampled failures per run.
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkit.data.io import (
    read_jsonl,
    save_figure_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from alignkit.eval.judge import length_controlled_win_rate
from alignkit.eval.metrics import bootstrap_interval, wilson_interval
from alignkit.eval.tasks import TASKS

logger = logging.getLogger(__name__)

# headline metric per task, shown in tables and charts (name, higher is better)
HEADLINE = {
    "mmlu": ("accuracy", True),
    "gsm8k": ("accuracy", True),
    "alpaca_eval": ("win_rate", True),
    "sst": ("proportion_safe", True),
    "over_refusal": ("refusal_rate", False),
    "safety": ("attack_success_rate", False),
}
EXTRA = {"alpaca_eval": ["lc_win_rate"], "safety": ["attack_success_rate_jailbreak", "over_refusal_rate"]}


# ----------------------------------------------------------------------------- writers
class PredictionLog:
    """Append-only JSONL of per-example records (each has a unique ``id``)."""

    def __init__(self, path: str | Path, *, resume: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            k = 1
            while self.path.with_name(f"{self.path.name}.prev{k if k > 1 else ''}").exists():
                k += 1
            self.path.rename(self.path.with_name(f"{self.path.name}.prev{k if k > 1 else ''}"))

    def read(self) -> list[dict]:
        """Records written so far; a torn (unparseable) last line from a crash is dropped and the file
        rewritten without it, so that appends continue on a clean line."""
        if not self.path.exists():
            return []
        records = read_jsonl(self.path, drop_torn_tail=True)
        if records.torn_tail:
            self._rewrite(records)
        return list(records)

    def _rewrite(self, records: list[dict]) -> None:
        write_jsonl_atomic(self.path, records)

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.read()}

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()


def throughput_of(segments: list[dict]) -> dict:
    """Whole-run throughput from timed segments ``{started_at, examples, wall_s, generated_tokens}``
    (one per invocation that generated something); the segments are listed under ``segments``."""
    examples = sum(s["examples"] for s in segments)
    wall = sum(s["wall_s"] for s in segments)
    tokens = sum(s["generated_tokens"] for s in segments)
    return {"examples": examples, "wall_s": wall, "examples_per_s": examples / wall if wall else 0.0,
            "generated_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
            "segments": [dict(s) for s in segments]}


# ----------------------------------------------------------------------------- one run
def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str)) or v is None}


def _sample_text(rec: dict, limit: int = 400) -> str:
    prompt = rec.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[-1].get("content", "") if prompt else ""
    gen = rec.get("output", rec.get("generation", ""))
    extra = {k: rec["score"][k] for k in ("parsed", "gold") if k in rec.get("score", {})}
    if "judge" in rec:
        extra["judge"] = {k: v for k, v in rec["judge"].items() if k != "raw"}
    return f"[{rec.get('id')}] {extra}\nPROMPT: {str(prompt)[-limit:]}\nOUTPUT: {str(gen)[:limit]}"


def render_markdown(results: dict) -> str:
    lines = [f"# Eval report: {results.get('model_source', {}).get('requested', results.get('generator', ''))}", ""]
    lines += [f"- generator: `{results.get('generator')}`", f"- prompt style: `{results['config'].get('prompt')}`",
              f"- judge: `{results.get('judge')}`", f"- limit: {results['config'].get('limit')}", ""]
    lines += ["## Metrics", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in results["metrics"].items():
        for k, v in _scalar_metrics(metrics).items():
            lines.append(f"| {task} | {k} | {_fmt(v)} |")
    lines += ["", "## Throughput", "", "| task | examples | wall s | examples/s | tokens | tokens/s |",
              "|---|---|---|---|---|---|"]
    for task, t in results.get("throughput", {}).items():
        lines.append(f"| {task} | {t['examples']} | {t['wall_s']:.2f} | {t['examples_per_s']:.3f} | "
                     f"{t['generated_tokens']} | {t['tokens_per_s']:.1f} |")
    for task, samples in results.get("samples", {}).items():
        if samples:
            lines += ["", f"## {task}: sample wrong/unsafe examples", ""]
            lines += ["```text\n" + _sample_text(s).replace("```", "'''") + "\n```" for s in samples]
    return "\n".join(lines) + "\n"


def render_html(results: dict) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(t)}</td><td>{esc(k)}</td><td>{esc(_fmt(v))}</td></tr>"
                   for t, m in results["metrics"].items() for k, v in _scalar_metrics(m).items())
    thr = "".join(f"<tr><td>{esc(t)}</td><td>{v['examples']}</td><td>{v['wall_s']:.2f}</td>"
                  f"<td>{v['examples_per_s']:.3f}</td><td>{v['generated_tokens']}</td><td>{v['tokens_per_s']:.1f}</td></tr>"
                  for t, v in results.get("throughput", {}).items())
    samples = "".join(f"<h3>{esc(t)}</h3>" + "".join(f"<pre>{esc(_sample_text(s))}</pre>" for s in ss)
                      for t, ss in results.get("samples", {}).items() if ss)
    title = esc(str(results.get("model_source", {}).get("requested", results.get("generator", ""))))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Eval report: {title}</title>"
            "<style>td,th{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}</style></head>"
            f"<body><h1>Eval report: {title}</h1><p>generator: {esc(str(results.get('generator')))}; "
            f"judge: {esc(str(results.get('judge')))}</p>"
            f"<h2>Metrics</h2><table><tr><th>task</th><th>metric</th><th>value</th></tr>{rows}</table>"
            "<h2>Throughput</h2><table><tr><th>task</th><th>examples</th><th>wall s</th><th>examples/s</th>"
            f"<th>tokens</th><th>tokens/s</th></tr>{thr}</table><h2>Samples</h2>{samples}</body></html>\n")


def write_reports(out_dir: str | Path, results: dict) -> dict[str, Path]:
    """results.json (atomic), report.md and report.html."""
    out_dir = Path(out_dir)
    return {"results": write_json_atomic(out_dir / "results.json", results),
            "markdown": write_text_atomic(out_dir / "report.md", render_markdown(results)),
            "html": write_text_atomic(out_dir / "report.html", render_html(results))}


# ----------------------------------------------------------------------------- compare
def load_run(run_dir: str | Path) -> dict:
    """The ``results.json`` of an ``alignkit eval`` output folder."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no results.json (not an `alignkit eval` output folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


# compare also shows format_rate = answers that parsed / n (higher is better) of the graded tasks, derived from
# their "unparseable" count when the run does not report it.
FORMAT_RATE_TASKS = ("mmlu", "gsm8k")
BOOTSTRAPPED = ("win_rate", "lc_win_rate")  # alpaca_eval: intervals from the per-example judgments
NOT_MEASURED = "not measured"
INTERVALS_NOTE = ("n and 95% intervals (Wilson for proportions, seeded percentile bootstrap over the per-example "
                  "judgments for win rates):")


@dataclass(frozen=True)
class Measurement:
    """One metric of one run: value (None = not measured), n, 95% interval and how it was computed."""

    value: float | None
    n: int | None = None
    lo: float | None = None
    hi: float | None = None
    method: str = NOT_MEASURED  # "wilson", "bootstrap", or why there is no interval

    @property
    def measured(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class ComparisonRow:
    """(task, metric): its direction and one :class:`Measurement` per run, in the runs' order."""

    task: str
    metric: str
    higher_is_better: bool
    cells: tuple[Measurement, ...]

    @property
    def values(self) -> list[float | None]:
        return [c.value for c in self.cells]


def compared_metrics() -> dict[tuple[str, str], bool]:
    """Every (task, metric) compare shows, in table order -> higher is better: each task's HEADLINE metric,
    its EXTRA ones (same direction: lc_win_rate reads like win_rate), then format_rate."""
    out = {}
    for task, (metric, higher) in HEADLINE.items():
        out[(task, metric)] = higher
        out.update({(task, extra): higher for extra in EXTRA.get(task, [])})
        if task in FORMAT_RATE_TASKS:
            out[(task, "format_rate")] = True
    return out


def _metric_value(metrics: dict, metric: str) -> float | None:
    if metric == "format_rate" and "format_rate" not in metrics and {"n", "unparseable"} <= set(metrics):
        return (metrics["n"] - metrics["unparseable"]) / metrics["n"] if metrics["n"] else None
    value = metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _proportion_counts(metrics: dict, metric: str, value: float) -> tuple[int, int] | None:
    """(successes, n) behind a proportion: the run's own counts, else value x n when that is an integer."""
    counts = {"accuracy": ("correct", "n"), "refusal_rate": ("refusals", "n")}
    if metric in counts and all(isinstance(metrics.get(k), int) for k in counts[metric]):
        return metrics[counts[metric][0]], metrics[counts[metric][1]]
    if metric == "proportion_safe" and isinstance(metrics.get("safe"), int) and isinstance(metrics.get("unsafe"), int):
        return metrics["safe"], metrics["safe"] + metrics["unsafe"]  # invalid verdicts are not scored
    if metric == "format_rate" and isinstance(metrics.get("unparseable"), int) and isinstance(metrics.get("n"), int):
        return metrics["n"] - metrics["unparseable"], metrics["n"]
    for row in metrics.get("table") or []:  # tasks with a table of rates (safety): each row's own count and n
        if isinstance(row, dict) and row.get("metric") == metric and isinstance(row.get("n"), int):
            return row["count"], row["n"]
    n = metrics.get("n")
    if isinstance(n, int) and n > 0 and abs(value * n - round(value * n)) < 1e-6:
        return round(value * n), n
    return None


def _denominator(metrics: dict, metric: str, value: float) -> int | None:
    """How many examples the value is computed over (validly judged ones for win rates), if known."""
    if metric in BOOTSTRAPPED:
        return metrics.get("n_judged")
    counts = _proportion_counts(metrics, metric, value)
    return None if counts is None else counts[1]


def _wilson(metrics: dict, metric: str, value: float) -> Measurement:
    counts = _proportion_counts(metrics, metric, value)
    if counts is None:
        return Measurement(value, metrics.get("n"), method="no interval: no counts behind the proportion")
    successes, n = counts
    if abs(successes / n - value) > 1e-9:
        return Measurement(value, n, method=f"no interval: {successes}/{n} disagrees with the value")
    lo, hi = wilson_interval(successes, n)
    return Measurement(value, n, lo, hi, "wilson")


def _read_task_file(run_dir: Path, task: str, name: str) -> list[dict] | None:
    path = run_dir / task / name
    return list(read_jsonl(path, drop_torn_tail=True)) if path.exists() else None


def _win_rate_samples(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(preferences, output lengths, reference lengths) of the validly judged AlpacaEval examples,
    or why they cannot be read."""
    judged = _read_task_file(run_dir, "alpaca_eval", "judgments.jsonl")
    if judged is None:
        return "no alpaca_eval/judgments.jsonl"
    predictions = _read_task_file(run_dir, "alpaca_eval", "predictions.jsonl") or []
    references = {r["id"]: r.get("example", {}).get("reference") for r in predictions}
    valid = [r for r in judged if r.get("judge", {}).get("preference") is not None]
    if not valid:
        return "no valid judgment in alpaca_eval/judgments.jsonl"
    prefs = np.array([r["judge"]["preference"] for r in valid], dtype=np.float64)
    out_len = np.array([len(r["output"]) for r in valid], dtype=np.float64)
    refs = [references.get(r["id"]) for r in valid]
    ref_len = np.array([len(x) if isinstance(x, str) else np.nan for x in refs], dtype=np.float64)
    return prefs, out_len, ref_len


def _bootstrap(run_dir: Path | None, metric: str, value: float, n: int | None, seed: int,
               n_resamples: int) -> Measurement:
    """Percentile bootstrap over the run's per-example judgments (the whole statistic refitted per replica);
    ``n``: the validly judged examples results.json reports, shown when the judgments cannot be read."""
    samples = _win_rate_samples(run_dir) if run_dir is not None else "no run folder given"
    if isinstance(samples, str):
        return Measurement(value, n, method=f"no interval: {samples}")
    prefs, out_len, ref_len = samples
    if metric == "lc_win_rate" and np.isnan(ref_len).any():
        return Measurement(value, len(prefs), method="no interval: references missing from predictions.jsonl")

    def stat(idx: np.ndarray) -> float:
        i = idx.astype(np.int64)
        if metric == "win_rate":
            return float(prefs[i].mean())
        return length_controlled_win_rate(prefs[i], out_len[i], ref_len[i])["lc_win_rate"]

    index = np.arange(len(prefs), dtype=np.float64)
    if abs(stat(index) - value) > 1e-6:
        return Measurement(value, len(prefs), method="no interval: judgments.jsonl disagrees with results.json")
    lo, hi = bootstrap_interval(index, stat, n_resamples=n_resamples, seed=seed)
    return Measurement(value, len(prefs), lo, hi, "bootstrap")


def measure(results: dict, run_dir: Path | None, task: str, metric: str, *, seed: int = 0,
            n_resamples: int = 2000) -> Measurement:
    """One run's ``task/metric`` with n and a 95% interval: Wilson for proportions (the run's counts),
    a seeded percentile bootstrap over ``run_dir``'s per-example judgments for win rates."""
    metrics = results.get("metrics", {}).get(task)
    value = _metric_value(metrics, metric) if isinstance(metrics, dict) else None
    if value is None:
        return Measurement(None)
    if _denominator(metrics, metric, value) == 0:  # the tasks report 0.0 for a rate over nothing
        return Measurement(None, 0, method=f"{NOT_MEASURED} (n = 0)")
    if metric in BOOTSTRAPPED:
        return _bootstrap(run_dir, metric, value, metrics.get("n_judged"), seed, n_resamples)
    return _wilson(metrics, metric, value)


def comparison_rows(runs: dict[str, dict], dirs: list[Path] | None = None, *, seed: int = 0,
                    n_resamples: int = 2000) -> list[ComparisonRow]:
    """A :class:`ComparisonRow` for every compared metric (:func:`compared_metrics`) that any run measured;
    ``dirs`` (the run folders, in ``runs``' order) hold the per-example files that win-rate intervals need."""
    folders = list(dirs) if dirs is not None else [None] * len(runs)
    rows = []
    for (task, metric), higher in compared_metrics().items():
        cells = tuple(measure(r, d, task, metric, seed=seed, n_resamples=n_resamples)
                      for r, d in zip(runs.values(), folders))
        if any(c.measured for c in cells):
            rows.append(ComparisonRow(task, metric, higher, cells))
    return rows


def _cell(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.4f}"


def _interval(c: Measurement) -> str:
    return f"[{c.lo:.4f}, {c.hi:.4f}]" if c.lo is not None else "-"


def comparison_markdown(runs: dict[str, dict], rows: list[ComparisonRow]) -> str:
    """The side-by-side table of values, then every value with its n and 95% interval."""
    names = list(runs)
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in rows:
        arrow = "" if row.higher_is_better else " (lower better)"
        lines.append(f"| {row.task} | {row.metric}{arrow} | " + " | ".join(_cell(v) for v in row.values) + " |")
    lines += ["", INTERVALS_NOTE, "",
              "| task | metric | run | value | n | 95% interval | method |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, c in zip(names, row.cells):
            n = "-" if c.n is None else str(c.n)
            lines.append(f"| {row.task} | {row.metric} | {name} | {_cell(c.value)} | {n} | {_interval(c)} | {c.method} |")
    return "\n".join(lines) + "\n"


def comparison_chart(runs: dict[str, dict], rows: list[ComparisonRow], path: Path) -> Path:
    """Grouped bar chart, one group per (task, metric) and one bar per run, with 95% interval whiskers;
    a metric a run did not measure leaves a gap labelled "not measured" (never a bar at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.task}\n{r.metric}" + ("" if r.higher_is_better else "\n(lower better)") for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    for j, name in enumerate(runs):
        pos = x + j * width
        cells = [r.cells[j] for r in rows]
        shown = [i for i, c in enumerate(cells) if c.measured]
        bars = ax.bar(pos[shown], [cells[i].value for i in shown], width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)  # a measured 0 shows "0.00"; a gap shows nothing
        with_ci = [i for i in shown if cells[i].lo is not None]
        err = [[cells[i].value - cells[i].lo for i in with_ci], [cells[i].hi - cells[i].value for i in with_ci]]
        ax.errorbar(pos[with_ci], [cells[i].value for i in with_ci], yerr=err, fmt="none", ecolor="black",
                    capsize=3, lw=1)
        for i, c in enumerate(cells):
            if not c.measured:
                ax.text(pos[i], 0.02, NOT_MEASURED, rotation=90, ha="center", va="bottom", fontsize=7,
                        color=bars.patches[0].get_facecolor() if bars.patches else "gray")
    ax.set_xticks(x + width * (len(runs) - 1) / 2, labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (whiskers: 95% interval)")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class RegressionCheck:
    """``task/metric`` of the LAST run against the FIRST: ``worse_by`` > ``allowed`` is a regression."""

    task: str
    metric: str
    first: float
    last: float
    allowed: float
    higher_is_better: bool

    @property
    def worse_by(self) -> float:
        """How much worse the last run is (negative: better), in the metric's own direction."""
        return self.first - self.last if self.higher_is_better else self.last - self.first

    @property
    def regressed(self) -> bool:
        return self.worse_by > self.allowed + 1e-9  # tolerance: 0.50 -> 0.48 is a change of exactly 0.02

    def line(self, first_name: str, last_name: str) -> str:
        verdict = "REGRESSION" if self.regressed else "ok"
        return (f"{verdict}: {self.task}/{self.metric} {first_name}={self.first:.4f} -> {last_name}={self.last:.4f} "
                f"(worse by {self.worse_by:+.4f}, allowed {self.allowed:.4f}; "
                f"{'higher' if self.higher_is_better else 'lower'} is better)")


def regression_checks(runs: dict[str, dict], rows: list[ComparisonRow],
                      thresholds: dict[str, float]) -> list[RegressionCheck]:
    """One :class:`RegressionCheck` per ``{"task/metric": allowed drop}``, LAST run vs FIRST.

    ``ValueError`` (naming the metric) for fewer than two runs, a metric compare does not know,
    a negative allowance, or a metric the first or the last run did not measure."""
    names = list(runs)
    if len(names) < 2:
        raise ValueError("--fail-on-regression compares the last run with the first: give at least two runs")
    known = compared_metrics()
    by_key = {f"{r.task}/{r.metric}": r for r in rows}
    checks = []
    for key, allowed in thresholds.items():
        task, _, metric = key.partition("/")
        if (task, metric) not in known:
            raise ValueError(f"--fail-on-regression: unknown metric {key!r}; valid: "
                             + ", ".join(f"{t}/{m}" for t, m in known))
        if allowed < 0:
            raise ValueError(f"--fail-on-regression {key}: DELTA must be >= 0, got {allowed}")
        row = by_key.get(key)
        missing = [n for n, c in zip(names, row.cells) if not c.measured] if row else names
        missing = [n for n in missing if n in (names[0], names[-1])]
        if missing:
            raise ValueError(f"--fail-on-regression {key}: not measured in run(s) {', '.join(missing)}")
        checks.append(RegressionCheck(task, metric, row.cells[0].value, row.cells[-1].value, allowed,
                                      row.higher_is_better))
    return checks


def _failure_records(run_dir: Path, task_name: str) -> list[dict] | None:
    """The task's prediction records with their verdicts attached (None when the run lacks the task)."""
    records = _read_task_file(run_dir, task_name, "predictions.jsonl")
    if records is None:
        return None
    verdicts = {r["id"]: r["judge"] for r in _read_task_file(run_dir, task_name, "judgments.jsonl") or []}
    for r in records:
        if r["id"] in verdicts:
            r["judge"] = verdicts[r["id"]]
    return records


def sampled_failures(run_dir: Path, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """N random wrong/unsafe/refused records per task of one run (from predictions + judgments; read only)."""
    out = {}
    for task_name, cls in TASKS.items():
        records = _failure_records(Path(run_dir), task_name)
        if records is None:
            continue
        bad = cls().sample_failures(records, n=len(records))
        out[task_name] = random.Random(seed).sample(bad, min(n, len(bad)))
    return out


def comparison_json(runs: dict[str, dict], dirs: list[Path], rows: list[ComparisonRow],
                    checks: list[RegressionCheck] | None = None) -> dict:
    """What ``comparison.json`` holds: the runs, every measurement, and the regression checks."""
    names = list(runs)
    return {"runs": [{"name": n, "dir": str(d)} for n, d in zip(names, dirs)],
            "confidence": 0.95,
            "metrics": [{"task": r.task, "metric": r.metric, "higher_is_better": r.higher_is_better,
                         "runs": {n: dataclasses.asdict(c) for n, c in zip(names, r.cells)}} for r in rows],
            "regression_checks": [{**dataclasses.asdict(c), "worse_by": c.worse_by, "regressed": c.regressed}
                                  for c in checks or []]}


def write_comparison(runs: dict[str, dict], dirs: list[Path], out: Path, samples: int, *, seed: int = 0,
                     thresholds: dict[str, float] | None = None) -> tuple[str, Path, list[RegressionCheck]]:
    """``comparison.md`` (tables with n and intervals, chart, regression checks, sampled failures per run),
    ``comparison.png`` and ``comparison.json`` in ``out``; returns (the markdown tables, the chart path,
    the regression checks).
    ``thresholds`` (``{"task/metric": allowed drop}``) adds :func:`regression_checks`; its ValueError
    is raised before anything is written."""
    rows = comparison_rows(runs, dirs, seed=seed)
    checks = regression_checks(runs, rows, thresholds) if thresholds else []
    table = comparison_markdown(runs, rows)
    chart = comparison_chart(runs, rows, out / "comparison.png")
    parts = ["# Comparison", "", table, f"![chart]({chart.name})", ""]
    if checks:
        names = list(runs)
        parts += [f"## Regression checks ({names[-1]} vs {names[0]})", ""]
        parts += [f"- {c.line(names[0], names[-1])}" for c in checks] + [""]
    for name, d in zip(runs, dirs):
        for task, picked in sampled_failures(d, samples).items():
            if picked:
                parts += [f"## {name}: {task} sampled failures", ""]
                parts += ["```text\n" + _sample_text(s).replace("```", "'''") + "\n```" for s in picked]
    write_text_atomic(out / "comparison.md", "\n".join(parts) + "\n")
    write_json_atomic(out / "comparison.json", comparison_json(runs, dirs, rows, checks))
    return table, chart, checks
