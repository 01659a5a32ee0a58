"""lm-evaluation-harness integration: alignkit's task YAMLs and a ``simple_evaluate`` wrapper.

The YAMLs in ``lm_eval_tasks/`` point ``data_files`` at the bundled data with paths relative to
that folder; ``datasets`` resolves relative paths against the working directory, so
:func:`render_task_dir` writes a copy with absolute paths (plus ``utils.py``) and that copy is
the ``TaskManager`` include path. Harness gotcha: the device is ``simple_evaluate(device=...)``,
not a ``model_args`` entry.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from alignkit.data.io import write_json_atomic, write_jsonl_atomic
from alignkit.resources import ROOT as RESOURCES

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
RELATIVE_DATA = "../../resources/"


def render_task_dir(out_dir: str | Path) -> Path:
    """Copy the YAMLs (data paths made absolute) and utils.py into ``out_dir``; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in TASK_DIR.glob("*.yaml"):
        (out_dir / path.name).write_text(path.read_text().replace(RELATIVE_DATA, f"{RESOURCES}/"))
    shutil.copy(TASK_DIR / "utils.py", out_dir / "utils.py")
    return out_dir


def _pretrained(model: str) -> dict:
    """model_args for lm-eval's hf model: the local folder alignkit.models resolves (GGUF included)."""
    try:
        from alignkit.models import resolve_model
    except ImportError:
        return {"pretrained": model}
    source = resolve_model(model)
    args = {"pretrained": source.path}
    if source.revision:
        args["revision"] = source.revision
    return args


def run_harness(model: str, tasks: list[str], output_dir: str | Path, *, limit: float | None = None,
                batch_size: int = 8, device: str | None = None, gen_kwargs: dict | None = None,
                model_args: dict | None = None) -> dict:
    """Run lm-eval tasks (built-in names or ``alignkit_*``) on an HF model; write results.json and
    per-task samples under ``output_dir``; return {"results", "n_samples", "config", "wall_s"}."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    output_dir = Path(output_dir)
    include = render_task_dir(output_dir / "task_yamls")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = {**_pretrained(model), **(model_args or {})}
    builtin = any(not t.startswith("alignkit_") for t in tasks)  # indexing lm-eval's own tasks is slow
    logger.info("lm-eval: tasks=%s model_args=%s device=%s limit=%s", tasks, args, device, limit)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), device=device, limit=limit,
                                  batch_size=batch_size, gen_kwargs=gen_kwargs, log_samples=True,
                                  task_manager=TaskManager(include_path=str(include), include_defaults=builtin))
    wall = time.perf_counter() - start
    summary = {"results": out["results"], "n_samples": out.get("n-samples", {}), "wall_s": wall,
               "config": {"model": model, "model_args": args, "tasks": list(tasks), "limit": limit,
                          "device": device, "batch_size": batch_size}}
    write_json_atomic(output_dir / "results.json", json.loads(json.dumps(summary, default=str)))
    for task, samples in (out.get("samples") or {}).items():
        rows = [{"doc_id": s.get("doc_id"), "target": s.get("target"), "resps": s.get("resps"),
                 "filtered_resps": s.get("filtered_resps"), **{k: s[k] for k in s if k in _metric_keys(out, task)}}
                for s in samples]
        write_jsonl_atomic(output_dir / f"samples_{task}.jsonl", json.loads(json.dumps(rows, default=str)))
    logger.info("lm-eval done in %.1f s: %s", wall, {t: _numbers(r) for t, r in out["results"].items()})
    return summary


def _metric_keys(out: dict, task: str) -> set[str]:
    return {k.split(",")[0] for k in out["results"].get(task, {})}


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_stderr,none")}
