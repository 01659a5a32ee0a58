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

import html
import json
import logging
import random
from pathlib import Path

from alignkit.data.io import (
    read_jsonl,
    save_figure_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from alignkit.eval.tasks import TASKS

logger = logging.getLogger(__name__)

# headline metric per task, shown in tables and charts (name, higher is better)
HEADLINE = {
    "mmlu": ("accuracy", True),
    "gsm8k": ("accuracy", True),
    "alpaca_eval": ("win_rate", True),
    "sst": ("proportion_safe", True),
    "over_refusal": ("refusal_rate", False),
}
EXTRA = {"alpaca_eval": ["lc_win_rate"]}


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
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no results.json (not an `alignkit eval` output folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def comparison_rows(runs: dict[str, dict]) -> list[tuple[str, str, list]]:
    """(task, metric, [value per run]) for every headline/extra metric any run has."""
    rows = []
    tasks = [t for t in HEADLINE if any(t in r["metrics"] for r in runs.values())]
    for task in tasks:
        for metric in [HEADLINE[task][0], *EXTRA.get(task, [])]:
            values = [r["metrics"].get(task, {}).get(metric) for r in runs.values()]
            if any(v is not None for v in values):
                rows.append((task, metric, values))
    return rows


def comparison_markdown(runs: dict[str, dict], rows) -> str:
    names = list(runs)
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metric, values in rows:
        arrow = "" if HEADLINE.get(task, ("", True))[1] or metric != HEADLINE[task][0] else " (lower better)"
        lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def comparison_chart(runs: dict[str, dict], rows, path: Path) -> Path:
    """Grouped bar chart: one group per (task, metric), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{t}\n{m}" for t, m, _ in rows]
    x = np.arange(len(rows))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    for j, name in enumerate(runs):
        ax.bar(x + j * width, [(v[j] or 0.0) for _, _, v in rows], width, label=name)
    ax.set_xticks(x + width * (len(runs) - 1) / 2, labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path


def sampled_failures(run_dir: Path, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """N random wrong/unsafe/refused records per task of one run (from predictions + judgments)."""
    out = {}
    for task_name, cls in TASKS.items():
        pred = run_dir / task_name / "predictions.jsonl"
        if not pred.exists():
            continue
        records = PredictionLog(pred, resume=True).read()
        judged = run_dir / task_name / "judgments.jsonl"
        if judged.exists():
            verdicts = {r["id"]: r["judge"] for r in PredictionLog(judged, resume=True).read()}
            for r in records:
                if r["id"] in verdicts:
                    r["judge"] = verdicts[r["id"]]
        bad = cls().sample_failures(records, n=len(records))
        out[task_name] = random.Random(seed).sample(bad, min(n, len(bad)))
    return out


def write_comparison(runs: dict[str, dict], dirs: list[Path], out: Path, samples: int) -> tuple[str, Path]:
    """``comparison.md`` (table, chart, sampled failures per run) and ``comparison.png`` in ``out``;
    returns (the markdown table, the chart path)."""
    rows = comparison_rows(runs)
    table = comparison_markdown(runs, rows)
    chart = comparison_chart(runs, rows, out / "comparison.png")
    parts = ["# Comparison", "", table, f"![chart]({chart.name})", ""]
    for name, d in zip(runs, dirs):
        for task, picked in sampled_failures(d, samples).items():
            if picked:
                parts += [f"## {name}: {task} sampled failures", ""]
                parts += ["```text\n" + _sample_text(s).replace("```", "'''") + "\n```" for s in picked]
    write_text_atomic(out / "comparison.md", "\n".join(parts) + "\n")
    return table, chart
